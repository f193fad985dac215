"""Generate the Python code of the contract into `client/generated` (also used by the staleness test).

grpcio-tools writes `from streamflow.serving.v1 import ...` into the stubs, a path that only exists under the
output folder; the import is rewritten to the package path so the generated code imports as
`client.generated.streamflow.serving.v1`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
DEFAULT_OUT = ROOT / "client" / "generated"
OUT_PACKAGE = "client.generated"
# Copied at build time for buf: it cannot fetch googleapis from the Buf Schema Registry on these machines.
THIRD_PARTY_DIR = ROOT / "build" / "third_party_protos"
GOOGLE_RPC_PROTOS = ("status.proto", "error_details.proto")


def proto_files() -> list[Path]:
    """Every .proto of the contract, relative to `protos/`."""
    return sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*.proto"))


def copy_google_rpc_protos() -> Path:
    """Copy google/rpc protos from the installed googleapis-common-protos into build/ for buf."""
    import google.rpc

    src = Path(next(iter(google.rpc.__path__)))
    dest = THIRD_PARTY_DIR / "google" / "rpc"
    dest.mkdir(parents=True, exist_ok=True)
    for name in GOOGLE_RPC_PROTOS:
        shutil.copyfile(src / name, dest / name)
    return THIRD_PARTY_DIR


def generate(out: Path) -> list[Path]:
    """Generate messages, gRPC stubs and type stubs into `out`; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    import google.rpc

    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    for rel in proto_files():
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{googleapis}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_DIR / rel),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {rel}")
    written = sorted(p for p in out.rglob("*.py*") if p.suffix in {".py", ".pyi"})
    for path in written:
        text = path.read_text()
        for rel in proto_files():
            package = ".".join(rel.parent.parts)
            text = text.replace(f"from {package} import", f"from {OUT_PACKAGE}.{package} import")
        path.write_text(text)
    for folder in {p.parent for p in written} | {out}:
        while folder != out.parent:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
            folder = folder.parent
    return sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in {".py", ".pyi"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    copy_google_rpc_protos()
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if path.is_relative_to(args.out.parent) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
