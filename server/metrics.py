"""Prometheus metrics: what every call and the domain record, and the one `/metrics` endpoint of a server run.

Every process of a server run (the supervisor and each worker, replacements included) writes its samples to
files in one private folder (prometheus_client's multiprocess mode), and the endpoint adds up the files of all
of them, so counts survive a worker's death and one scrape sees the whole server. `multiprocess_dir` makes
that folder before any worker exists and removes it when the server stops.

Every metric has labels, so no sample exists until a `.labels(...)` child is made, and `multiprocess_dir`
can still switch the value storage to files: feast imports prometheus_client long before `serve` runs, and
the library picks its storage at import time from `PROMETHEUS_MULTIPROC_DIR`.

Per call the observer only increments pre-resolved children (`.labels` is resolved once per method and
code, then cached): it runs on every call.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
import numpy as np
from google.protobuf import descriptor_pool
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    multiprocess,
    start_http_server,
    values,
)

from streamflow.model_contract import is_churn

if TYPE_CHECKING:
    from streamflow.server.loaded_model import LoadedModel
    from streamflow.server.rpc import Call

log = logging.getLogger(__name__)

PREDICTION_SERVICE = "streamflow.serving.v1.PredictionService"

# --- gRPC, under the go-grpc-prometheus names and labels ----------------------------------------------------
_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds; finer than go-grpc-prometheus' defaults at the low end, where a Predict answers."""

GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _GRPC_LABELS)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.", (*_GRPC_LABELS, "grpc_code")
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from a call reaching the server to its answer (or end of stream).",
    _GRPC_LABELS,
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "streamflow_calls_in_flight",
    "Calls being handled now, summed over the live workers.",
    ("grpc_service",),
    multiprocess_mode="livesum",
)

