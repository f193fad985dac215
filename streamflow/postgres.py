"""PostgreSQL plumbing of the production profile: DSN handling, connections and database creation.

Everything takes the one libpq DSN of the settings (URL or ``key=value`` form) and derives the rest from it,
so the snapshot tables, the Feast registry and the MLflow backend store are configured by one value.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import URL

from streamflow.errors import StreamflowError

CONNECT_TIMEOUT_S = 5
"""Seconds to wait for a PostgreSQL connection: a down server must fail fast with a clear error, not hang."""


def dsn_params(dsn: str) -> dict[str, Any]:
    """The DSN's parameters (``host``, ``port``, ``dbname``, ``user``, ``password``, ...) as a dict."""
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        # The parser's message may quote the DSN, password included, so it stays out of ours.
        raise StreamflowError(
            "STREAMFLOW_POSTGRES_DSN is not a valid PostgreSQL DSN; use postgresql://user[:password]@host:port/dbname."
        ) from exc


def database_name(dsn: str) -> str:
    """The database the DSN names (libpq's default: the user name)."""
    params = dsn_params(dsn)
    return str(params.get("dbname") or params.get("user") or "postgres")


def with_database(dsn: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    return make_conninfo(dsn, dbname=dbname)


def describe(dsn: str) -> str:
    """``host:port/dbname`` for messages: where, without the credentials."""
    params = dsn_params(dsn)
    return f"{params.get('host', 'localhost')}:{params.get('port', 5432)}/{database_name(dsn)}"


def sqlalchemy_url(dsn: str, driver: str) -> str:
    """The DSN as a SQLAlchemy URL for ``postgresql+<driver>`` (Feast registry: psycopg; MLflow: psycopg2)."""
    params = dsn_params(dsn)
    query = {"sslmode": str(params["sslmode"])} if "sslmode" in params else {}
    return URL.create(
        f"postgresql+{driver}",
        username=params.get("user"),
        password=params.get("password"),
        host=params.get("host"),
        port=int(params["port"]) if "port" in params else None,
        database=database_name(dsn),
        query=query,
    ).render_as_string(hide_password=False)


def connect(
    dsn: str, *, application_name: str = "streamflow", autocommit: bool = False
) -> psycopg.Connection:
    """A psycopg connection that gives up after CONNECT_TIMEOUT_S instead of waiting on a dead server."""
    return psycopg.connect(
        dsn, connect_timeout=CONNECT_TIMEOUT_S, application_name=application_name, autocommit=autocommit
    )


def ensure_database(dsn: str) -> bool:
    """Create the DSN's database if it does not exist yet; True if it was created.

    Connects to the server's ``postgres`` maintenance database, since the target cannot be connected to before
    it exists. A concurrent creator winning the race counts as "exists".
    """
    dbname = database_name(dsn)
    with connect(with_database(dsn, "postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        except psycopg.errors.DuplicateDatabase:
            return False
    return True


def drop_database(dsn: str) -> None:
    """Drop the DSN's database, disconnecting its sessions first (tests and clean-up)."""
    dbname = database_name(dsn)
    with connect(with_database(dsn, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
