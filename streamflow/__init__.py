"""StreamFlow Serving: shared settings and the `streamflow` command.

Importing it turns off the usage telemetry of the libraries the pipeline and the server load (MLflow's, and
onnxruntime's, which otherwise writes a device id and an event database under ~/.cache/Microsoft): nothing
leaves a user's machine unless they ask for it by setting the variable themselves. It also keeps grpc's
core logging at errors (its documented default, read once at grpc's import): at its INFO level every
failed TLS handshake, which any peer can cause, is a plain-text line in the server's log.

And it imports Feast as an optimized interpreter (`python -O`) would: Feast decorates its classes with
typeguard's `@typechecked`, which re-parses and recompiles a whole module for every method it checks. That
took 5-7 of the 8-10 seconds of `import feast` here, paid by every process of the control plane and every
command. typeguard documents the decorator as a no-op under -O, for checks not meant to run in production;
-O itself would also strip every `assert` of every library, so only the decorator is made a no-op, and only
when Feast is first imported (processes that never import Feast never import typeguard either).
"""

import os
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

_T = TypeVar("_T")


def _unchecked(target: _T | None = None, **_options: Any) -> _T | Callable[[_T], _T]:
    """typeguard's `typechecked` as it is under -O: the target itself (or, called with options only, a
    decorator that returns its target)."""
    return target if target is not None else _unchecked  # type: ignore[return-value]


class _FeastUnchecked:
    """A meta path finder that finds nothing: it only makes typeguard's decorator a no-op when `feast` is
    about to be imported. It stays in place (removing a finder while the import system iterates over
    `sys.meta_path` would skip the next one); after that import it is one comparison per import."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == "feast":  # asked only while it is not imported (sys.modules answers after)
            try:
                import typeguard
            except ImportError:  # Feast requires it: then Feast's own import fails, and says why
                return None
            typeguard.typechecked = _unchecked  # type: ignore[assignment]
        return None


sys.meta_path.insert(0, _FeastUnchecked())
