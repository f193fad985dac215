"""The `streamflow` command: one entry point whose subcommands each package registers itself."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from streamflow.errors import StreamflowError
from streamflow.settings import load_settings


def build_parser() -> argparse.ArgumentParser:
    """The parser with every package's subcommands."""
    # Imported here so `streamflow --help` does not pay for the imports of the packages it does not run.
    from streamflow.batch import cli as batch_cli
    from streamflow.server import cli as server_cli
    from streamflow.training import cli as training_cli
    from streamflow.training import ingest, monitoring_cli

    parser = argparse.ArgumentParser(prog="streamflow", description="StreamFlow churn pipeline and server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (
        training_cli.register,
        ingest.register,
        server_cli.register,
        batch_cli.register,
        monitoring_cli.register,
    ):
        register(commands)
    return parser


_PROCESS_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
"""Blocked while the packages are imported: native threads started then (OpenBLAS's, at numpy's import) keep
that mask for good, so they never take a signal meant for the main thread. Taken there, a SIGTERM waited for
the main thread's next pass (a supervisor reported SERVING up to a second into its drain) and a SIGCHLD was
lost."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; expected failures exit 1 with one sentence on stderr and no traceback."""
    try:
        settings = load_settings()
    except ValidationError as exc:
        for problem in exc.errors():
            where = ".".join(str(part) for part in problem["loc"])
            name = f"STREAMFLOW_{where.upper()}: " if where else ""
            print(f"error: {name}{problem['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _PROCESS_SIGNALS)
    try:
        # Before the parser imports the packages: MLflow reads its logging variables when it is imported.
        from streamflow.server.logs import configure_logging

        configure_logging(settings)
        parser = build_parser()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args, settings) or 0)
    except StreamflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
