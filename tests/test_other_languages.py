"""Clients that know the contract only from the repo's protos/, against a real server with reflection off (as
the production profile runs): Node.js (grpc-js and proto-loader), a Python user's own grpcio-tools stubs,
and grpcurl. Each is built once from the .proto files under protos/ and once from the committed
FileDescriptorSet, and each decodes the google.rpc error details from the `grpc-status-details-bin` trailer.

The Node client is tests/node/client.js, its packages installed by `npm ci` from the committed lockfile (into
tests/node/node_modules, git-ignored, again only when the lockfile changes). The Python user's script is the
README's, run as printed but for the server's address.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamflow.client import ChurnClient
from streamflow.feature_repo.definitions import FEATURE_NAMES
from streamflow.server.errors import DOMAIN
from streamflow.settings import Settings
from streamflow.training.demo_data import FIRST_USER_ID
from tests.fixtures.serving import start_server

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
CONTRACT = "streamflow/serving/v1/prediction_service.proto"
DESCRIPTOR_SET = PROTOS / "streamflow_serving_v1.binpb"
NODE_DIR = ROOT / "tests" / "node"
GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVICE = "streamflow.serving.v1.PredictionService"
UNKNOWN_USER = "9999-99999"
NOT_FOUND = 5
# Where each client finds the contract: the .proto files, or the one descriptor set.
SOURCES = ("protos", "descriptor-set")
TOOL_TIMEOUT_S = 300
"""Bound on npm ci, protoc, node and grpcurl runs: liveness only, not a budget."""


def _required(tool: str) -> str:
    """The path of `tool`; skipped without it outside CI, a failure under CI (these machines have it)."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (Debian: nodejs, npm)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI machines must have it")
        pytest.skip(message)
    return path


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def served_without_reflection(embedded_settings: Settings) -> Iterator[str]:
    """A server that describes nothing of itself: the clients know the contract from protos/ alone."""
    with start_server(embedded_settings, reflection=False) as running:
        yield running.local_address


@pytest.fixture(scope="module")
def expected(served_without_reflection: str) -> dict[str, Any]:
    """What the project's own client reads from the same server."""
    with ChurnClient(served_without_reflection, timeout=30) as client:
        prediction = client.predict(FIRST_USER_ID)
        info = client.model_info()
    return {
        "probability": prediction.churn_probability,
        "label": f"CHURN_LABEL_{prediction.label.name}",
        "version": info.model.version,
        "val_auc": info.metrics["val_auc"],
    }


