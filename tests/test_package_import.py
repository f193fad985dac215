"""What importing `streamflow` does to the process: Feast is imported without typeguard's instrumentation
(as under `python -O`), and a process that never imports Feast never imports typeguard."""

from __future__ import annotations

import json
import subprocess
import sys

_REPORT = """
import json, sys
{imports}
from feast import Entity
instrumented = "typeguard" in Entity.__init__.__code__.co_names
try:
    Entity(name=123, join_keys=["user_id"])
    refused = None
except Exception as exc:
    refused = type(exc).__name__
print(json.dumps({{"instrumented": instrumented, "refused": refused}}))
"""


def _report(imports: str) -> dict[str, object]:
    """How Feast's classes behave in a fresh interpreter that runs `imports` first."""
    done = subprocess.run(
        [sys.executable, "-c", _REPORT.format(imports=imports)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return report


def test_feast_imported_after_streamflow_is_not_instrumented() -> None:
    # As under -O, a name that is no string is Feast's own code's to take or refuse (it takes it).
    assert _report("import streamflow") == {"instrumented": False, "refused": None}


def test_feast_imported_alone_is_instrumented() -> None:
    """The check above can fail: without `streamflow`, typeguard rewrites Feast's methods."""
    assert _report("") == {"instrumented": True, "refused": "TypeCheckError"}


def test_a_process_that_never_imports_feast_never_imports_typeguard() -> None:
    code = "import sys, streamflow.server.worker, streamflow.client; print('typeguard' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr
