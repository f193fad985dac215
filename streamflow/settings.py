"""The one settings object of StreamFlow Serving, read from ``STREAMFLOW_*`` environment variables.

Every field documents its default here; the README's settings table is this file in prose.
``MLFLOW_TRACKING_URI`` keeps MLflow's own name because every MLflow tool already reads it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Profile(StrEnum):
    """Where features, registry and models live."""

    EMBEDDED = "embedded"  # local files and SQLite, no server needed
    PRODUCTION = "production"  # Feast on PostgreSQL + Redis, MLflow tracking server over HTTP


class LogFormat(StrEnum):
    """How log lines on stderr are written."""

    JSON = "json"  # one JSON object per line, for log collectors
    TEXT = "text"  # `time LEVEL logger: message`, for people


class Settings(BaseSettings):
    """StreamFlow settings; each field is ``STREAMFLOW_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="STREAMFLOW_", extra="ignore", frozen=True)

    profile: Profile = Profile.EMBEDDED
    """`embedded` (local files + SQLite) or `production` (PostgreSQL, Redis, MLflow server)."""

    home: Path = Path(".streamflow")
    """Working folder of the embedded profile: demo data, Feast registry and online store, MLflow store."""

    # --- data and features -------------------------------------------------------------------------
    users: int = Field(default=7043, ge=1)
    """Number of demo users `bootstrap` and `generate` create."""

    seed: int = 42
    """Seed of the demo-data generator and of every random step of training."""

    feature_repo: Path = Path(__file__).resolve().parent.parent / "feature_repo"
    """Folder of the Feast feature repository (definitions and `feature_store*.yaml`)."""

    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/streamflow"
    """Production profile: PostgreSQL database for the snapshot tables, Feast offline store and registry."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Production profile: Redis online store."""

    redis_cluster: bool = False
    """Production profile: the online store is a Redis Cluster; `STREAMFLOW_REDIS_URL` then names one or more
    of its nodes, comma-separated (`redis://node1:6379,node2:6379`), and database 0 or none."""

    redis_key_prefix: str = "streamflow"
    """Production profile: Feast project name, which namespaces every Redis key and registry row."""

    staleness_reference: Literal["now"] | datetime = datetime(2024, 3, 7, tzinfo=UTC)
    """Clock a feature's age is measured against for FEATURES_STALE: an ISO timestamp or `now`.
    The default is the demo's clock, a week after its last monthly snapshot; a live deployment sets `now`."""

    # --- training and registry ---------------------------------------------------------------------
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "STREAMFLOW_MLFLOW_TRACKING_URI")
    )
    """MLflow tracking/registry URI (`MLFLOW_TRACKING_URI`). Unset: `sqlite:///<home>/mlflow/mlflow.db` in the
    embedded profile, `http://127.0.0.1:5000` in the production profile."""

    model_name: str = "streamflow_churn"
    """Registered model name in the MLflow registry."""

    n_estimators: int = Field(default=300, ge=1)
    """Trees in the RandomForest."""

    min_samples_leaf: int = Field(default=10, ge=1)
    """Training rows each leaf of a tree holds at least. 10 rather than scikit-learn's 1 (fully grown
    trees): on the demo data the validation AUC is as good (0.866 against 0.862) with 121,000 nodes instead
    of 468,000, so the model scores, explains and loads about four times lighter; its smoother
    probabilities cross 0.5 less often (F1 at 0.5: 0.571 against 0.600)."""

    compute: Literal["local", "ray"] = "local"
    """Where `materialize`, the training set's `get_historical_features` and `score-all` run: `local` (this
    process) or `ray` (Feast's Ray compute engine and Ray offline store, and Ray Data for `score-all`) on the
    Ray cluster `RAY_ADDRESS` names, else on a local Ray instance started for the command."""

    # --- serving -----------------------------------------------------------------------------------
    host: str | None = None
    """Address the gRPC server and the metrics endpoint listen on. Unset: `127.0.0.1` in the embedded profile
    (a laptop's demo is not on the network), `0.0.0.0` in the production profile (and the image)."""

    port: int = Field(default=50051, ge=0, le=65535)
    """Port the gRPC server listens on (0 picks a free port)."""

    model_uri: str = "models:/streamflow_churn/Production"
    """Model the server serves and follows; the alias form `models:/streamflow_churn@production` works too."""

    shadow_model_uri: str = ""
    """A second model scored beside the served one, off the response path, and followed the same way (e.g.
    `models:/streamflow_churn/Staging`); it never answers. Empty: no shadow."""

    shadow_sample: float = Field(default=1.0, ge=0, le=1)
    """The share of Predict and BatchPredict users the shadow model also scores (0 to 1)."""

    poll_interval_s: float = Field(default=5.0, gt=0)
    """Seconds between two looks at the registry for a new Production version."""

    registry_timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of one registry HTTP request made by the poller."""

    online_store_timeout_s: float = Field(default=0.5, gt=0)
    """Production profile: seconds one Redis connect or read of the online store may take before the read
    fails with UNAVAILABLE (a frozen Redis costs a call this long, not a caller's whole deadline)."""

    online_store_probe_interval_s: float = Field(default=1.0, gt=0)
    """Seconds between two probe reads while the online store is down; every other read meanwhile fails at
    once with UNAVAILABLE instead of waiting for the store's timeout."""

    max_batch_size: int = Field(default=1000, ge=1)
    """Most user ids one BatchPredict request may carry."""

    runtime: Literal["auto", "onnx", "sklearn"] = "auto"
    """The first inference runtime to try for a model version; each falls back to the next when it cannot
    serve (logged): `auto` the forest kernel (the forest's arrays walked by compiled C), then `onnx` (the
    run's ONNX export, by onnxruntime), then `sklearn` (the pipeline as trained). The first two serve only
    when they reproduce the pipeline's probabilities on the run's parity sample."""

    reflection: bool | None = None
    """Serve gRPC server reflection (grpcurl `list` / `describe`); behind the token check when tokens are on.
    Unset: on in the embedded profile, off in the production profile (see `reflection_on`)."""

    threads: int = Field(default=2, ge=1)
    """Threads of one server process that score BatchPredict calls; Predict calls are scored on the event
    loop, coalesced when they arrive together (on a thread of their own while scoring is slow); ModelInfo
    and health answer on the event loop. Batches contend for the GIL, so more threads only queue them
    differently."""

    max_concurrent_rpcs: int = Field(default=256, ge=1)
    """PredictionService calls one process runs or queues at once; beyond it callers get RESOURCE_EXHAUSTED
    (OVERLOADED, with RetryInfo). Health checks are never counted, so probes answer under any load."""

    workers: int = Field(default=0, ge=0)
    """Server processes sharing the port; 0 means one per CPU core."""

    grace_s: float = Field(default=10.0, ge=0)
    """Seconds in-flight calls get to finish on SIGTERM."""

    drain_delay_s: float = Field(default=0.0, ge=0)
    """Seconds a server keeps accepting calls after SIGTERM while its health already says NOT_SERVING, so a
    load balancer that polls health stops sending first (Kubernetes uses the pod's preStop sleep instead)."""

    metrics_port: int = Field(default=9464, ge=0, le=65535)
    """Port of the Prometheus endpoint `http://<host>:<port>/metrics`, which adds up every worker process
    (served by the supervisor, or by the server itself with one worker); 0 turns it off."""

    health_port: int = Field(default=0, ge=0, le=65535)
    """A second, plaintext port serving only `grpc.health.v1` (no token needed), for probes that cannot speak
    TLS (Kubernetes gRPC probes); with several workers the supervisor answers it, off the workers' event
    loops, so probes answer under any load; 0 serves health on the main port only."""

    http_port: int = Field(default=8080, ge=0, le=65535)
    """Port serving the PredictionService over HTTP/1.1 and HTTP/2: the Connect protocol (JSON or binary
    protobuf), gRPC-Web and gRPC, with the gRPC port's TLS, tokens and quotas; 0 turns it off."""

    # --- security ----------------------------------------------------------------------------------
    tls_cert_file: Path | None = None
    """PEM certificate chain the gRPC port serves TLS with (with `tls_key_file`); re-read when the file
    changes, for new connections. Unset: plaintext."""

    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""

    tls_client_ca_file: Path | None = None
    """PEM CA bundle client certificates must chain to: set, every connection needs a valid client certificate
    (mTLS). Needs `tls_cert_file`; re-read when the file changes."""

    auth_tokens_file: Path | None = None
    """File of `name:sha256-hex-of-token` lines, one per caller (`streamflow add-token` writes them); set,
    PredictionService and reflection calls need `authorization: Bearer <token>`. Re-read when it changes."""

    rate_limit_rps: float = Field(default=0.0, ge=0)
    """Users each caller (token name, certificate subject, else `anonymous`) may score per second, summed
    over the server's workers: a Predict costs 1, a BatchPredict one per id, ModelInfo 1. Over it, callers
    get RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo. 0 turns quotas off."""

    rate_limit_burst: float = Field(default=0.0, ge=0)
    """Users a caller may score at once before the rate applies (the token bucket's size); 0 means one
    second's worth (`rate_limit_rps`). A batch larger than the bucket still passes when the bucket is full."""

    log_level: str = "INFO"
    """Python log level of the server and the CLI."""

    log_format: LogFormat | None = None
    """`json` or `text` log lines on stderr. Unset: `json` in the production profile, `text` in the embedded
    one (see `log_style`)."""

    access_log_rate: int = Field(default=100, ge=0)
    """Access-log lines one server process writes per second at most, for successful calls and as many again
    for failed ones; what a second drops is counted in one line. 0 turns the access log off."""

    # --- prediction log ------------------------------------------------------------------------------
    prediction_log: bool = True
    """Keep every served prediction (features, event times, probability, label, version) in the prediction
    log: Parquet files under `<home>/predictions` (embedded), table `prediction_log` (production); what
    `streamflow evaluate` and `drift` read. On by default: a model is only known to work when what it served
    is kept, and written off the response path it costs little (`make bench --log-only`)."""

    prediction_log_queue_size: int = Field(default=20_000, ge=1)
    """Records the prediction log's writer (the supervisor, or the one server process) holds at most; past it
    (a sink slow or down) records are dropped and counted (`streamflow_prediction_log_dropped_total`), never
    blocking a call. A scoring worker holds at most 2,000 on their way to the supervisor."""

    prediction_log_rotate_s: float = Field(default=300.0, gt=0)
    """Embedded profile: seconds after which a prediction log Parquet file is completed and a new one begun
    (a file is readable once complete, and at shutdown)."""

    prediction_log_dsn: str | None = None
    """Production profile: PostgreSQL database of the prediction log. Unset: `STREAMFLOW_POSTGRES_DSN`'s."""

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both STREAMFLOW_TLS_CERT_FILE and STREAMFLOW_TLS_KEY_FILE, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("STREAMFLOW_TLS_CLIENT_CA_FILE needs STREAMFLOW_TLS_CERT_FILE and _KEY_FILE")
        if self.health_port and self.health_port == self.port:
            raise ValueError(f"STREAMFLOW_HEALTH_PORT must differ from STREAMFLOW_PORT ({self.port})")
        if self.http_port and self.http_port in (self.port, self.health_port):
            raise ValueError(f"STREAMFLOW_HTTP_PORT ({self.http_port}) must differ from the other ports")
        return self

    @property
    def listen_host(self) -> str:
        """The address in force: `host`, else the profile's (loopback when embedded)."""
        if self.host:
            return self.host
        return "0.0.0.0" if self.profile is Profile.PRODUCTION else "127.0.0.1"

    @property
    def reflection_on(self) -> bool:
        """Whether reflection is served: `reflection`, else the profile's (on only when embedded)."""
        if self.reflection is not None:
            return self.reflection
        return self.profile is Profile.EMBEDDED

    @property
    def tls_on(self) -> bool:
        """Whether the gRPC port speaks TLS."""
        return self.tls_cert_file is not None

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI in force for this profile."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if self.profile is Profile.PRODUCTION:
            return "http://127.0.0.1:5000"
        return f"sqlite:///{(self.home / 'mlflow' / 'mlflow.db').resolve()}"

    @property
    def log_style(self) -> LogFormat:
        """The log format in force: `log_format`, else the profile's (JSON for production)."""
        if self.log_format is not None:
            return self.log_format
        return LogFormat.JSON if self.profile is Profile.PRODUCTION else LogFormat.TEXT

    @property
    def artifact_root(self) -> Path:
        """Where the embedded profile's MLflow experiment keeps its artifacts."""
        return (self.home / "mlflow" / "artifacts").resolve()

    @property
    def data_dir(self) -> Path:
        """Where the embedded profile keeps the demo snapshot tables (Parquet)."""
        return (self.home / "data").resolve()

    @property
    def feast_dir(self) -> Path:
        """Where the embedded profile keeps the Feast registry and SQLite online store."""
        return (self.home / "feast").resolve()

    def staleness_clock(self) -> datetime:
        """The instant feature ages are measured against."""
        if self.staleness_reference == "now":
            return datetime.now(UTC)
        ref = self.staleness_reference
        return ref if ref.tzinfo else ref.replace(tzinfo=UTC)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (used by the CLI and tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]