# --- the domain ---------------------------------------------------------------------------------------------
MODEL_INFO = Gauge(
    "streamflow_model_info",
    "1 for the model each worker (pid) serves; 0 for one it served before.",
    ("model_name", "model_version", "runtime", "stage"),
    multiprocess_mode="liveall",
)
MODEL_RELOADS = Counter(
    "streamflow_model_reloads_total",
    "Model loads by model (served, shadow) and outcome (loaded, refused).",
    ("model", "outcome"),
)
PREDICTION_LOG_DROPPED = Counter(
    "streamflow_prediction_log_dropped_total",
    "Prediction log records dropped: the queue of `where` (worker, supervisor, server) was full, or records "
    "were not delivered at shutdown.",
    ("where",),
)
PREDICTION_LOG_WRITTEN = Counter(
    "streamflow_prediction_log_written_total", "Prediction log records written, by sink.", ("sink",)
)
FEATURE_PSI = Gauge(
    "streamflow_feature_psi",
    "Latest population stability index of each served feature against the serving version's training set "
    "(`streamflow drift`).",
    ("model_version", "feature"),
    multiprocess_mode="mostrecent",
)
PREDICTIONS = Counter("streamflow_predictions_total", "Users scored, by predicted label.", ("label",))
CHURN_PROBABILITY = Histogram(
    "streamflow_churn_probability",
    "Churn probability of each scored user.",
    ("model_version",),
    buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)),
)
FEATURE_READ_SECONDS = Histogram(
    "streamflow_feature_read_seconds",
    "One bulk online-store read of a scoring call.",
    ("store",),
    buckets=LATENCY_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "streamflow_inference_seconds",
    "One model run of a scoring call.",
    ("runtime",),
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "streamflow_batch_size",
    "Users per scoring call: `predict` is a batch of coalesced Predicts, `batch_predict` one BatchPredict.",
    ("kind",),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
FEATURE_PROBLEMS = Counter(
    "streamflow_feature_problems_total",
    "Users that could not be scored, by reason (unknown_user, missing, stale, invalid).",
    ("reason",),
)
STORE_ERRORS = Counter(
    "streamflow_online_store_errors_total",
    "Online-store reads that failed as unavailable (unreachable, or refused at once while it is down).",
    ("store",),
)
CALLER_CALLS = Counter(
    "streamflow_caller_calls_total",
    "PredictionService calls by caller (token name, certificate subject, anonymous or unauthenticated), "
    "method and status code.",
    ("caller", "grpc_method", "grpc_code"),
)
CALLER_USERS = Counter(
    "streamflow_caller_users_total", "Users scored by PredictionService calls, by caller.", ("caller",)
)
WORKER_RESTARTS = Counter(
    "streamflow_worker_restarts_total",
    "Worker processes the supervisor started again after a death.",
    ("worker",),
)
SWITCH_SKEW_SECONDS = Gauge(
    "streamflow_model_switch_skew_seconds",
    "Spread of the workers' swap instants at the last switch of model version (the version skew).",
    ("model_name",),
    multiprocess_mode="max",
)

ALL_METRICS = (
    CALLER_CALLS,
    CALLER_USERS,
    GRPC_STARTED,
    GRPC_HANDLED,
    GRPC_HANDLING_SECONDS,
    IN_FLIGHT,
    MODEL_INFO,
    MODEL_RELOADS,
    PREDICTIONS,
    CHURN_PROBABILITY,
    FEATURE_READ_SECONDS,
    INFERENCE_SECONDS,
    BATCH_SIZE,
    FEATURE_PROBLEMS,
    STORE_ERRORS,
    WORKER_RESTARTS,
    SWITCH_SKEW_SECONDS,
)

RELOAD_MODELS = ("served", "shadow")
RELOAD_OUTCOMES = ("loaded", "refused")
PROBLEM_REASONS = {
    "EntityNotFound": "unknown_user",
    "FeaturesMissing": "missing",
    "FeaturesStale": "stale",
    "FeaturesInvalid": "invalid",
}
"""Feature error class name -> `reason` label (by name: server.errors imports nothing from here)."""
BATCH_KINDS = ("predict", "batch_predict")

_reloads: dict[tuple[str, str], Counter] = {}
_predictions: dict[bool, Counter] = {}
_problems: dict[str, Counter] = {}
_batches: dict[str, Histogram] = {}
_scorings: dict[tuple[str, str, str], tuple[Histogram, Histogram, Histogram]] = {}
"""(store, runtime, model version) -> the read, inference and probability children of a model's scoring."""
_served: tuple[str, str, str, str] | None = None
_served_lock = threading.Lock()


def _make_fixed_children() -> None:
    """Make the children of the known label values in the storage in force now (see `multiprocess_dir`).
    Zero-valued children are exported at once, so `rate()` and alerts see every reason from the start."""
    global _reloads, _predictions, _problems, _batches, _scorings, _served
    _served = None
    _scorings = {}
    _reloads = {
        (model, outcome): MODEL_RELOADS.labels(model, outcome)
        for model in RELOAD_MODELS
        for outcome in RELOAD_OUTCOMES
    }
    _predictions = {True: PREDICTIONS.labels("churn"), False: PREDICTIONS.labels("stay")}
    _problems = {name: FEATURE_PROBLEMS.labels(reason) for name, reason in PROBLEM_REASONS.items()}
    _batches = {kind: BATCH_SIZE.labels(kind) for kind in BATCH_KINDS}


_make_fixed_children()


# --- call sites of the domain (one line each) ---------------------------------------------------------------
def model_reload(model: str, outcome: str) -> None:
    """A load of the `served` or the `shadow` model finished with `outcome` (`loaded` or `refused`)."""
    _reloads[model, outcome].inc()


def model_served(name: str, version: str, runtime: str, stage: str) -> None:
    """This process now serves that model (cheap when nothing changed: called after every registry poll)."""
    global _served
    labels = (name, version, runtime, stage)
    with _served_lock:
        if labels == _served:
            return
        if _served is not None:
            MODEL_INFO.labels(*_served).set(0)
        MODEL_INFO.labels(*labels).set(1)
        _served = labels


def model_switch(model_name: str, skew_s: float) -> None:
    """The workers swapped to a new version of `model_name` within `skew_s` of each other."""
    SWITCH_SKEW_SECONDS.labels(model_name).set(skew_s)


def model_served_by(model: LoadedModel | None) -> None:
    """`model_served` for the watcher's current model, if any."""
    if model is not None:
        model_served(model.ref.name, model.ref.version, str(model.runtime), model.stage)


def scoring(
    model: LoadedModel,
    read: Sequence[object],
    probabilities: np.ndarray,
    read_s: float,
    inference_s: float,
) -> None:
    """One scoring call: its feature read (rows or feature errors), the rows' churn probabilities, and the
    seconds the read and the inference took."""
    key = (model.reader.store_type, str(model.runtime), model.ref.version)
    children = _scorings.get(key)
    if children is None:  # once per model: `.labels` costs more than the observations
        children = _scorings[key] = (
            FEATURE_READ_SECONDS.labels(key[0]),
            INFERENCE_SECONDS.labels(key[1]),
            CHURN_PROBABILITY.labels(key[2]),
        )
    read_seconds, inference_seconds, probability = children
    read_seconds.observe(read_s)
    inference_seconds.observe(inference_s)
    if len(probabilities) < len(read):
        for item in read:
            feature_problem(item)
    churned = sum(map(is_churn, probabilities.tolist()))
    for label, count in ((True, churned), (False, len(probabilities) - churned)):
        if count:
            _predictions[label].inc(count)
    observe_all(probability, probabilities)


BULK_OBSERVE_MIN = 16
"""Fewest values `observe_all` counts with numpy: below it numpy's fixed cost exceeds one call per value."""


def observe_all(histogram: Histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for each of `values`, with one increment per bucket rather than per value for a
    large batch (a 1,000-user batch made 2,000 locked writes). Uses the internals of the pinned
    prometheus-client's Histogram child; tests/test_metrics.py checks it equals observing one at a time."""
    if len(values) < BULK_OBSERVE_MIN:
        for value in values.tolist():
            histogram.observe(value)
        return
    bounds = histogram._upper_bounds
    # The first bound each value is <= to, as `observe` finds it; a NaN lands past the last and, as there,
    # counts in no bucket.
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(np.sum(values)))
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=False):
        if count:
            bucket.inc(count)


