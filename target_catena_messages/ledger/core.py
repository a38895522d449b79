"""The Ledger class: claims, outcomes, leases and reports, each batch in one transaction.

The values it takes and returns, the table, the engines and the pure claim decision live in
their own modules of this package; this one holds the transactions that tie them together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

from target_catena_messages.ledger.decision import _SEND, _decide
from target_catena_messages.ledger.engines import (
    _WRITE_OPTION,
    _parse_url,
    _postgresql_engine,
    _sqlite_engine,
)
from target_catena_messages.ledger.records import (
    ACCEPTED,
    CLAIMED,
    DEAD_LETTERED,
    ClaimRequest,
    ClaimResult,
    ConfirmedStatus,
    Decision,
    Key,
    LedgerError,
    LedgerOutcome,
    LedgerReadOnlyError,
    retryable_fingerprint,
)
from target_catena_messages.ledger.schema import (
    _OUTCOME_COLUMNS,
    _STATUSES,
    TABLE,
    C,
    _create_table,
    _per_dialect,
)

# The package's name, as before the split: log lines keep saying where they come from.
logger = logging.getLogger("target_catena_messages.ledger")

T = TypeVar("T")

_CHUNK = 500  # bound parameters per IN list: far below SQLite's and PostgreSQL's limits
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock: rolled back
_TRANSIENT_RETRIES = 3


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(timezone.utc)


def _unique_keys(
    items: Sequence[ClaimRequest] | Sequence[LedgerOutcome] | Sequence[ConfirmedStatus],
) -> dict[Key, Any]:
    by_key: dict[Key, Any] = {}
    for item in items:
        key = (item.namespace, item.key)
        if key in by_key:
            raise ValueError(f"key {key!r} passed twice in one ledger call")
        by_key[key] = item
    return by_key


def _chunks(keys: Sequence[Key]) -> Iterator[tuple[str, list[str]]]:
    """(namespace, keys) groups of at most _CHUNK, in sorted order (the global lock order)."""
    ordered = sorted(set(keys))
    start = 0
    while start < len(ordered):
        namespace = ordered[start][0]
        group = [k for ns, k in ordered[start : start + _CHUNK] if ns == namespace]
        yield namespace, group
        start += len(group)


def _match(namespace: str, keys: list[str]) -> sa.ColumnElement[bool]:
    return sa.and_(C.namespace == namespace, C.key.in_(keys))


class Ledger:
    """Claims, outcomes and leases of message keys; open it with :meth:`Ledger.open`."""

    def __init__(
        self,
        engine: Engine | None,
        *,
        location: str,
        run_id: str,
        read_only: bool,
        lease_seconds: float,
    ) -> None:
        self._engine = engine  # None: a read-only ledger that does not exist yet (empty)
        self.location = location
        self.run_id = run_id
        self.read_only = read_only
        self.lease = timedelta(seconds=lease_seconds)

    @classmethod
    def open(
        cls, url: str, *, run_id: str, read_only: bool = False, lease_seconds: float = 300.0
    ) -> Ledger:
        """Connect, and create the table if missing (never when read-only).

        Raises:
            ConfigError: the URL is not a supported ledger URL.
            LedgerError: the ledger cannot be opened or prepared.
        """
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        parsed = _parse_url(url)
        if parsed.get_backend_name() == "sqlite":
            engine, location = _sqlite_engine(parsed, read_only=read_only)
        else:
            engine, location = _postgresql_engine(parsed, read_only=read_only)
        ledger = cls(
            engine,
            location=location,
            run_id=run_id,
            read_only=read_only,
            lease_seconds=lease_seconds,
        )
        ledger._prepare()
        return ledger

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release all connections."""
        if self._engine is not None:
            self._engine.dispose()

    def count(self) -> int:
        """Keys in the ledger, all namespaces."""
        query = sa.select(sa.func.count()).select_from(TABLE)
        return self._read(lambda conn: int(conn.scalar(query) or 0), 0)

    def claim(
        self, requests: Sequence[ClaimRequest], *, now: datetime | None = None
    ) -> list[ClaimResult]:
        """Decide and claim a batch in ONE transaction; results follow request order.

        A key may appear only once per call (ValueError otherwise): one batch cannot race itself.
        """
        self._require_writable("claim")
        by_key: dict[Key, ClaimRequest] = _unique_keys(requests)
        if not by_key:
            return []
        at = _utc(now)
        decided = self._write(lambda conn: self._claim_in(conn, by_key, at))
        return [decided[(r.namespace, r.key)] for r in requests]

    def peek(
        self, requests: Sequence[ClaimRequest], *, now: datetime | None = None
    ) -> list[ClaimResult]:
        """The decisions :meth:`claim` would make, writing nothing (dry runs, read-only ledgers)."""
        by_key: dict[Key, ClaimRequest] = _unique_keys(requests)
        at = _utc(now)
        found = self._lookup(list(by_key))
        if not found:  # all new (a dry run's usual batch): what _decide says for a missing row
            return [_SEND] * len(requests)
        return [
            _decide(found.get((r.namespace, r.key)), r.fingerprint, self.run_id, at)
            for r in requests
        ]

    def record(self, outcomes: Sequence[LedgerOutcome], *, now: datetime | None = None) -> None:
        """Store outcomes in ONE transaction and end their claims.

        An upsert: validation dead letters were never claimed.
        """
        self._require_writable("record")
        by_key: dict[Key, LedgerOutcome] = _unique_keys(outcomes)
        if not by_key:
            return
        at = _utc(now)
        self._write(lambda conn: self._record_in(conn, by_key, at))

    def renew_leases(self, keys: Sequence[Key], *, now: datetime | None = None) -> None:
        """Extend this run's open claims on ``keys`` (heartbeat while messages wait to be sent)."""
        self._require_writable("renew_leases")
        at = _utc(now)
        values = {"lease_until": at + self.lease, "updated_at": at}
        renewed = self._write(lambda conn: self._update_own_claims(conn, keys, values))
        if renewed < len(set(keys)):
            logger.warning(
                "%d of %d ledger claims were no longer held by this run when renewed",
                len(set(keys)) - renewed,
                len(set(keys)),
            )

    def release(self, keys: Sequence[Key]) -> None:
        """Drop this run's claims that were never sent, so a later run sends them normally.

        A claim that carries an earlier ambiguous send (it came from ``RECOVER``) stays ambiguous:
        its lease is ended instead, and the next claimant gets ``RECOVER`` again. A key that was
        dead-lettered before and reclaimed for a changed body is removed like a new one.
        """
        self._require_writable("release")
        at = _utc(None)
        self._write(lambda conn: self._release_in(conn, keys, at))

    def operation_ids_in_use(self, operation_ids: Sequence[str]) -> set[str]:
        """Which of these operation ids some key in the ledger already owns."""
        ids = sorted(set(operation_ids))

        def query(conn: Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                found.update(
                    conn.scalars(sa.select(C.operation_id).where(C.operation_id.in_(chunk)))
                )
            return found

        return self._read(query, set())

    def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        """One row as a dict, or None."""
        return self._lookup([(namespace, key)]).get((namespace, key))

    def rows(
        self, *, namespace: str | None = None, status: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Matching rows in key order, fetched page by page (no transaction held between pages)."""
        query = sa.select(TABLE)
        if namespace is not None:
            query = query.where(C.namespace == namespace)
        if status is not None:
            query = query.where(C.status == status)
        return self._paged(query)

    def _paged(self, query: sa.Select[Any]) -> Iterator[dict[str, Any]]:
        """The rows of ``query`` in key order, one page at a time (keyset pagination)."""
        after: Key | None = None
        while True:
            page_query = query.order_by(C.namespace, C.key).limit(_CHUNK)
            if after is not None:
                page_query = page_query.where(
                    sa.or_(
                        C.namespace > after[0], sa.and_(C.namespace == after[0], C.key > after[1])
                    )
                )
            page = self._fetch(page_query)
            yield from page
            if len(page) < _CHUNK:
                return
            after = (page[-1]["namespace"], page[-1]["key"])

    # -- issue 6: confirmation, ledger report, re-drive -----------------------------------------

    def get_many(self, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        """Rows of ``keys`` read in one transaction; keys without a row are absent."""
        return self._lookup(list(set(keys)))

    def record_confirmations(
        self, updates: Sequence[ConfirmedStatus], *, now: datetime | None = None
    ) -> int:
        """Store Catena's final status of accepted operations, in ONE transaction.

        ``failed`` also turns the key into a dead letter with stage ``confirmation``: Catena gave
        up on the message, so the driver never got it, and a dead-lettered key is what makes a
        changed body (or a re-armed re-drive) go out again while the same body is not resent
        blindly. A row that is no longer accepted, or whose operation id differs (the key was
        sent again meanwhile), is left alone.

        Returns:
            The number of rows changed.
        """
        self._require_writable("record_confirmations")
        by_key: dict[Key, ConfirmedStatus] = _unique_keys(updates)
        if not by_key:
            return 0
        at = _utc(now)
        return self._write(lambda conn: self._confirm_in(conn, by_key, at))

    def status_counts(
        self,
        *,
        namespace: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        now: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Key counts for the ledger report, grouped by what tells their story apart.

        Each row: ``namespace``, ``status``, ``stage``, ``confirmed_status``, ``live`` (1 for a
        claim whose lease still runs and that carries no earlier ambiguous send, i.e. a send in
        progress right now) and ``count``. ``since``/``until`` bound ``updated_at`` (inclusive).
        """
        at = _utc(now)
        live = sa.case(
            (sa.and_(C.status == CLAIMED, C.lease_until > at, C.ambiguous_since.is_(None)), 1),
            else_=0,
        )
        inner = _report_filter(
            sa.select(C.namespace, C.status, C.stage, C.confirmed_status, live.label("live")),
            namespace,
            since,
            until,
        ).subquery()
        # Grouped outside: PostgreSQL would see the CASE in SELECT and GROUP BY as two
        # expressions (their bound parameters differ).
        i = inner.c
        query = (
            sa.select(i.namespace, i.status, i.stage, i.confirmed_status, i.live)
            .add_columns(sa.func.count().label("count"))
            .group_by(i.namespace, i.status, i.stage, i.confirmed_status, i.live)
            .order_by(i.namespace)
        )
        return self._fetch(query)

    def report_rows(
        self,
        *,
        namespace: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        settled: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Rows for the ledger report in key order, page by page.

        Without ``settled``, accepted keys that Catena did not report as pending or failed are
        left out: they are the bulk of any ledger and need nobody's attention.
        """
        query = _report_filter(sa.select(TABLE), namespace, since, until)
        if not settled:
            query = query.where(
                sa.or_(C.status != ACCEPTED, C.confirmed_status.in_(("pending", "failed")))
            )
        return self._paged(query)

    def rearm_dead_letters(
        self, keys: Sequence[Key], *, now: datetime | None = None
    ) -> dict[str, int]:
        """Let dead-lettered keys be sent again though body and settings are unchanged (re-drive).

        A key dead-lettered as ``ambiguous`` may have reached Catena: it becomes an open claim
        without a lease that remembers since when it is ambiguous, so the next claimant gets
        ``RECOVER`` and looks for an existing operation before any resend. Any other dead letter
        is removed, as if the key had never been sent. Accepted and claimed keys are untouched.

        Returns:
            ``{"removed": n, "ambiguous": n}``.
        """
        self._require_writable("rearm_dead_letters")
        at = _utc(now)
        return self._write(lambda conn: self._rearm_in(conn, keys, at))

    def _confirm_in(
        self, conn: Connection, by_key: dict[Key, ConfirmedStatus], at: datetime
    ) -> int:
        existing = self._select(conn, list(by_key), lock=True)
        failed: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        for key in sorted(by_key):
            update, row = by_key[key], existing.get(key)
            if (
                row is None
                or row["status"] != ACCEPTED
                or row["operation_id"] != update.operation_id
            ):
                continue
            values = {"namespace": key[0], "key": key[1], "confirmed_status": update.status}
            if update.status == "failed":
                fingerprint = row["fingerprint"]
                if update.retryable:
                    fingerprint = retryable_fingerprint(fingerprint)
                failed.append(
                    {
                        **values,
                        "status": DEAD_LETTERED,
                        "stage": "confirmation",
                        "fingerprint": fingerprint,
                    }
                )
            else:
                others.append(values)
        for rows in (failed, others):
            self._update_rows(conn, [{**r, "updated_at": at} for r in rows])
        return len(failed) + len(others)

    def _rearm_in(self, conn: Connection, keys: Sequence[Key], at: datetime) -> dict[str, int]:
        existing = self._select(conn, keys, lock=True)
        removed: list[Key] = []
        ambiguous: list[dict[str, Any]] = []
        for key, row in sorted(existing.items()):
            if row["status"] != DEAD_LETTERED:
                continue
            if row["stage"] != "ambiguous":
                removed.append(key)
                continue
            ambiguous.append(
                {
                    "namespace": key[0],
                    "key": key[1],
                    "status": CLAIMED,
                    "stage": None,
                    "operation_id": None,
                    "lease_until": None,
                    "ambiguous_since": row["claimed_at"] or row["resolved_at"] or row["updated_at"],
                    "resolved_at": None,
                    "updated_at": at,
                }
            )
        for namespace, group in _chunks(removed):
            conn.execute(
                sa.delete(TABLE).where(_match(namespace, group), C.status == DEAD_LETTERED)
            )
        self._update_rows(conn, ambiguous)
        return {"removed": len(removed), "ambiguous": len(ambiguous)}

    # -- transactions ---------------------------------------------------------------------------

    def _lookup(self, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        empty: dict[Key, dict[str, Any]] = {}
        return self._read(lambda conn: self._select(conn, keys, lock=False), empty)

    def _fetch(self, query: sa.Select[Any]) -> list[dict[str, Any]]:
        empty: list[dict[str, Any]] = []
        return self._read(lambda conn: [dict(r) for r in conn.execute(query).mappings()], empty)

    def _require_writable(self, what: str) -> None:
        if self.read_only:
            raise LedgerReadOnlyError(f"ledger at {self.location} is read-only; {what} refused")

    def _read(self, work: Callable[[Connection], T], empty: T) -> T:
        if self._engine is None:
            return empty
        try:
            with self._engine.connect() as conn, conn.begin():
                return work(conn)
        except sa.exc.SQLAlchemyError as exc:
            raise LedgerError(f"ledger at {self.location}: {_reason(exc)}") from exc

    def _write(self, work: Callable[[Connection], T]) -> T:
        assert self._engine is not None  # writable ledgers always have one
        attempt = 0
        while True:
            try:
                with self._engine.connect() as conn:
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
                    logger.info("ledger transaction retried after %s", _reason(exc))
                    continue
                raise LedgerError(f"ledger at {self.location}: {_reason(exc)}") from exc
            except sa.exc.SQLAlchemyError as exc:
                raise LedgerError(f"ledger at {self.location}: {_reason(exc)}") from exc

    def _prepare(self) -> None:
        if self._engine is None:
            return
        if self.read_only:
            if not self._read(lambda conn: sa.inspect(conn).has_table(TABLE.name), False):
                self.close()
                self._engine = None  # no table yet: an empty ledger, and we create nothing
                return
        else:
            self._write(_create_table)
        names: set[str] = self._read(
            lambda conn: {c["name"] for c in sa.inspect(conn).get_columns(TABLE.name)}, set()
        )
        missing = sorted(set(C.keys()) - names)
        if missing:
            raise LedgerError(
                f"ledger table at {self.location} lacks columns {missing}; "
                "it was made by another version"
            )

    # -- statements (inside a transaction) ------------------------------------------------------

    def _insert(self, conn: Connection) -> Any:
        dialect = pg_dialect if conn.dialect.name == "postgresql" else sqlite_dialect
        return dialect.insert(TABLE)

    def _claim_insert(self, conn: Connection) -> Any:
        """The claim's INSERT, built once per dialect: building it costs more than running it."""
        return _per_dialect(
            conn,
            "claim",
            lambda: (
                self._insert(conn)
                .on_conflict_do_nothing(index_elements=[C.namespace, C.key])
                .returning(C.namespace, C.key)
            ),
        )

    def _outcome_upsert(self, conn: Connection) -> Any:
        """The outcome upsert, built once per dialect (``excluded`` alone is a new alias a call).

        The claim's lease and ambiguity end: NULL in the statement rather than a bound NULL per
        row. ``claimed_at`` stays as history, so the rows carry none of the three.
        """

        def build() -> Any:
            insert = self._insert(conn)
            ended = {"lease_until": sa.null(), "ambiguous_since": sa.null()}
            return insert.on_conflict_do_update(
                index_elements=[C.namespace, C.key],
                set_={**{name: insert.excluded[name] for name in _OUTCOME_COLUMNS}, **ended},
            )

        return _per_dialect(conn, "outcome", build)

    def _select(
        self, conn: Connection, keys: Sequence[Key], *, lock: bool
    ) -> dict[Key, dict[str, Any]]:
        found: dict[Key, dict[str, Any]] = {}
        for namespace, group in _chunks(keys):
            query = sa.select(TABLE).where(_match(namespace, group)).order_by(C.namespace, C.key)
            if lock:
                query = query.with_for_update()  # rendered on PostgreSQL; SQLite holds the db lock
            for row in conn.execute(query).mappings():
                found[(row["namespace"], row["key"])] = dict(row)
        return found

    def _new_claim(self, request: ClaimRequest, at: datetime, until: datetime) -> dict[str, Any]:
        """An INSERT row for a key never seen: the columns that start NULL are left out."""
        return {
            "namespace": request.namespace,
            "key": request.key,
            "status": CLAIMED,
            "fingerprint": request.fingerprint,
            "attempts": 0,
            "connection_id": request.connection_id,
            "run_id": self.run_id,
            "claimed_at": at,
            "lease_until": until,
            "updated_at": at,
        }

    def _claim_values(
        self, request: ClaimRequest, at: datetime, ambiguous_since: datetime | None
    ) -> dict[str, Any]:
        return {
            "namespace": request.namespace,
            "key": request.key,
            "status": CLAIMED,
            "fingerprint": request.fingerprint,
            "operation_id": None,
            "stage": None,
            "attempts": 0,
            "connection_id": request.connection_id,
            "run_id": self.run_id,
            "claimed_at": at,
            "lease_until": at + self.lease,
            "ambiguous_since": ambiguous_since,
            "resolved_at": None,
            "confirmed_status": None,
            "updated_at": at,
        }

    def _claim_in(
        self, conn: Connection, by_key: dict[Key, ClaimRequest], at: datetime
    ) -> dict[Key, ClaimResult]:
        results: dict[Key, ClaimResult] = {}
        pending = sorted(by_key)
        # Normally one round. A row seen by the INSERT but deleted (released) by another process
        # before our SELECT is simply missing: try those keys again.
        until, new_claim = at + self.lease, self._new_claim
        for _ in range(5):
            new_rows = [new_claim(by_key[k], at, until) for k in pending]
            inserted = {(ns, key) for ns, key in conn.execute(self._claim_insert(conn), new_rows)}
            results.update(dict.fromkeys(inserted, _SEND))
            existing = self._select(conn, [k for k in pending if k not in inserted], lock=True)
            updates: list[dict[str, Any]] = []
            for key, row in existing.items():
                result = _decide(row, by_key[key].fingerprint, self.run_id, at)
                results[key] = result
                if result.decision in (Decision.SEND, Decision.RECOVER):
                    ambiguous = (
                        result.prior_claimed_at if result.decision is Decision.RECOVER else None
                    )
                    updates.append(self._claim_values(by_key[key], at, ambiguous))
            self._update_rows(conn, updates)
            pending = [k for k in pending if k not in results]
            if not pending:
                return results
        raise LedgerError(f"ledger at {self.location}: keys kept changing while being claimed")

    def _update_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = [name for name in rows[0] if name not in ("namespace", "key")]
        stmt = (
            sa.update(TABLE)
            .where(C.namespace == sa.bindparam("b_namespace"), C.key == sa.bindparam("b_key"))
            .values({name: sa.bindparam(f"b_{name}") for name in columns})
        )
        conn.execute(stmt, [{f"b_{name}": value for name, value in row.items()} for row in rows])

    def _record_in(self, conn: Connection, by_key: dict[Key, LedgerOutcome], at: datetime) -> None:
        run_id = self.run_id
        foreign = [
            (namespace, key)
            for namespace, key, status, holder in self._statuses(conn, list(by_key))
            if status == CLAIMED and holder != run_id
        ]
        if foreign:
            logger.warning(
                "%d outcome(s) recorded for keys another run had reclaimed after this run's lease "
                "ran out (e.g. %s); consider a longer lease",
                len(foreign),
                foreign[0],
            )
        rows = [
            {
                "namespace": o.namespace,
                "key": o.key,
                "status": o.status,
                "fingerprint": o.fingerprint,
                "operation_id": o.operation_id,
                "stage": o.stage,
                "attempts": o.attempts,
                "connection_id": o.connection_id,
                "run_id": run_id,
                "resolved_at": at,
                "confirmed_status": o.confirmed_status,
                "updated_at": at,
            }
            for o in (by_key[k] for k in sorted(by_key))
        ]
        conn.execute(self._outcome_upsert(conn), rows)

    def _statuses(self, conn: Connection, keys: Sequence[Key]) -> list[tuple[str, str, str, str]]:
        """(namespace, key, status, run_id) of the rows of ``keys``, locked in key order.

        Four text columns through one prepared statement: the outcome path only needs to know
        whose claims these are, and the full rows (five timestamps each to parse) cost more
        than the upsert that follows.
        """
        found: list[tuple[str, str, str, str]] = []
        for namespace, group in _chunks(keys):
            found += conn.execute(_STATUSES, {"namespace": namespace, "keys": group}).all()
        return found

    def _update_own_claims(
        self, conn: Connection, keys: Sequence[Key], values: dict[str, Any]
    ) -> int:
        changed = 0
        for namespace, group in _chunks(keys):
            own = sa.and_(_match(namespace, group), C.status == CLAIMED, C.run_id == self.run_id)
            conn.execute(sa.select(C.key).where(own).order_by(C.namespace, C.key).with_for_update())
            changed += conn.execute(sa.update(TABLE).where(own).values(values)).rowcount
        return changed

    def _release_in(self, conn: Connection, keys: Sequence[Key], at: datetime) -> None:
        for namespace, group in _chunks(keys):
            own = sa.and_(_match(namespace, group), C.status == CLAIMED, C.run_id == self.run_id)
            conn.execute(sa.select(C.key).where(own).order_by(C.namespace, C.key).with_for_update())
            conn.execute(sa.delete(TABLE).where(own, C.ambiguous_since.is_(None)))
            conn.execute(
                sa.update(TABLE)
                .where(own, C.ambiguous_since.is_not(None))
                .values(lease_until=None, updated_at=at)
            )


def _report_filter(
    query: sa.Select[Any],
    namespace: str | None,
    since: datetime | None,
    until: datetime | None,
) -> sa.Select[Any]:
    """The ledger report's filters: one namespace, ``updated_at`` within [since, until]."""
    if namespace is not None:
        query = query.where(C.namespace == namespace)
    if since is not None:
        query = query.where(C.updated_at >= _utc(since))
    if until is not None:
        query = query.where(C.updated_at <= _utc(until))
    return query


def _reason(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's own message, first line: no SQL, no parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
