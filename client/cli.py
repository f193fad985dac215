"""`streamflow-client`: call the PredictionService from a shell and print JSON.

Results go to stdout, as JSON; `predict --explain` prints a small table of the features that moved the
score most instead. A failed call prints its typed error (code, reason, metadata, violations) as JSON on
stderr and exits 1. In `batch`, a user that cannot be scored is a result with an `error`, not a failure.
TLS files that cannot be used are one line on stderr and exit 2. The token is best passed in the
STREAMFLOW_TOKEN environment variable: a command-line argument shows in `ps`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

import grpc

from streamflow.client.churn_client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, ChurnClient
from streamflow.client.errors import ChurnServiceError
from streamflow.client.results import Prediction

TOKEN_VARIABLE = "STREAMFLOW_TOKEN"


def _positive_seconds(text: str) -> float:
    seconds = float(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return seconds


def _add_connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options of the connection, accepted before and after the command. Only the main parser has
    defaults: after the command, an option left out must not overwrite one given before it."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--target", default=default(DEFAULT_TARGET), help=f"server host:port (default {DEFAULT_TARGET})"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"deadline of the call in seconds, retries included (default {DEFAULT_TIMEOUT_S})",
    )
    parser.add_argument(
        "--ca-file",
        default=default(None),
        help="PEM CA bundle the server's certificate must chain to (turns TLS on)",
    )
    parser.add_argument(
        "--cert-file",
        default=default(None),
        help="PEM client certificate for mTLS (turns TLS on; needs --key-file)",
    )
    parser.add_argument("--key-file", default=default(None), help="PEM private key of --cert-file")
    parser.add_argument(
        "--server-name",
        default=default(None),
        help="name the server's certificate must carry, if not the host's",
    )
    parser.add_argument(
        "--token",
        default=default(os.environ.get(TOKEN_VARIABLE)),
        help=f"sent as `authorization: Bearer TOKEN` (default: ${TOKEN_VARIABLE}, which `ps` does not show)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamflow-client", description=__doc__)
    _add_connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser("predict", help="score one user")
    predict.add_argument("user_id", metavar="USER_ID")
    predict.add_argument(
        "--explain",
        action="store_true",
        help="print the features that moved the score most (exact TreeSHAP) as a table, not JSON",
    )
    predict.add_argument(
        "--top", type=int, default=5, metavar="N", help="with --explain: how many features (default 5)"
    )
    batch = commands.add_parser("batch", help="score many users, in order")
    batch.add_argument(
        "user_ids", metavar="USER_ID", nargs="*", help="ids to score; none (or -) reads them from stdin"
    )
    info = commands.add_parser("info", help="describe the model now answering")
    for command in (predict, batch, info):
        _add_connection_options(command, defaults=False)
    return parser


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, grpc.StatusCode):
        return value.name
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, indent=2)


def explanation_table(prediction: Prediction, base_value: float | None, top: int) -> str:
    """The prediction and its `top` largest contributions, with the value each feature had."""
    values = {f.name: f.value for f in prediction.features}
    shown = prediction.contributions[: max(top, 0)]
    width = max([len("feature"), *(len(c.name) for c in shown)])
    base = "unknown" if base_value is None else f"{base_value:.4f}"
    lines = [
        f"user {prediction.user_id}: churn probability {prediction.churn_probability:.4f} "
        f"({prediction.label.value}), model {prediction.model.name} version {prediction.model.version}",
        f"base value {base}; top {len(shown)} of {len(prediction.contributions)} contributions:",
        f"  {'feature':<{width}}  {'value':>12}  {'contribution':>12}",
    ]
    lines += [f"  {c.name:<{width}}  {values.get(c.name)!s:>12}  {c.contribution:>+12.4f}" for c in shown]
    rest = sum(c.contribution for c in prediction.contributions[len(shown) :])
    if len(prediction.contributions) > len(shown):
        lines.append(f"  {'(the others)':<{width}}  {'':>12}  {rest:>+12.4f}")
    return "\n".join(lines)


def _run(client: ChurnClient, args: argparse.Namespace) -> Any:
    """The JSON-ready result of the chosen command (a string is printed as it is)."""
    if args.command == "predict" and args.explain:
        prediction = client.predict(args.user_id, explain=True)
        return explanation_table(prediction, client.model_info().base_value, args.top)
    if args.command == "predict":
        return asdict(client.predict(args.user_id))
    if args.command == "batch":
        user_ids = args.user_ids if args.user_ids not in ([], ["-"]) else sys.stdin.read().split()
        return [
            {
                "user_id": result.user_id,
                "prediction" if isinstance(result.outcome, Prediction) else "error": asdict(result.outcome),
            }
            for result in client.batch_predict(user_ids)
        ]
    return asdict(client.model_info())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = ChurnClient(
            args.target,
            timeout=args.timeout,
            ca=args.ca_file,
            certificate=args.cert_file,
            key=args.key_file,
            server_name=args.server_name,
            token=args.token,
        )
    except OSError as error:
        print(f"streamflow-client: error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"streamflow-client: error: {error}", file=sys.stderr)
        return 2
    with client:
        try:
            output = _run(client, args)
        except ChurnServiceError as error:
            print(_dumps(asdict(error)), file=sys.stderr)
            return 1
    print(output if isinstance(output, str) else _dumps(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
