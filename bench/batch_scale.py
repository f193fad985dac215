"""`make bench-scale` (issue 16): the offline steps in this process and on Ray, on the same cores, by size.

For each size (default 100,000 and 1,000,000 users; `--users 5000,20000` for others) an embedded home of its
own under `.streamflow-bench/batch-<users>` is bootstrapped once (the demo generator `bench/scale.py` uses,
`demo_data.generate_tables`; 51 trees) and kept for the next run. Then each step runs with
STREAMFLOW_COMPUTE=local and with ray (one local Ray instance with `--cpus`, default 2, started before the
clock runs, so its start-up is not in the figures; a cluster's start is not either):

- materialize: both snapshots, all four views, into the SQLite online store;
- training set: `training_set` at the first snapshot (Feast's point-in-time join, labels attached);
- score-all: every user of the last snapshot, features included, to Parquet.

`--profile production` runs the same steps on the production profile's Feast: a PostgreSQL database
`streamflow_bench_<users>` (offline store and registry) and the Redis online store under the key prefix of
the same name, both kept for the next run; the model registry is a SQLite MLflow in the home (not measured).
There Feast's Ray offline store does not apply (it reads files): PostgreSQL pulls each view's latest rows and
answers the training set's join on either engine, so on Ray the Ray workers write Redis and Ray Data scores,
and the training set runs once, locally.

Printed: seconds per step and engine, and microseconds per user, so growth with size shows as a flat or
rising per-user cost. The machine's load average is printed before and after: on a shared machine the
figures move with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from streamflow.feature_repo import store
from streamflow.feature_repo.compute import Compute
from streamflow.feature_repo.definitions import SNAPSHOT_DATES
from streamflow.settings import Profile, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("materialize", "training set", "score-all")


def _settings(users: int, profile: Profile) -> Settings:
    common = {
        "users": users,
        "n_estimators": 51,  # odd: no tie at 0.5, so the ONNX export passes its parity check
        "mlflow_tracking_uri": None,
    }
    if profile is Profile.EMBEDDED:
        return load_settings(home=ROOT / ".streamflow-bench" / f"batch-{users}", **common)
    from streamflow import postgres

    name = f"streamflow_bench_{users}"
    home = ROOT / ".streamflow-bench" / f"batch-production-{users}"
    base = load_settings(profile=Profile.PRODUCTION)
    dsn = postgres.with_database(base.postgres_dsn, name)
    postgres.ensure_database(dsn)
    return load_settings(
        **common
        | {
            "profile": Profile.PRODUCTION,
            "home": home,
            "postgres_dsn": dsn,
            "redis_key_prefix": name,
            "mlflow_tracking_uri": f"sqlite:///{home.resolve() / 'mlflow' / 'mlflow.db'}",
        }
    )


def _timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def measure(
    users: int, profile: Profile, engines: list[Compute], skip: set[str]
) -> dict[tuple[str, Compute], float]:
    from streamflow.batch.score_all import score_all
    from streamflow.training.bootstrap import bootstrap
    from streamflow.training.dataset import training_set

    settings = _settings(users, profile)
    print(f"# {users:,} users: bootstrapping {settings.home} (once; kept for the next run)", flush=True)
    settings.home.mkdir(parents=True, exist_ok=True)
    bootstrap(settings)
    seconds: dict[tuple[str, Compute], float] = {}
    for engine in engines:
        on = settings.model_copy(update={"compute": engine})
        scores = settings.home / f"scores-{engine}"
        steps: dict[str, Callable[[], object]] = {
            "materialize": partial(store.materialize, on),
            "training set": partial(training_set, on, SNAPSHOT_DATES[0]),
            "score-all": partial(score_all, on, SNAPSHOT_DATES[-1], compute=engine, output_dir=scores),
        }
        for name, step in steps.items():
            if name in skip or (
                name == "training set" and engine is Compute.RAY and profile is Profile.PRODUCTION
            ):
                continue
            seconds[name, engine] = _timed(step)
            print(f"{users:>10,} {name:<13} {engine:<5} {seconds[name, engine]:9.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="100000,1000000", help="comma-separated sizes")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--engines", default="local,ray", help="local, ray or both")
    parser.add_argument("--skip", default="", help="steps to leave out, comma-separated (e.g. materialize)")
    parser.add_argument("--profile", default="embedded", choices=[p.value for p in Profile])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engines = [Compute(name) for name in args.engines.split(",")]
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    print(f"load average before: {os.getloadavg()}", flush=True)
    if Compute.RAY in engines:
        import ray

        ray.init(
            num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
        )
    profile = Profile(args.profile)
    results = {int(users): measure(int(users), profile, engines, skip) for users in args.users.split(",")}
    print(f"load average after: {os.getloadavg()}")
    print("\n| users | step | " + " | ".join(f"{e} s | {e} µs/user" for e in engines) + " |")
    print("|---|---|" + "---|---|" * len(engines))
    for users, seconds in results.items():
        for name in STEPS:
            if name in skip:
                continue
            cells = " | ".join(
                f"{seconds[name, e]:.1f} | {seconds[name, e] / users * 1e6:,.0f}"
                if (name, e) in seconds
                else "— | —"
                for e in engines
            )
            print(f"| {users:,} | {name} | {cells} |")


if __name__ == "__main__":
    main()
