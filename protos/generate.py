"""Generate what `make protos` commits from the contract: the Python code in `client/generated` and the
FileDescriptorSet `protos/streamflow_serving_v1.binpb` (both checked for staleness by tests/test_contract.py).

The code imports as its proto package says, `streamflow.serving.v1`: `streamflow/serving` links to it in
this repository, and each distribution maps that name to the folder, so the imports grpcio-tools writes
(`from streamflow.serving.v1 import ...`) work as written, and a user who generates stubs of their own gets
the same module names. Python code is generated for the contract only: the vendored
google/rpc and grpc/health protos have theirs in googleapis-common-protos and grpcio-health-checking.

The descriptor set holds every file under `protos/` with its imports (the well-known types) and comments, so
`protoc --descriptor_set_in`, `grpcurl -protoset` (error details included) and proto-loader's
`loadFileDescriptorSetFromBuffer` need nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
CONTRACT_DIR = PROTO_DIR / "streamflow"
DEFAULT_OUT = ROOT / "client" / "generated"
DESCRIPTOR_SET = PROTO_DIR / "streamflow_serving_v1.binpb"
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"


def proto_files(under: Path = PROTO_DIR) -> list[Path]:
    """Every .proto under `under`, relative to `protos/`."""
    return sorted(p.relative_to(PROTO_DIR) for p in under.rglob("*.proto"))


def _protoc(*args: str) -> None:
    if protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{WELL_KNOWN}", *args]) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def generate(out: Path) -> list[Path]:
    """Generate messages, gRPC stubs and type stubs of the contract into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    contract = proto_files(CONTRACT_DIR)
    for rel in contract:
        _protoc(f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", str(rel))
    written = sorted(p for p in out.rglob("*.py*") if p.suffix in {".py", ".pyi"})
    # Packages from `streamflow.serving` down; `streamflow` itself is the project's (or, with the client
    # alone installed, a namespace package).
    top = out / "streamflow"
    for folder in {p.parent for p in written}:
        while folder != top:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
            folder = folder.parent
    return sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in {".py", ".pyi"})


def write_descriptor_set(path: Path) -> Path:
    """Write the FileDescriptorSet of every file under `protos/`, imports and comments included."""
    _protoc(
        f"--descriptor_set_out={path}",
        "--include_imports",
        "--include_source_info",
        *map(str, proto_files()),
    )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--descriptor-set", type=Path, default=DESCRIPTOR_SET)
    args = parser.parse_args()
    for path in [*generate(args.out), write_descriptor_set(args.descriptor_set)]:
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