@pytest.fixture(scope="module")
def node() -> str:
    """node, with tests/node's packages installed from its lockfile."""
    node, npm = _required("node"), _required("npm")
    lock = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    stamp = NODE_DIR / "node_modules" / ".installed-from-lock"
    if not stamp.exists() or stamp.read_text() != lock:
        # No install scripts: protobufjs's only warns about version schemes; npm 11 asks before running it.
        _run(npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", cwd=NODE_DIR)
        stamp.write_text(lock)
    return node


def _details(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A decoded status's details by type name."""
    return {detail["@type"].rsplit("/", 1)[-1]: detail for detail in status["details"]}


def _as_map(value: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """A map field as a dict: from a descriptor set, proto-loader and protobufjs 7 give maps as lists of
    `{key, value}` entries (Root.fromDescriptor keeps the map-entry messages); from .proto files, objects."""
    return value if isinstance(value, dict) else {entry["key"]: entry["value"] for entry in value}


def _assert_entity_not_found(status: dict[str, Any]) -> None:
    """The status of Predict for an unknown user, as grpcurl, Node and Python decode it."""
    assert status["code"] == NOT_FOUND
    details = _details(status)
    assert set(details) == {"google.rpc.ErrorInfo", "google.rpc.PreconditionFailure"}
    info = details["google.rpc.ErrorInfo"]
    assert (info["reason"], info["domain"]) == ("ENTITY_NOT_FOUND", DOMAIN)
    assert _as_map(info["metadata"])["userId"] == UNKNOWN_USER
    subjects = [v["subject"] for v in details["google.rpc.PreconditionFailure"]["violations"]]
    assert subjects == list(FEATURE_NAMES)


@pytest.mark.parametrize("source", SOURCES)
def test_node_client_calls_every_rpc_and_decodes_error_details(
    node: str, served_without_reflection: str, expected: dict[str, Any], source: str
) -> None:
    result = _run(
        node,
        str(NODE_DIR / "client.js"),
        served_without_reflection,
        source,
        str(PROTOS),
        FIRST_USER_ID,
        UNKNOWN_USER,
    )
    out = json.loads(result.stdout)

    prediction = out["predict"]["prediction"]
    assert prediction["user_id"] == FIRST_USER_ID
    assert prediction["churn_probability"] == expected["probability"]
    assert prediction["label"] == expected["label"]
    assert [f["name"] for f in prediction["features"]] == list(FEATURE_NAMES)
    known, unknown = out["batch"]["results"]
    assert known["prediction"]["churn_probability"] == expected["probability"]
    assert unknown["user_id"] == UNKNOWN_USER
    _assert_entity_not_found(unknown["error"])
    assert out["modelInfo"]["model"] == {"name": "streamflow_churn", "version": expected["version"]}
    assert _as_map(out["modelInfo"]["metrics"])["val_auc"] == expected["val_auc"]
    assert [f["name"] for f in out["modelInfo"]["features"]] == list(FEATURE_NAMES)
    assert out["failure"]["grpcCode"] == NOT_FOUND
    _assert_entity_not_found(out["failure"]["status"])


def _readme_python_user_script() -> str:
    """The Python block of the README's "Calling from other languages" section."""
    section = (ROOT / "README.md").read_text().split("### Calling from other languages\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", re.split(r"\n##+ ", section, maxsplit=1)[0], flags=re.DOTALL)
    assert match, "the README's other-languages section has no Python block"
    return match.group(1)


@pytest.mark.parametrize("source", SOURCES)
def test_python_user_with_own_stubs_from_the_repo(
    served_without_reflection: str, expected: dict[str, Any], tmp_path: Path, source: str
) -> None:
    """The README's commands: grpcio-tools generates the stubs into a folder of the user's, whose script
    imports them as `streamflow.serving.v1` (not the project's generated package)."""
    where = ["-I", str(PROTOS)] if source == "protos" else [f"--descriptor_set_in={DESCRIPTOR_SET}"]
    _run(
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        *where,
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        CONTRACT,
    )
    script = _readme_python_user_script().replace("localhost:50051", served_without_reflection)
    (tmp_path / "churn.py").write_text(script + "print(pb.__file__)\n")

    lines = _run(sys.executable, "churn.py", cwd=tmp_path).stdout.splitlines()

    assert lines == [
        f"{FIRST_USER_ID} {expected['label']} {expected['probability']}",
        f"{FIRST_USER_ID} prediction",
        f"{UNKNOWN_USER} error",
        f"streamflow_churn {expected['version']}",
        f"NOT_FOUND ENTITY_NOT_FOUND {UNKNOWN_USER}",
        str(tmp_path / "streamflow" / "serving" / "v1" / "prediction_service_pb2.py"),
    ]


@pytest.mark.parametrize(
    "schema",
    [
        ("-protoset", str(DESCRIPTOR_SET)),
        ("-import-path", str(PROTOS), "-proto", CONTRACT, "-proto", "google/rpc/error_details.proto"),
    ],
    ids=SOURCES[::-1],
)
def test_grpcurl_without_reflection_decodes_error_details(
    served_without_reflection: str, schema: tuple[str, ...]
) -> None:
    base = [str(GRPCURL), "-plaintext", *schema]
    request = json.dumps({"userId": UNKNOWN_USER})
    failed = subprocess.run(
        [*base, "-format-error", "-d", request, served_without_reflection, f"{SERVICE}/Predict"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )

    assert failed.returncode == 64 + NOT_FOUND, failed.stderr  # grpcurl exits 64 + the status code
    _assert_entity_not_found(json.loads(failed.stderr))


def test_grpcurl_list_needs_reflection_on_this_server(served_without_reflection: str) -> None:
    """The other tests here prove something: this server answers no reflection."""
    result = subprocess.run(
        [str(GRPCURL), "-plaintext", served_without_reflection, "list"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )

    assert result.returncode != 0
    assert "does not support the reflection API" in result.stderr
