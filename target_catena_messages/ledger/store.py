"""One ledger database and its transactions: what claims, outcomes and reads all stand on.

Every ledger call is one transaction here. A write takes the writers' lock (``BEGIN IMMEDIATE`` on
SQLite, row locks in key order on PostgreSQL) and is retried only when the database says it rolled
the transaction back (deadlock, serialization failure); anything else, a lost connection during
COMMIT above all, may have committed, so it is never retried: the caller stops with a
:class:`LedgerError`. Driver errors become that error with the driver's first line only, never the
SQL or its parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from target_catena_messages.ledger.engines import _WRITE_OPTION
from target_catena_messages.ledger.migrate import SCHEMA_LEVEL, readable_gaps, upgrade
from target_catena_messages.ledger.records import (
    ClaimRequest,
    ConfirmedStatus,
    Key,
    LedgerError,
    LedgerOutcome,
    LedgerReadOnlyError,
)
from target_catena_messages.ledger.schema import TABLE, C

# The package's logger for every module of it: operators filter on one name.
logger = logging.getLogger("target_catena_messages.ledger")

T = TypeVar("T")

CHUNK = 500  # bound parameters per IN list: far below SQLite's and PostgreSQL's limits
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock: rolled back
_TRANSIENT_RETRIES = 3


class Store:
    """The engine of one ledger, and the read and write transactions every ledger job runs in."""

    def __init__(self, engine: Engine | None, *, location: str, read_only: bool) -> None:
        self.engine = engine  # None: a read-only ledger that does not exist yet (empty)
        self.location = location
        self.read_only = read_only
        # What a row is read as: the table's columns, or a default for those an older ledger
        # opened read-only lacks (set by prepare).
        self.row_columns: tuple[sa.ColumnElement[Any], ...] = tuple(C)

    def close(self) -> None:
        """Release all connections."""
        if self.engine is not None:
            self.engine.dispose()

    def prepare(self) -> None:
        """Create or upgrade the tables (read-only: neither) and check they have every column.

        An older ledger opened read-only stays as it is: the columns it lacks read as their
        default, so a dry run decides exactly as the first real run will.

        Raises:
            LedgerError: a newer target wrote the ledger, the table lacks columns no upgrade
                adds, or it cannot be read.
        """
        if self.engine is None:
            return
        gaps: list[str] = []
        if self.read_only:
            found = self.read(lambda conn: readable_gaps(conn, self.location), None)
            if found is None:
                self.close()
                self.engine = None  # no table yet: an empty ledger, and we create nothing
                return
            gaps = found
            self.row_columns = tuple(
                sa.literal(0).label(name) if name in gaps else column for name, column in C.items()
            )
        else:
            was = self.write(lambda conn: upgrade(conn, self.location))
            if was is not None:
                logger.info(
                    "ledger at %s upgraded from schema level %d to %d",
                    self.location,
                    was,
                    SCHEMA_LEVEL,
                )
        names: set[str] = self.read(
            lambda conn: {c["name"] for c in sa.inspect(conn).get_columns(TABLE.name)}, set()
        )
        missing = sorted(set(C.keys()) - names - set(gaps))
        if missing:
            raise LedgerError(
                f"ledger table at {self.location} lacks columns {missing}; "
                "it was made by another version"
            )

    def require_writable(self, what: str) -> None:
        """Refuse a write on a read-only ledger: a caller bug, never silently ignored."""
        if self.read_only:
            raise LedgerReadOnlyError(f"ledger at {self.location} is read-only; {what} refused")

    def read(self, work: Callable[[Connection], T], empty: T) -> T:
        """``work`` in one read transaction; ``empty`` when the ledger does not exist yet."""
        if self.engine is None:
            return empty
        try:
            with self.engine.connect() as conn, conn.begin():
                return work(conn)
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerError(f"ledger at {self.location}: {reason(exc)}") from exc

    def write(self, work: Callable[[Connection], T]) -> T:
        """``work`` in one write transaction, retried only when the database rolled it back."""
        assert self.engine is not None  # writable ledgers always have one
        attempt = 0
        while True:
            try:
                with self.engine.connect() as conn:
                    conn.execution_options(**{_WRITE_OPTION: True})
                    with conn.begin():
                        return work(conn)
            except sa.exc.DBAPIError as exc:
                # Deadlocks and serialization failures were rolled back: retrying is safe. Anything
                # else (a lost connection during COMMIT) may have committed: never guess, stop.
                if (
                    getattr(exc.orig, "sqlstate", None) in _TRANSIENT_SQLSTATES
                    and attempt < _TRANSIENT_RETRIES
                ):
                    attempt += 1
                    logger.info("ledger transaction retried after %s", reason(exc))
                    continue
                raise LedgerError(f"ledger at {self.location}: {reason(exc)}") from exc
            except sa.exc.SQLAlchemyError as exc:
                raise LedgerError(f"ledger at {self.location}: {reason(exc)}") from exc

    def lookup(self, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        """Rows of ``keys`` read in one transaction, unlocked; keys without a row are absent."""
        empty: dict[Key, dict[str, Any]] = {}
        columns = self.row_columns
        return self.read(lambda conn: select_rows(conn, keys, lock=False, columns=columns), empty)

    def fetch(self, query: sa.Select[Any]) -> list[dict[str, Any]]:
        """All rows of ``query`` as dicts, in one read transaction."""
        empty: list[dict[str, Any]] = []
        return self.read(lambda conn: [dict(r) for r in conn.execute(query).mappings()], empty)

    def paged(self, query: sa.Select[Any]) -> Iterator[dict[str, Any]]:
        """The rows of ``query`` in key order, one page a transaction (keyset pagination).

        No transaction is held between pages, so a report over a large ledger never blocks the
        writers of a running target.
        """
        after: Key | None = None
        while True:
            page_query = query.order_by(C.namespace, C.key).limit(CHUNK)
            if after is not None:
                page_query = page_query.where(
                    sa.or_(
                        C.namespace > after[0], sa.and_(C.namespace == after[0], C.key > after[1])
                    )
                )
            page = self.fetch(page_query)
            yield from page
            if len(page) < CHUNK:
                return
            after = (page[-1]["namespace"], page[-1]["key"])


# -- statements every job shares (inside a transaction) -----------------------------------------


def select_rows(
    conn: Connection,
    keys: Sequence[Key],
    *,
    lock: bool,
    columns: Sequence[sa.ColumnElement[Any]] = tuple(C),
) -> dict[Key, dict[str, Any]]:
    """Full rows of ``keys``; ``lock`` takes their row locks in key order (the global order)."""
    found: dict[Key, dict[str, Any]] = {}
    for namespace, group in chunks(keys):
        query = sa.select(*columns).where(match(namespace, group)).order_by(C.namespace, C.key)
        if lock:
            query = query.with_for_update()  # rendered on PostgreSQL; SQLite holds the db lock
        for row in conn.execute(query).mappings():
            found[(row["namespace"], row["key"])] = dict(row)
    return found


def update_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """UPDATE each row by its key, with the columns of the first row (all rows have the same)."""
    if not rows:
        return
    columns = [name for name in rows[0] if name not in ("namespace", "key")]
    stmt = (
        sa.update(TABLE)
        .where(C.namespace == sa.bindparam("b_namespace"), C.key == sa.bindparam("b_key"))
        .values({name: sa.bindparam(f"b_{name}") for name in columns})
    )
    conn.execute(stmt, [{f"b_{name}": value for name, value in row.items()} for row in rows])


def chunks(keys: Sequence[Key]) -> Iterator[tuple[str, list[str]]]:
    """(namespace, keys) groups of at most CHUNK, in sorted order (the global lock order)."""
    ordered = sorted(set(keys))
    start = 0
    while start < len(ordered):
        namespace = ordered[start][0]
        group = [k for ns, k in ordered[start : start + CHUNK] if ns == namespace]
        yield namespace, group
        start += len(group)


def match(namespace: str, keys: list[str]) -> sa.ColumnElement[bool]:
    """The rows of ``keys`` in ``namespace``."""
    return sa.and_(C.namespace == namespace, C.key.in_(keys))


# -- arguments ----------------------------------------------------------------------------------


def utc(now: datetime | None) -> datetime:
    """``now`` in UTC, or the current time; a naive datetime is refused (ValueError)."""
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(timezone.utc)


def unique_keys(
    items: Sequence[ClaimRequest] | Sequence[LedgerOutcome] | Sequence[ConfirmedStatus],
) -> dict[Key, Any]:
    """``items`` by key; a key twice is refused (ValueError): one batch cannot race itself."""
    by_key: dict[Key, Any] = {}
    for item in items:
        key = (item.namespace, item.key)
        if key in by_key:
            raise ValueError(f"key {key!r} passed twice in one ledger call")
        by_key[key] = item
    return by_key


def reason(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's own message, first line: no SQL, no parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
