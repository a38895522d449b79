"""Ledger URLs and engines: SQLite (WAL, ``synchronous=FULL``, a private file) or PostgreSQL.

Separate because it is the only place that knows the drivers: connection options, file
permissions and the ``BEGIN IMMEDIATE`` hook that serialises SQLite writers.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from target_catena_messages.errors import ConfigError
from target_catena_messages.ledger.records import LedgerError

_SQLITE_BUSY_SECONDS = 60.0  # wait for another process's write transaction instead of failing
_WRITE_OPTION = "catena_ledger_write"


def _parse_url(url: str) -> URL:
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        # Never echo the URL: it may carry a password.
        raise ConfigError(
            "ledger_url is not a valid URL (sqlite:///PATH or postgresql://...)"
        ) from None
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return parsed
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    raise ConfigError(
        f"ledger_url scheme {parsed.drivername!r} is not supported; "
        "use sqlite:///PATH or postgresql://..."
    )


def _sqlite_engine(url: URL, *, read_only: bool) -> tuple[Engine | None, str]:
    if not url.database or url.database == ":memory:" or url.query:
        raise ConfigError("ledger_url for SQLite must be sqlite:///PATH to a file, without options")
    path = Path(url.database).expanduser().absolute()
    if read_only:
        if not path.is_file():
            return None, str(path)  # an empty ledger; a dry run creates nothing
    else:
        _secure_file(path)
    uri = f"file:{urllib.parse.quote(str(path))}?mode={'ro' if read_only else 'rw'}"

    def connect() -> sqlite3.Connection:
        # isolation_level=None: SQLAlchemy's "begin" hook below emits BEGIN itself.
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=_SQLITE_BUSY_SECONDS,
            isolation_level=None,
            check_same_thread=False,
        )
        if not read_only:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        return conn

    engine = sa.create_engine("sqlite+pysqlite://", creator=connect, poolclass=sa.pool.QueuePool)

    @sa.event.listens_for(engine, "begin")
    def begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front: two processes serialise instead of failing
        # with SQLITE_BUSY when a deferred reader tries to become a writer.
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine, str(path)


def _secure_file(path: Path) -> None:
    """Create the file 0600 before SQLite sees it; narrow an existing one and its WAL files."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if candidate.exists() and candidate.stat().st_mode & 0o077:
                candidate.chmod(0o600)
    except OSError as exc:
        raise LedgerError(f"ledger at {path} cannot be created: {exc.strerror}") from exc


def _postgresql_engine(url: URL, *, read_only: bool) -> tuple[Engine, str]:
    shown = URL.create("postgresql", url.username, None, url.host, url.port, url.database)
    location = shown.render_as_string(hide_password=False)
    connect_args: dict[str, Any] = {"application_name": "target-catena-messages"}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 10
    if read_only:  # the server refuses writes too, not just this class
        given = url.query.get("options", "")
        given = given if isinstance(given, str) else " ".join(given)
        connect_args["options"] = f"{given} -c default_transaction_read_only=on".strip()
    engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    return engine, location
