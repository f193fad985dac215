"""`streamflow load-outcomes`, `evaluate` and `drift`: closing the loop after serving."""

from __future__ import annotations

import argparse
import json
from datetime import date

from streamflow.settings import Settings


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-12-01") from None


def _load_outcomes(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.training.served import load_outcomes

    frame = load_outcomes(settings)
    churned = int(frame["churned"].sum())
    print(
        f"loaded the outcomes of {len(frame)} users of the {frame['as_of'].iloc[0].date()} snapshot "
        f"(observed {frame['observed_at'].iloc[0].date()}): {churned} churned"
    )
    return 0


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.training.evaluation import evaluate, table

    results = evaluate(settings, args.since, args.until, args.version, log_to_mlflow=not args.no_mlflow)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(table(results))
        for r in results:
            if r.mlflow_run_id:
                print(
                    f"version {r.model_version}: ROC and calibration curves in MLflow run {r.mlflow_run_id}"
                )
    return 0


def _drift(args: argparse.Namespace, settings: Settings) -> int:
    from streamflow.training.drift import drift, lines

    report = drift(settings, args.since, args.version, log_to_mlflow=not args.no_mlflow)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(lines(report)))
        if report.mlflow_run_id:
            print(f"charts per feature and the summary in MLflow run {report.mlflow_run_id}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the monitoring subcommands to the `streamflow` parser."""
    parser = subparsers.add_parser(
        "load-outcomes", help="load the churn outcomes of the month after the last snapshot"
    )
    parser.set_defaults(handler=_load_outcomes)

    parser = subparsers.add_parser(
        "evaluate", help="realized AUC, precision, recall and calibration of each served model version"
    )
    parser.add_argument("--since", type=_day, required=True, help="first day of predictions (UTC)")
    parser.add_argument("--until", type=_day, help="last day of predictions, included (default: today)")
    parser.add_argument("--version", help="evaluate this model version only")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-mlflow", action="store_true", help="log no evaluation run to MLflow")
    parser.set_defaults(handler=_evaluate)

    parser = subparsers.add_parser(
        "drift", help="PSI of each served feature against the serving version's training set"
    )
    parser.add_argument(
        "--since", type=_day, default=date(1970, 1, 1), help="first day of predictions (UTC; default: all)"
    )
    parser.add_argument("--version", help="model version (default: the one that served last)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of verdict lines")
    parser.add_argument("--no-mlflow", action="store_true", help="log no drift run to MLflow")
    parser.set_defaults(handler=_drift)
