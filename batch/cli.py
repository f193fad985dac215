"""`streamflow score-all`: every user of a snapshot scored by the Production version."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from streamflow.settings import Settings


def _batch_users(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: Any) -> None:
    """Add the `score-all` subcommand."""
    from streamflow.batch.score_all import BATCH_USERS

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "score-all",
        help="score every user of a snapshot with the Production version (STREAMFLOW_COMPUTE=local|ray)",
        description="Score every user of the snapshot dated --as-of with the version STREAMFLOW_MODEL_URI "
        "names, with the server's model and feature rules, and write (user_id, as_of, model_version, "
        "churn_probability, label, refusal) to <home>/scores (embedded) or the churn_scores table "
        "(production), replacing a previous run's rows of the same date and version.",
    )
    parser.add_argument("--as-of", required=True, help="snapshot date, e.g. 2024-02-29")
    parser.add_argument(
        "--batch-size",
        type=_batch_users,
        default=BATCH_USERS,
        help=f"users per batch (default {BATCH_USERS})",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=handle_score_all)


def handle_score_all(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.batch.score_all import score_all
    from streamflow.training.cli import _as_of, _quiet

    _quiet()
    logging.getLogger("ray").setLevel(logging.WARNING)
    summary = score_all(settings, _as_of(args.as_of), batch_users=args.batch_size)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return 0
    refused = ", ".join(f"{reason} {count}" for reason, count in sorted(summary.refused.items())) or "none"
    threshold = "n/a" if summary.top_decile_threshold is None else f"{summary.top_decile_threshold:.4f}"
    print(
        f"scored {summary.scored} of {summary.users} users of {summary.as_of} with version "
        f"{summary.model_version} in {summary.seconds:.1f} s; refused: {refused}; top-decile threshold "
        f"{threshold}; written to {summary.output}"
    )
    return 0
