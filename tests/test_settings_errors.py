"""Settings that cannot work together, and the `streamflow add-token` command: one clear line each, no
traceback.

Run through the `streamflow` command's own `main`, as a shell user meets them, and once as a real process.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from streamflow.cli import main
from streamflow.server.auth import TokenTable
from tests.fixtures.processes import STREAMFLOW, serve_env


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"STREAMFLOW_TLS_CERT_FILE": "/etc/tls/tls.crt"},
            "error: set both STREAMFLOW_TLS_CERT_FILE and STREAMFLOW_TLS_KEY_FILE, or neither",
        ),
        (
            {"STREAMFLOW_TLS_KEY_FILE": "/etc/tls/tls.key"},
            "error: set both STREAMFLOW_TLS_CERT_FILE and STREAMFLOW_TLS_KEY_FILE, or neither",
        ),
        (
            {"STREAMFLOW_TLS_CLIENT_CA_FILE": "/etc/tls/ca.crt"},
            "error: STREAMFLOW_TLS_CLIENT_CA_FILE needs STREAMFLOW_TLS_CERT_FILE and _KEY_FILE",
        ),
        (
            {"STREAMFLOW_PORT": "50051", "STREAMFLOW_HEALTH_PORT": "50051"},
            "error: STREAMFLOW_HEALTH_PORT must differ from STREAMFLOW_PORT (50051)",
        ),
        (
            {"STREAMFLOW_PORT": "50051", "STREAMFLOW_HTTP_PORT": "50051"},
            "error: STREAMFLOW_HTTP_PORT (50051) must differ from the other ports",
        ),
        (
            {"STREAMFLOW_RATE_LIMIT_RPS": "-1"},
            "error: STREAMFLOW_RATE_LIMIT_RPS: Input should be greater than or equal to 0",
        ),
        (
            {"STREAMFLOW_RUNTIME": "gpu"},
            "error: STREAMFLOW_RUNTIME: Input should be 'auto', 'onnx' or 'sklearn'",
        ),
    ],
)
def test_settings_that_cannot_work_together_are_one_line_and_exit_2(
    env: dict[str, str], line: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    code = main(["serve"])

    assert code == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_the_command_itself_refuses_them_without_a_traceback() -> None:
    env = serve_env(STREAMFLOW_TLS_CERT_FILE="/etc/tls/tls.crt")
    result = subprocess.run(
        [str(STREAMFLOW), "serve"], env=env, capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 2
    assert (
        result.stderr == "error: set both STREAMFLOW_TLS_CERT_FILE and STREAMFLOW_TLS_KEY_FILE, or neither\n"
    )


def test_add_token_prints_the_token_once_and_stores_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens"

    assert main(["add-token", "billing", "--tokens-file", str(path)]) == 0

    token = capsys.readouterr().out.strip()
    assert token and token not in path.read_text()
    assert TokenTable.parse(path.read_text(), str(path)).name_of(token) == "billing"


def test_add_token_without_a_tokens_file_says_how_to_name_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["add-token", "billing"]) == 1
    assert capsys.readouterr().err == (
        "error: name the tokens file: --tokens-file PATH or STREAMFLOW_AUTH_TOKENS_FILE\n"
    )


def test_add_token_refuses_a_name_it_cannot_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens"

    assert main(["add-token", "bad name!", "--tokens-file", str(path)]) == 1

    assert capsys.readouterr().err == (
        "error: caller name 'bad name!' is not usable: 1 to 64 characters of [A-Za-z0-9._@-], starting with "
        "a letter or a digit\n"
    )
    assert not path.exists()
