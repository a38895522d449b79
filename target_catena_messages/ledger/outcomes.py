"""Outcome writes: what finally happened to keys, and the changes operators make to it later.

:meth:`Outcomes.record` is the recorder's one statement per group commit, and must be durable
before any STATE that covers its keys; it ends their claims. Confirmation turns Catena's final
word into the row (a failed operation becomes a dead letter), and a re-drive re-arms dead letters
so they may be sent again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from target_catena_messages.ledger.records import (
    ACCEPTED,
    CLAIMED,
    DEAD_LETTERED,
    ConfirmedStatus,
    Key,
    LedgerOutcome,
    retryable_fingerprint,
)
from target_catena_messages.ledger.schema import TABLE, C, _per_dialect
from target_catena_messages.ledger.store import (
    Store,
    chunks,
    logger,
    match,
    select_rows,
    unique_keys,
    update_rows,
    utc,
)

# What an outcome sets on an existing row (namespace and key identify it; claimed_at stays).
_OUTCOME_COLUMNS = (
    "status",
    "fingerprint",
    "operation_id",
    "stage",
    "attempts",
    "connection_id",
    "run_id",
    "resolved_at",
    "confirmed_status",
    "updated_at",
)
# Whose claims the keys of an outcome batch are. One statement for every batch: the expanding IN
# keeps SQLAlchemy's compiled form cached.
_STATUSES = (
    sa.select(C.namespace, C.key, C.status, C.run_id)
    .where(
        C.namespace == sa.bindparam("namespace"), C.key.in_(sa.bindparam("keys", expanding=True))
    )
    .order_by(C.namespace, C.key)
    .with_for_update()  # rendered on PostgreSQL; SQLite holds the db lock
)


class Outcomes:
    """Outcome writes on one ledger, stamped with this run's id."""

    def __init__(self, store: Store, *, run_id: str) -> None:
        self._store = store
        self.run_id = run_id

    def record(self, outcomes: Sequence[LedgerOutcome], *, now: datetime | None = None) -> None:
        """Store outcomes in ONE transaction and end their claims.

        An upsert: validation dead letters were never claimed.
        """
        self._store.require_writable("record")
        by_key: dict[Key, LedgerOutcome] = unique_keys(outcomes)
        if not by_key:
            return
        at = utc(now)
        self._store.write(lambda conn: self._record_in(conn, by_key, at))

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
        self._store.require_writable("record_confirmations")
        by_key: dict[Key, ConfirmedStatus] = unique_keys(updates)
        if not by_key:
            return 0
        at = utc(now)
        return self._store.write(lambda conn: _confirm_in(conn, by_key, at))

    def rearm_dead_letters(
        self, keys: Sequence[Key], *, now: datetime | None = None
    ) -> dict[str, int]:
        """Let dead-lettered keys be sent again though body and settings are unchanged (re-drive).

        A key dead-lettered as ``ambiguous`` may have reached Catena: it becomes an open claim
        without a lease that remembers since when it is ambiguous, so the next claimant gets
        ``RECOVER`` and looks for an existing operation before any resend; its counters start
        again from 0 (the operator asked for a fresh try). Any other dead letter is removed, as
        if the key had never been sent. Accepted and claimed keys are untouched.

        Returns:
            ``{"removed": n, "ambiguous": n}``.
        """
        self._store.require_writable("rearm_dead_letters")
        at = utc(now)
        return self._store.write(lambda conn: _rearm_in(conn, keys, at))

    # -- statements (inside a transaction) ------------------------------------------------------

    def _record_in(self, conn: Connection, by_key: dict[Key, LedgerOutcome], at: datetime) -> None:
        run_id = self.run_id
        foreign = [
            (namespace, key)
            for namespace, key, status, holder in _statuses(conn, list(by_key))
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
        conn.execute(_outcome_upsert(conn), rows)


def _statuses(conn: Connection, keys: Sequence[Key]) -> list[tuple[str, str, str, str]]:
    """(namespace, key, status, run_id) of the rows of ``keys``, locked in key order.

    Four text columns through one prepared statement: the outcome path only needs to know
    whose claims these are, and the full rows (five timestamps each to parse) cost more
    than the upsert that follows.
    """
    found: list[tuple[str, str, str, str]] = []
    for namespace, group in chunks(keys):
        found += conn.execute(_STATUSES, {"namespace": namespace, "keys": group}).all()
    return found


def _outcome_upsert(conn: Connection) -> Any:
    """The outcome upsert, built once per dialect and reused for every group commit.

    Building it anew costs ~150-200 us a batch (``excluded`` is a new alias each time, and the
    SQL cache key is computed again), measured against a reused one. The claim's lease and
    ambiguity end: NULL in the statement rather than a bound NULL per row. ``claimed_at`` stays
    as history, so the rows carry none of the three.
    """

    def build() -> Any:
        dialect = pg_dialect if conn.dialect.name == "postgresql" else sqlite_dialect
        insert = dialect.insert(TABLE)
        ended = {"lease_until": sa.null(), "ambiguous_since": sa.null()}
        return insert.on_conflict_do_update(
            index_elements=[C.namespace, C.key],
            set_={**{name: insert.excluded[name] for name in _OUTCOME_COLUMNS}, **ended},
        )

    return _per_dialect(conn, "outcome", build)


def _confirm_in(conn: Connection, by_key: dict[Key, ConfirmedStatus], at: datetime) -> int:
    existing = select_rows(conn, list(by_key), lock=True)
    failed: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    for key in sorted(by_key):
        update, row = by_key[key], existing.get(key)
        if row is None or row["status"] != ACCEPTED or row["operation_id"] != update.operation_id:
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
        update_rows(conn, [{**r, "updated_at": at} for r in rows])
    return len(failed) + len(others)


def _rearm_in(conn: Connection, keys: Sequence[Key], at: datetime) -> dict[str, int]:
    existing = select_rows(conn, keys, lock=True)
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
                "ambiguous_resends": 0,
                "outage_exits": 0,
            }
        )
    for namespace, group in chunks(removed):
        conn.execute(sa.delete(TABLE).where(match(namespace, group), C.status == DEAD_LETTERED))
    update_rows(conn, ambiguous)
    return {"removed": len(removed), "ambiguous": len(ambiguous)}