def feature_problem(error: object) -> None:
    """A user that could not be scored because of its features (a `FeatureError`)."""
    child = _problems.get(type(error).__name__)
    if child is not None:
        child.inc()


def batch_size(kind: str, users: int) -> None:
    """Users in one coalesced Predict batch (`predict`) or one BatchPredict (`batch_predict`)."""
    _batches[kind].observe(users)


def store_error_series(store: str) -> None:
    """Export the `store` errors counter at 0 before any error."""
    STORE_ERRORS.labels(store)


def store_error(store: str) -> None:
    """One read of the `store` online store failed as unavailable."""
    STORE_ERRORS.labels(store).inc()


# --- per call -----------------------------------------------------------------------------------------------
class _MethodChildren:
    """The children of one method, resolved once."""

    def __init__(self, service: str, method: str) -> None:
        streaming = descriptor_pool.Default().FindMethodByName(f"{service}.{method}").server_streaming
        self.labels = ("server_stream" if streaming else "unary", service, method)
        self.started = GRPC_STARTED.labels(*self.labels)
        self.seconds = GRPC_HANDLING_SECONDS.labels(*self.labels)
        self.in_flight = IN_FLIGHT.labels(service) if service == PREDICTION_SERVICE else None
        self.handled: dict[grpc.StatusCode, Counter] = {}

    def handled_child(self, code: grpc.StatusCode) -> Counter:
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = GRPC_HANDLED.labels(*self.labels, code.name)
        return child


