"""The MLflow tracking server of the production profile: PostgreSQL backend store, served artifacts.

`make mlflow-server` runs ``python -m streamflow.mlflow_server``: it creates the backend database if missing,
starts ``mlflow server`` in the background on the address of MLFLOW_TRACKING_URI (default 127.0.0.1:5000), and
returns once ``/health`` answers, printing where the server, its log and its pid file are. ``--foreground``
replaces the process with the server instead (containers). Tests reuse `start` and `wait_until_ready`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from streamflow import postgres
from streamflow.errors import StreamflowError
from streamflow.settings import Settings, load_settings

READY_TIMEOUT_S = 180.0
"""How long a start waits for ``/health``: the first start on an empty database runs MLflow's migrations."""


def backend_store_dsn(settings: Settings) -> str:
    """The MLflow backend database: ``<dbname>_mlflow`` beside the snapshot database, same server."""
    return postgres.with_database(
        settings.postgres_dsn, f"{postgres.database_name(settings.postgres_dsn)}_mlflow"
    )


def default_artifacts_destination(settings: Settings) -> Path:
    """Where the server keeps the artifacts it serves, unless told otherwise."""
    return (settings.home / "mlflow-server" / "artifacts").resolve()


def server_command(
    *,
    host: str,
    port: int,
    backend_dsn: str,
    artifacts_destination: str,
    workers: int,
    allowed_hosts: str | None = None,
) -> list[str]:
    """The ``mlflow server`` command line, run by this interpreter so the venv's MLflow is the one used."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        postgres.sqlalchemy_url(backend_dsn, "psycopg2"),
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--workers",
        str(workers),
    ]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    return command


def ensure_backend_database(backend_dsn: str) -> None:
    """Create the backend database if missing; an unreachable PostgreSQL is one clear error."""
    try:
        postgres.ensure_database(backend_dsn)
    except postgres.psycopg.OperationalError as exc:
        raise StreamflowError(
            f"cannot reach PostgreSQL at {postgres.describe(backend_dsn)} for the MLflow backend store: "
            f"{str(exc).strip()}"
        ) from exc


JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
"""MLflow's switch for its job runner: off unless set (see `start`)."""


@dataclass
class MlflowServer:
    """A running ``mlflow server`` started by `start`."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group (uvicorn and its workers), SIGKILL it if it lingers."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start(
    *,
    host: str,
    port: int,
    backend_dsn: str,
    artifacts_destination: str,
    log_path: Path,
    workers: int = 1,
    allowed_hosts: str | None = None,
) -> MlflowServer:
    """Create the backend database if missing and start the server in its own session, logging to log_path."""
    ensure_backend_database(backend_dsn)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = server_command(
        host=host,
        port=port,
        backend_dsn=backend_dsn,
        artifacts_destination=artifacts_destination,
        workers=workers,
        allowed_hosts=allowed_hosts,
    )
    # MLflow's job runner (GenAI evaluation jobs, which nothing here submits) would start seven huey consumer
    # processes of about 220 MB each beside the server, left running if the server is killed.
    env = {**os.environ, JOB_EXECUTION: os.environ.get(JOB_EXECUTION, "false")}
    with log_path.open("ab") as log:
        # Own session: stopping the group stops uvicorn's workers too, and a Ctrl-C of `make` does not.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    return MlflowServer(url=f"http://{host}:{port}", process=process, log_path=log_path)


def is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    """True if an MLflow server answers ``GET /health`` at url."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_until_ready(server: MlflowServer, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll ``/health`` until it answers; a server that exits or never answers raises with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while not is_healthy(server.url):
        if server.process.poll() is not None:
            raise StreamflowError(
                f"mlflow server exited with code {server.process.returncode} before it was ready; "
                f"its log ({server.log_path}) ends with: {_tail(server.log_path)}"
            )
        if time.monotonic() > deadline:
            server.stop()
            raise StreamflowError(
                f"mlflow server did not answer {server.url}/health within {timeout_s:.0f} s; "
                f"its log ({server.log_path}) ends with: {_tail(server.log_path)}"
            )
        time.sleep(0.5)


def _tail(path: Path, lines: int = 5) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(text[-lines:]) or "(empty)"


def _address(settings: Settings) -> tuple[str, int]:
    """Host and port of MLFLOW_TRACKING_URI when it is an http URL, else MLflow's default 127.0.0.1:5000."""
    parts = urlsplit(settings.tracking_uri)
    if parts.scheme in ("http", "https") and parts.hostname:
        return parts.hostname, parts.port or 5000
    return "127.0.0.1", 5000


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    """The command line of `python -m streamflow.mlflow_server` (docker-compose.yml runs it too)."""
    default_host, default_port = _address(settings)
    parser = argparse.ArgumentParser(prog="python -m streamflow.mlflow_server", description=__doc__)
    parser.add_argument("--host", default=default_host, help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=default_port, help="port (default: %(default)s)")
    parser.add_argument(
        "--artifacts-destination",
        default=str(default_artifacts_destination(settings)),
        help="where served artifacts are stored: a folder or an object-store URI (default: %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default: 2)")
    parser.add_argument("--allowed-hosts", help="Host headers to accept beyond localhost and private IPs")
    parser.add_argument("--foreground", action="store_true", help="run in this process (containers)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`make mlflow-server`: start (or find running) the tracking server and report where it is."""
    settings = load_settings()
    args = build_parser(settings).parse_args(argv)

    backend_dsn = backend_store_dsn(settings)
    url = f"http://{args.host}:{args.port}"
    try:
        if args.foreground:
            ensure_backend_database(backend_dsn)
            command = server_command(
                host=args.host,
                port=args.port,
                backend_dsn=backend_dsn,
                artifacts_destination=args.artifacts_destination,
                workers=args.workers,
                allowed_hosts=args.allowed_hosts,
            )
            os.execv(command[0], command)
        if is_healthy(url):
            print(f"MLflow server already running at {url}")
            return 0
        state_dir = settings.home.resolve() / "mlflow-server"
        server = start(
            host=args.host,
            port=args.port,
            backend_dsn=backend_dsn,
            artifacts_destination=args.artifacts_destination,
            log_path=state_dir / "server.log",
            workers=args.workers,
            allowed_hosts=args.allowed_hosts,
        )
        wait_until_ready(server)
    except StreamflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    (state_dir / "server.pid").write_text(f"{server.process.pid}\n")
    print(
        f"MLflow server ready at {url} (backend {postgres.describe(backend_dsn)}, artifacts "
        f"{args.artifacts_destination}); log {server.log_path}; "
        f"stop it with: kill $(cat {state_dir}/server.pid)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
