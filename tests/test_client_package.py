"""The client installs on its own: `pip install ./client` into a bare venv brings gRPC and protobuf only, and
`ChurnClient` and `streamflow-client` from it score against a real server.

The venv is made once per run; pip reaches the package index the same way `make install` does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamflow.training.demo_data import FIRST_USER_ID

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DEPENDENCIES = {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos", "typing-extensions"}
"""What the client may bring: its four requirements and what they need in turn."""
VENV_TOOLS = {"pip", "setuptools"}


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with nothing but `pip install ./client` (from a copy: pip builds in the source folder)."""
    base = tmp_path_factory.mktemp("client-only")
    source = shutil.copytree(
        ROOT / "client", base / "client", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=120)
    python = base / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        check=True,
        timeout=600,
    )
    yield base / "venv" / "bin"
    shutil.rmtree(base)  # 50 MB of venv: not worth keeping after a pass


def test_the_client_brings_only_grpc_and_protobuf(bare_venv: Path) -> None:
    listed = subprocess.run(
        [str(bare_venv / "python"), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    installed = {package["name"].lower().replace("_", "-") for package in json.loads(listed.stdout)}

    assert installed - VENV_TOOLS - {"streamflow-client"} <= CLIENT_DEPENDENCIES, installed
    assert "streamflow-client" in installed


def test_the_installed_client_and_cli_score_against_a_server(bare_venv: Path, served_embedded: str) -> None:
    script = (
        "from streamflow.client import ChurnClient\n"
        f"with ChurnClient({served_embedded!r}) as churn:\n"
        f"    print(churn.predict({FIRST_USER_ID!r}).model.version)\n"
    )
    library = subprocess.run(
        [str(bare_venv / "python"), "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    cli = subprocess.run(
        [str(bare_venv / "streamflow-client"), "predict", FIRST_USER_ID, "--target", served_embedded],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert library.returncode == 0, library.stderr
    assert library.stdout == "1\n"
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["user_id"] == FIRST_USER_ID
