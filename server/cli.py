"""`streamflow serve`: the gRPC server, configured by `STREAMFLOW_*` settings; `streamflow add-token`: a new
caller in its tokens file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from streamflow.errors import StreamflowError
from streamflow.settings import Settings


def register(subparsers: Any) -> None:
    """Add the `serve` and `add-token` subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve churn predictions over gRPC (STREAMFLOW_PORT, STREAMFLOW_MODEL_URI, ...)",
        description="Serve the registry's Production model over gRPC until SIGTERM; settings come from "
        "STREAMFLOW_* environment variables.",
    )
    parser.set_defaults(handler=handle_serve)
    tokens: argparse.ArgumentParser = subparsers.add_parser(
        "add-token",
        help="issue a token for a new caller and add its hash to the tokens file",
        description="Make a random token for caller NAME, add `NAME:sha256` to the tokens file (a running "
        "server takes it within a second) and print the token once on stdout: it is stored nowhere else.",
    )
    tokens.add_argument("name", metavar="NAME", help="the caller, as logs and metrics will name it")
    tokens.add_argument(
        "--tokens-file",
        type=Path,
        help="the file to add to (default: STREAMFLOW_AUTH_TOKENS_FILE)",
    )
    tokens.set_defaults(handler=handle_add_token)


def handle_serve(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here so other subcommands do not pay for gRPC, MLflow and Feast imports.
    from streamflow.server.app import serve

    return serve(settings)


def handle_add_token(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.server.auth import add_token

    path = args.tokens_file or settings.auth_tokens_file
    if path is None:
        raise StreamflowError("name the tokens file: --tokens-file PATH or STREAMFLOW_AUTH_TOKENS_FILE")
    print(add_token(path, args.name))
    return 0
