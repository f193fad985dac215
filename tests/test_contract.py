"""The v1 contract: buf lint, format and breaking pass from the committed files alone, the generated code
and the FileDescriptorSet match the protos, and the vendored third-party protos describe what the server
sends.

Breaking changes are checked against `protos/released/streamflow_serving_v1.image.yaml`, a committed buf
image of the released contract, not against `.git#branch=main`: CI runs on a fresh clone of main, where
main compared with itself can never fail, and a clone may lack history or tags. The image is plain YAML (no
source info) so a reviewer sees a baseline change in the diff. Refresh it only when cutting a release:
    buf build --path protos/streamflow --exclude-source-info \
        -o protos/released/streamflow_serving_v1.image.yaml
The buf checks run in a copy holding only buf.yaml and protos/, as a fresh clone has them (no build/, no
`make protos`); each also runs once on a deliberately broken copy of the contract, to prove it can fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

from protos import generate

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / ".venv" / "bin" / "buf"
PROTO = Path("protos/streamflow/serving/v1/prediction_service.proto")
RELEASED_IMAGE = Path("protos/released/streamflow_serving_v1.image.yaml")
DESCRIPTOR_SET = ROOT / "protos" / "streamflow_serving_v1.binpb"
# The three checks `make test` also runs, as its Makefile spells them.
BUF_CHECKS = {
    "lint": ("lint",),
    "format": ("format", "--diff", "--exit-code", "--path", "protos/streamflow"),
    "breaking": ("breaking", "--against", str(RELEASED_IMAGE), "--exclude-imports"),
}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """What a fresh clone holds for buf (buf.yaml and protos/), in a copy a test may break."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _buf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), *args, "--error-format", "json"], cwd=cwd, capture_output=True, text=True, check=False
    )


def _rules(result: subprocess.CompletedProcess[str]) -> set[str]:
    """The rule ids buf reported, one JSON object per line of its output."""
    return {json.loads(line)["type"] for line in result.stdout.splitlines() if line.strip()}


def _edit(workspace: Path, old: str, new: str) -> None:
    path = workspace / PROTO
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in the contract"
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize("check", sorted(BUF_CHECKS))
def test_buf_check_passes_on_the_committed_files_alone(workspace: Path, check: str) -> None:
    result = _buf(*BUF_CHECKS[check], cwd=workspace)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("check", "old", "new", "rule"),
    [
        (
            "lint",
            "string user_id = 1;\n  // Whether the prediction carries",
            "string userId = 1;\n  // Whether the prediction carries",
            "FIELD_LOWER_SNAKE_CASE",
        ),
        ("breaking", "  double churn_probability = 3;\n", "", "FIELD_NO_DELETE"),
        (
            "breaking",
            'java_package = "com.streamflow.serving.v1"',
            'java_package = "com.example"',
            "FILE_SAME_JAVA_PACKAGE",
        ),
    ],
    ids=["lint-style-violation", "breaking-deleted-field", "breaking-changed-language-option"],
)
def test_buf_check_fails_on_a_broken_contract(
    workspace: Path, check: str, old: str, new: str, rule: str
) -> None:
    _edit(workspace, old, new)
    result = _buf(*BUF_CHECKS[check], cwd=workspace)
    assert result.returncode != 0
    assert rule in _rules(result)


def test_buf_format_fails_on_a_misformatted_contract(workspace: Path) -> None:
    _edit(
        workspace,
        "string user_id = 1;\n  // Whether the prediction carries",
        "string   user_id=1;\n  // Whether the prediction carries",
    )
    result = _buf(*BUF_CHECKS["format"], cwd=workspace)
    assert result.returncode != 0
    assert "-  string   user_id=1;" in result.stdout


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    generate.generate(out)
    committed = ROOT / "client" / "generated"

    def files(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and p.suffix in {".py", ".pyi"}
        }

    fresh, current = files(out), files(committed)
    assert sorted(fresh) == sorted(current), "files differ: run `make protos`"
    stale = [name for name in fresh if fresh[name] != current[name]]
    assert not stale, f"client/generated is stale in {stale}: run `make protos`"


def test_descriptor_set_is_not_stale(tmp_path: Path) -> None:
    fresh = generate.write_descriptor_set(tmp_path / "fresh.binpb").read_bytes()
    assert fresh == DESCRIPTOR_SET.read_bytes(), "the descriptor set is stale: run `make protos`"


def _committed_set() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())


def test_descriptor_set_is_self_contained_with_json_names() -> None:
    files = _committed_set().file
    pool = descriptor_pool.DescriptorPool()
    for file in files:  # in dependency order, each import before its importer: Add raises otherwise
        pool.Add(file)

    for name in ("streamflow.serving.v1.PredictionService", "grpc.health.v1.Health"):
        assert pool.FindServiceByName(name).methods
    for detail in ("ErrorInfo", "BadRequest", "PreconditionFailure", "RetryInfo", "QuotaFailure"):
        assert pool.FindMessageTypeByName(f"google.rpc.{detail}")
    contract = next(f for f in files if f.name == PROTO.relative_to("protos").as_posix())
    prediction = next(m for m in contract.message_type if m.name == "Prediction")
    assert {f.name: f.json_name for f in prediction.field}["churn_probability"] == "churnProbability"
    assert contract.source_code_info.location, "comments (source info) are kept for describe"


def _clear_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _clear_json_names(nested)


def _shape(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """What a file says about the wire: its messages, enums and services by name, without its file name,
    options, comments or JSON names (the Python packages' copies lack them) and in a fixed order."""
    shape = descriptor_pb2.FileDescriptorProto(package=file.package)
    for message in sorted(file.message_type, key=lambda m: m.name):
        copy = shape.message_type.add()
        copy.CopyFrom(message)
        _clear_json_names(copy)
    shape.enum_type.extend(sorted(file.enum_type, key=lambda e: e.name))
    for service in file.service:
        shape.service.add(name=service.name).method.extend(sorted(service.method, key=lambda m: m.name))
    return shape


@pytest.mark.parametrize(
    ("vendored", "served_by"),
    [
        ("google/rpc/status.proto", status_pb2),
        ("google/rpc/error_details.proto", error_details_pb2),
        ("grpc/health/v1/health.proto", health_pb2),
    ],
)
def test_vendored_protos_describe_what_the_server_sends(vendored: str, served_by: ModuleType) -> None:
    """The copies under protos/ decode what the server's googleapis-common-protos and grpcio-health-checking
    encode: the same messages, fields, enums and methods."""
    committed = next(f for f in _committed_set().file if f.name == vendored)
    installed = descriptor_pb2.FileDescriptorProto()
    served_by.DESCRIPTOR.CopyToProto(installed)

    assert _shape(committed) == _shape(installed)
