"""A scoring worker: `python -m streamflow.server.worker`, started by the supervisor (server/workers.py).

It imports only what scoring needs (gRPC, numpy, onnxruntime, the online store's client): the model comes
from the control plane over the control channel (server/model_follower.py), as a scoring artifact. Its
arguments are descriptors it inherits and the supervisor's pid; its settings are the supervisor's, as JSON in
`STREAMFLOW_WORKER_SETTINGS`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from streamflow.server.app import serve_process
from streamflow.server.heap import limit_malloc_arenas
from streamflow.server.logs import configure_logging
from streamflow.server.model_follower import ModelFollower
from streamflow.server.prediction_log import forwarding_log
from streamflow.server.predictor import Predictor
from streamflow.server.quotas import SharedBuckets
from streamflow.server.shadow import ShadowScorer
from streamflow.server.workers import SETTINGS_VARIABLE, worker_process
from streamflow.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamflow.server.worker")
    parser.add_argument("--supervisor", type=int, required=True, help="the supervisor's pid")
    parser.add_argument("--control-fd", type=int, required=True, help="this worker's control channel")
    parser.add_argument("--bound-fd", type=int, required=True, help="the pipe that says the ports are bound")
    parser.add_argument(
        "--inherited-fd",
        type=int,
        action="append",
        default=[],
        help="the quota file (with quotas on), then the prediction log socket (with the log on)",
    )
    parser.add_argument("--replacement", action="store_true", help="binds only once a model serves")
    args = parser.parse_args(argv)
    limit_malloc_arenas()  # before any thread starts
    settings = Settings.model_validate_json(os.environ.pop(SETTINGS_VARIABLE))
    configure_logging(settings)

    def serve() -> int:
        follower = ModelFollower(settings, socket.socket(fileno=args.control_fd))
        follower.start()
        if args.replacement:
            # Bound at once, it would be handed new connections it could only answer MODEL_NOT_LOADED while
            # the other workers can serve them. SIGTERM ends the process meanwhile.
            follower.wait_until_serving()
        shadow = None
        if settings.shadow_model_uri:  # the control plane sends the shadow model and names its folder
            shadow = ShadowScorer(
                settings.shadow_model_uri,
                settings.shadow_sample,
                follower.shadow,
                logged=settings.prediction_log,
            )
        inherited = iter(args.inherited_fd)
        buckets = SharedBuckets(next(inherited)) if settings.rate_limit_rps else None
        prediction_log = None
        if settings.prediction_log:
            prediction_log = forwarding_log(next(inherited), settings.prediction_log_queue_size)
        return serve_process(
            settings,
            reuse_port=True,
            predictor=Predictor(settings, follower, shadow),
            buckets=buckets,
            prediction_log=prediction_log,
        )

    return worker_process(args.supervisor, args.bound_fd, serve)


if __name__ == "__main__":
    sys.exit(main())
