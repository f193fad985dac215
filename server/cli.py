"""`streamflow serve`: the gRPC server, configured by `STREAMFLOW_*` settings."""

from __future__ import annotations

import argparse
from typing import Any

from streamflow.settings import Settings


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve churn predictions over gRPC (STREAMFLOW_PORT, STREAMFLOW_MODEL_URI, ...)",
        description="Serve the registry's Production model over gRPC until SIGTERM; settings come from "
        "STREAMFLOW_* environment variables.",
    )
    parser.set_defaults(handler=handle_serve)


def handle_serve(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here so other subcommands do not pay for gRPC, MLflow and Feast imports.
    from server.app import serve

    return serve(settings)