class MetricsObserver:
    """Counts every call under the go-grpc-prometheus names (a `CallObserver`)."""

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str], _MethodChildren] = {}
        self._callers: dict[tuple[str, str, grpc.StatusCode], Counter] = {}
        self._caller_users: dict[str, Counter] = {}

    def _children(self, call: Call) -> _MethodChildren:
        key = (call.service, call.method)
        children = self._methods.get(key)
        if children is None:
            children = self._methods[key] = _MethodChildren(call.service, call.method)
        return children

    def started(self, call: Call) -> None:
        children = self._children(call)
        children.started.inc()
        if children.in_flight is not None:
            children.in_flight.inc()

    def finished(self, call: Call) -> None:
        children = self._children(call)
        children.handled_child(call.code).inc()
        children.seconds.observe(call.seconds)
        if children.in_flight is not None:  # a PredictionService call: counted per caller too
            children.in_flight.dec()
            key = (call.caller, call.method, call.code)
            calls = self._callers.get(key)
            if calls is None:
                calls = self._callers[key] = CALLER_CALLS.labels(call.caller, call.method, call.code.name)
            calls.inc()
            if call.users:
                users = self._caller_users.get(call.caller)
                if users is None:
                    users = self._caller_users[call.caller] = CALLER_USERS.labels(call.caller)
                users.inc(call.users)


# --- one folder and one endpoint per server run -------------------------------------------------------------
@contextlib.contextmanager
def multiprocess_dir() -> Iterator[str]:
    """A fresh private folder every process of this server run writes its samples to; removed on exit.

    Call before any worker exists and before any metric child is made in this process. Folders left by a
    server that was killed (its pid is in the name) are removed first."""
    _remove_orphaned_dirs()
    path = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
    previous = os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    for metric in ALL_METRICS:
        # `.labels` would hand back the children made so far, stored in memory. Before the variable is set:
        # `clear` warns in multiprocess mode.
        metric.clear()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # workers inherit it, and so the storage below
    stored_in = values.ValueClass
    values.ValueClass = values.MultiProcessValue()
    _make_fixed_children()
    try:
        yield path
    finally:
        values.ValueClass = stored_in
        if previous is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous
        shutil.rmtree(path, ignore_errors=True)


_DIR_PREFIX = "streamflow-metrics-"


def _remove_orphaned_dirs() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        owner = folder.name[len(_DIR_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def process_dead(pid: int) -> None:
    """Drop the live gauges (model info, calls in flight) of a worker that exited; its counters stay."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        multiprocess.mark_process_dead(pid, path)


class _InitializedFilesCollector(multiprocess.MultiProcessCollector):
    """Skips the files a process has created but not yet sized: prometheus_client's reader fails on an empty
    one (`struct.error`), which turned a scrape that met a worker starting into an HTTP 500."""

    def collect(self) -> Iterable[Metric]:
        files = []
        for name in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(FileNotFoundError):  # a dead worker's live gauges are removed meanwhile
                if os.path.getsize(name) > 0:
                    files.append(name)
        return self.merge(files, accumulate=True)


class MetricsEndpoint:
    """`http://host:port/metrics` for every process of the run, on a thread `check` restarts when it dies.

    A port it cannot bind is logged once and tried again at each `check`: metrics never stop the serving."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host = host
        self.port = port
        self._registry = CollectorRegistry()
        _InitializedFilesCollector(self._registry, path)  # the files of `multiprocess_dir`
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._down = False

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Start the endpoint when it is not running (first call, a dead thread, a port that was taken)."""
        if self.serving:
            return
        if self._server is not None:
            self._server.server_close()
            self._server = None
            if not self._down:
                log.error("the metrics endpoint on port %d stopped; starting it again", self.port)
                self._down = True
        try:
            self._server, self._thread = start_http_server(self.port, self.host, self._registry)
        except OSError as exc:
            if not self._down:
                log.error(
                    "cannot serve metrics on %s:%d (%s); trying again", self.host, self.port, exc.strerror
                )
                self._down = True
            return
        if self._down:
            log.info("metrics endpoint serving again on %s:%d", self.host, self.port)
            self._down = False
        else:
            log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def close_inherited(self) -> None:
        """In a forked worker: close the listening socket it inherited, so the supervisor alone holds it."""
        if self._server is not None:
            self._server.socket.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
