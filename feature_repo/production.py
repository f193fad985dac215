"""Feast configuration of the production profile: PostgreSQL offline store and registry, Redis online store.

Built from the one Settings object rather than a second `feature_store.yaml`, so the same environment
variables configure ingestion, Feast and the server. The feature definitions are the embedded profile's.
"""

from __future__ import annotations

from typing import Any
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


def redis_connection_string(
    redis_url: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, cluster: bool = False
) -> str:
    """Feast's ``host:port[,host:port...],db=N[,password=...][,ssl=true]`` form of a ``redis://`` or
    ``rediss://`` URL.

    `timeout_s` bounds each connect and each socket read (`STREAMFLOW_ONLINE_STORE_TIMEOUT_S`): a Redis that
    is down or frozen (SIGSTOP, a hung host) surfaces as an error within it, not as a request stuck on a dead
    socket. Feast json-decodes each ``key=value`` of the string, so the seconds reach redis-py as a float.

    With `cluster` (`STREAMFLOW_REDIS_CLUSTER`) the URL's host part may list several nodes of a Redis Cluster,
    comma-separated, from which the client discovers the rest: `redis://node1:6379,node2:6379`."""
    parts = urlsplit(redis_url)
    hosts = parts.netloc.rpartition("@")[2]
    if parts.scheme not in ("redis", "rediss") or not hosts:
        raise StreamflowError(
            f"STREAMFLOW_REDIS_URL must look like redis://host:port/db, got scheme {parts.scheme!r}."
        )
    nodes = [_redis_node(node) for node in hosts.split(",")]
    if len(nodes) > 1 and not cluster:
        raise StreamflowError(
            f"STREAMFLOW_REDIS_URL names {len(nodes)} Redis nodes; a Redis Cluster also needs "
            "STREAMFLOW_REDIS_CLUSTER=true, a single server has one address."
        )
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise StreamflowError(f"STREAMFLOW_REDIS_URL names database {db!r}; Redis databases are numbers.")
    if cluster and int(db) != 0:
        raise StreamflowError(
            f"STREAMFLOW_REDIS_URL names database {db}; a Redis Cluster has only database 0."
        )
    # A cluster client takes no database (redis-py refuses even db=0).
    options = nodes if cluster else [*nodes, f"db={db}"]
    if parts.username:
        options.append(f"username={unquote(parts.username)}")
    if parts.password:
        options.append(f"password={unquote(parts.password)}")
    if parts.scheme == "rediss":
        options.append("ssl=true")
    options += [f"socket_timeout={timeout_s:g}", f"socket_connect_timeout={timeout_s:g}"]
    # No client-side retries: redis-py's default retries 3 times with up to 14 s of backoff, which outlasts a
    # caller's deadline. The server answers UNAVAILABLE at once instead, and callers retry that code (the
    # client's service config does). A single server's client takes `retry=None` (`null`); a cluster's refuses
    # a retry argument for its nodes (it never retries there) and counts its own retries, which 0 turns off.
    options.append("cluster_error_retry_attempts=0" if cluster else "retry=null")
    return ",".join(options)


def _redis_node(node: str) -> str:
    """One ``host:port`` of a Redis URL's host list, the port 6379 when none is given."""
    parts = urlsplit(f"//{node}")
    try:
        port = parts.port or 6379
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.username is not None:
        raise StreamflowError(f"STREAMFLOW_REDIS_URL has {node!r} where a host or host:port belongs.")
    return f"{parts.hostname}:{port}"


def production_repo_config(settings: Settings, batch_engine: dict[str, Any] | str = "local") -> RepoConfig:
    """The Feast RepoConfig of the production profile, from the settings' DSN, Redis URL and project name;
    `batch_engine` is Feast's materialization engine (`feature_repo.compute`)."""
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
        batch_engine=batch_engine,
        online_store={
            "type": "redis",
            "redis_type": "redis_cluster" if settings.redis_cluster else "redis",
            "connection_string": redis_connection_string(
                settings.redis_url, settings.online_store_timeout_s, cluster=settings.redis_cluster
            ),
        },
    )
