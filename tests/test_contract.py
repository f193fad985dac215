"""The v1 contract: buf lint passes, client/generated matches the protos, and nothing breaks v1.

Breaking changes are checked against `protos/released/streamflow_serving_v1.image.yaml`, a committed buf
image of the first released contract, not against `.git#branch=main`: CI runs on a fresh clone of main, where
main compared with itself can never fail, and a clone may lack history or tags. The image is plain YAML (no
source info) so a reviewer sees a baseline change in the diff. Refresh it only when cutting a release:
    buf build --path protos/streamflow --exclude-source-info \
        -o protos/released/streamflow_serving_v1.image.yaml
Each check also runs once on a deliberately broken copy of the contract, to prove it can fail.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / ".venv" / "bin" / "buf"
PROTO = Path("protos/streamflow/serving/v1/prediction_service.proto")
RELEASED_IMAGE = ROOT / "protos" / "released" / "streamflow_serving_v1.image.yaml"


def _load_generate() -> ModuleType:
    """protos/generate.py is a script, not a package module: load it from its path."""
    spec = importlib.util.spec_from_file_location("protos_generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generate() -> ModuleType:
    module = _load_generate()
    module.copy_google_rpc_protos()  # buf.yaml's second module, git-ignored
    return module


@pytest.fixture
def workspace(generate: ModuleType, tmp_path: Path) -> Path:
    """A copy of the buf workspace (buf.yaml, the contract, google/rpc) that a test may break."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos" / "streamflow", tmp_path / "protos" / "streamflow")
    shutil.copytree(generate.THIRD_PARTY_DIR, tmp_path / "build" / "third_party_protos")
    return tmp_path


def _buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
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


def test_buf_lint_passes(generate: ModuleType) -> None:
    result = _buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_fails_on_a_style_violation(workspace: Path) -> None:
    _edit(workspace, "string user_id = 1;\n}", "string userId = 1;\n}")
    result = _buf("lint", cwd=workspace)
    assert result.returncode != 0
    assert "FIELD_LOWER_SNAKE_CASE" in _rules(result)


def test_generated_code_is_not_stale(generate: ModuleType, tmp_path: Path) -> None:
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


def test_no_breaking_change_against_the_released_contract(generate: ModuleType) -> None:
    result = _buf("breaking", "--against", str(RELEASED_IMAGE), "--exclude-imports")
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_check_catches_a_deleted_field(workspace: Path) -> None:
    _edit(workspace, "  double churn_probability = 3;\n", "")
    result = _buf("breaking", "--against", str(RELEASED_IMAGE), "--exclude-imports", cwd=workspace)
    assert result.returncode != 0
    assert "FIELD_NO_DELETE" in _rules(result)
