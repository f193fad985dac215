"""Feast configuration of the production profile: PostgreSQL offline store and registry, Redis online store.

Built from the one Settings object rather than a second `feature_store.yaml`, so the same environment
variables configure ingestion, Feast and the server. The feature definitions are the embedded profile's.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from feast.repo_config import RepoConfig
from feast.repo_operations import is_valid_name

from streamflow import postgres
from streamflow.errors import StreamflowError
from streamflow.settings import Settings

DEFAULT_TIMEOUT_S: float = Settings.model_fields["online_store_timeout_s"].default
"""`STREAMFLOW_ONLINE_STORE_TIMEOUT_S`'s default, for callers without Settings."""

REGISTRY_CACHE_TTL_S = 60
"""How long a process trusts its cached copy of the SQL registry before reading it again."""


def redis_connection_string(redis_url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Feast's ``host:port,db=N[,password=...][,ssl=true]`` form of a ``redis://`` or ``rediss://`` URL.

    `timeout_s` bounds each connect and each socket read (`STREAMFLOW_ONLINE_STORE_TIMEOUT_S`): a Redis that
    is down or frozen (SIGSTOP, a hung host) surfaces as an error within it, not as a request stuck on a dead
    socket. Feast json-decodes each ``key=value`` of the string, so the seconds reach redis-py as a float."""
    parts = urlsplit(redis_url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise StreamflowError(
            f"STREAMFLOW_REDIS_URL must look like redis://host:port/db, got scheme {parts.scheme!r}."
        )
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise StreamflowError(f"STREAMFLOW_REDIS_URL names database {db!r}; Redis databases are numbers.")
    options = [f"{parts.hostname}:{parts.port or 6379}", f"db={db}"]
    if parts.username:
        options.append(f"username={unquote(parts.username)}")
    if parts.password:
        options.append(f"password={unquote(parts.password)}")
    if parts.scheme == "rediss":
        options.append("ssl=true")
    options += [f"socket_timeout={timeout_s:g}", f"socket_connect_timeout={timeout_s:g}"]
    # No client-side retries (`null` reaches redis-py as retry=None): its default retries 3 times with up to
    # 14 s of backoff, which outlasts a caller's deadline. The server answers UNAVAILABLE at once instead,
    # and callers retry that code (the client's service config does).
    options.append("retry=null")
    return ",".join(options)


def production_repo_config(settings: Settings) -> RepoConfig:
    """The Feast RepoConfig of the production profile, from the settings' DSN, Redis URL and project name."""
    project = settings.redis_key_prefix
    if not is_valid_name(project):
        raise StreamflowError(
            f"STREAMFLOW_REDIS_KEY_PREFIX {project!r} is not a valid Feast project name: use letters, "
            "digits, underscores and hyphens, not starting with an underscore or hyphen."
        )
    pg = postgres.dsn_params(settings.postgres_dsn)
    return RepoConfig(
        project=project,
        provider="local",
        repo_path=settings.feature_repo,
        entity_key_serialization_version=3,
        registry={
            "registry_type": "sql",
            "path": postgres.sqlalchemy_url(settings.postgres_dsn, "psycopg"),
            "cache_ttl_seconds": REGISTRY_CACHE_TTL_S,
            # A pooled connection broken by a database restart is replaced instead of failing the next read.
            "sqlalchemy_config_kwargs": {"echo": False, "pool_pre_ping": True},
            # A materialization marks its views MATERIALIZING in the shared registry; running servers keep
            # answering from the values already in Redis instead of refusing every request meanwhile.
            "serve_features_while_materializing": True,
        },
        offline_store={
            "type": "postgres",
            "host": pg.get("host", "localhost"),
            "port": int(pg.get("port", 5432)),
            "database": postgres.database_name(settings.postgres_dsn),
            "user": pg.get("user", "postgres"),
            # Empty means "none given": libpq then falls back to PGPASSWORD or ~/.pgpass, as for any client.
            "password": pg.get("password", ""),
            # Feast's own default is `require`; keep libpq's (`prefer`) unless the DSN asks for more.
            "sslmode": pg.get("sslmode", "prefer"),
        },
        online_store={
            "type": "redis",
            "connection_string": redis_connection_string(settings.redis_url, settings.online_store_timeout_s),
        },
    )
