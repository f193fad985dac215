"""Training subcommands of `streamflow`: generate, apply, materialize, train, promote, rollback, bootstrap."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from datetime import date

from streamflow.errors import StreamflowError
from streamflow.feature_repo.definitions import SNAPSHOT_DATES
from streamflow.settings import Profile, Settings

# Feast logs every registry cache refresh at INFO; the steps' own progress lines are what a person wants.
_NOISY_LOGGERS = ("feast", "alembic")


def _quiet() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow's own use of deprecated SQLAlchemy options is not something a user of this CLI can act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\.")


def _users(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _as_of(text: str) -> date:
    # A StreamflowError rather than an argparse error, so every bad input reads as one sentence.
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise StreamflowError(f"--as-of {text!r} is not a date like 2024-01-31.") from exc


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.training.bootstrap import load_demo_data

    _quiet()
    users = args.users or settings.users
    seed = settings.seed if args.seed is None else args.seed
    fingerprint = load_demo_data(settings, users, seed)
    where = "PostgreSQL" if settings.profile is Profile.PRODUCTION else str(settings.data_dir)
    print(f"demo data for {users} users (seed {seed}) written to {where}; fingerprint {fingerprint[:12]}")
    return 0


def _apply(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.feature_repo import store

    _quiet()
    store.apply(settings)
    print("applied the user entity, 4 feature views and feature service churn_model_v1")
    return 0


def _materialize(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.feature_repo import store
    from streamflow.training.demo_data import written_manifest

    _quiet()
    manifest = written_manifest(settings) if settings.profile is Profile.EMBEDDED else None
    store.materialize(settings, None if manifest is None else str(manifest["fingerprint"]))
    print("materialized the snapshots into the online store")
    return 0


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.training.train import train

    _quiet()
    result = train(settings, _as_of(args.as_of))
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        auc = result.metrics["val_auc"]
        print(
            f"registered {result.model_name} version {result.version} (as of {result.as_of}, AUC {auc:.4f})"
        )
    return 0


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.training.registry import EvidenceRequired, promote

    _quiet()
    required = EvidenceRequired(args.min_shadow_users, args.min_agreement)
    done = promote(settings, args.version, args.stage, force=args.force, evidence=required)
    line = f"{settings.model_name} version {done.version} is now in {done.stage}"
    if done.previous_production is not None:
        line += f"; version {done.previous_production} was archived"
    if done.gate is not None:
        line += (
            f" (gate on {done.gate.as_of}: AUC {done.gate.candidate_auc:.4f} vs "
            f"{done.gate.production_auc:.4f})"
        )
    print(line)
    return 0


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.training.registry import rollback

    _quiet()
    done = rollback(settings)
    print(
        f"{settings.model_name} rolled back: version {done.version} is in Production again, "
        f"version {done.previous_production} was archived"
    )
    return 0


def _bootstrap(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.training.bootstrap import bootstrap

    _quiet()
    report = bootstrap(settings)
    if report.production_version is None:
        raise StreamflowError("Bootstrap finished without a Production model; see the log above.")
    print(
        f"bootstrap done in {report.seconds:.1f} s: {settings.model_name} version "
        f"{report.production_version} in Production, online store materialized"
    )
    return 0


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training subcommands to the `streamflow` parser."""
    parser = subparsers.add_parser(
        "generate", help="generate the demo snapshot tables (Parquet, or PostgreSQL in production)"
    )
    parser.add_argument("--users", type=_users, help="subscribers at the first snapshot (STREAMFLOW_USERS)")
    parser.add_argument("--seed", type=int, help="generator seed (STREAMFLOW_SEED)")
    parser.set_defaults(handler=_generate)

    parser = subparsers.add_parser("apply", help="register the entity, feature views and feature service")
    parser.set_defaults(handler=_apply)

    parser = subparsers.add_parser("materialize", help="load every snapshot into the online store")
    parser.set_defaults(handler=_materialize)

    parser = subparsers.add_parser("train", help="train at a snapshot date and register a new model version")
    parser.add_argument(
        "--as-of",
        default=SNAPSHOT_DATES[0].isoformat(),
        help=f"snapshot date to train at (default {SNAPSHOT_DATES[0]})",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary (version, run id, metrics)")
    parser.set_defaults(handler=_train)

    parser = subparsers.add_parser(
        "promote", help="move a model version to a stage; the alias of the same name follows"
    )
    parser.add_argument("version", help="model version number")
    # Checked by the registry, not argparse, so a wrong stage is one sentence like every other error.
    parser.add_argument(
        "--stage", required=True, help="None, Staging, Production or Archived (Production is gated)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="promote to Production despite the gate, or move the Production version out of it",
    )
    parser.add_argument(
        "--min-shadow-users",
        type=_non_negative_int,
        help="to Production: require shadow evidence against the current Production on at least N users",
    )
    parser.add_argument(
        "--min-agreement",
        type=_share,
        help="to Production: require shadow evidence of at least this label agreement (0 to 1)",
    )
    parser.set_defaults(handler=_promote)

    parser = subparsers.add_parser(
        "rollback", help="put the previous Production version back into Production"
    )
    parser.set_defaults(handler=_rollback)

    parser = subparsers.add_parser(
        "bootstrap", help="generate, apply, materialize, train and promote; skips what is already done"
    )
    parser.set_defaults(handler=_bootstrap)
