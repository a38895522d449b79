"""The read side: rows and counts for the ledger report, confirmation, re-drive and recovery.

Nothing here writes or locks, and every query works on a read-only ledger (dry runs, the report
without ``--refresh``) and on one that does not exist yet (empty). Long listings are paged, one
transaction a page, so a report never holds back a running target's writers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from target_catena_messages.ledger.records import ACCEPTED, CLAIMED, Key
from target_catena_messages.ledger.schema import TABLE, C
from target_catena_messages.ledger.store import CHUNK, Store, utc


class Reads:
    """Queries on one ledger."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def count(self) -> int:
        """Keys in the ledger, all namespaces."""
        query = sa.select(sa.func.count()).select_from(TABLE)
        return self._store.read(lambda conn: int(conn.scalar(query) or 0), 0)

    def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        """One row as a dict, or None."""
        return self._store.lookup([(namespace, key)]).get((namespace, key))

    def get_many(self, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        """Rows of ``keys`` read in one transaction; keys without a row are absent."""
        return self._store.lookup(keys)  # lookup's chunks drop repeated keys

    def operation_ids_in_use(self, operation_ids: Sequence[str]) -> set[str]:
        """Which of these operation ids some key in the ledger already owns."""
        ids = sorted(set(operation_ids))

        def query(conn: Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                found.update(
                    conn.scalars(sa.select(C.operation_id).where(C.operation_id.in_(chunk)))
                )
            return found

        return self._store.read(query, set())

    def rows(
        self, *, namespace: str | None = None, status: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Matching rows in key order, fetched page by page (no transaction held between pages)."""
        query = sa.select(*self._store.row_columns)
        if namespace is not None:
            query = query.where(C.namespace == namespace)
        if status is not None:
            query = query.where(C.status == status)
        return self._store.paged(query)

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
        at = utc(now)
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
        return self._store.fetch(query)

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
        query = _report_filter(sa.select(*self._store.row_columns), namespace, since, until)
        if not settled:
            query = query.where(
                sa.or_(C.status != ACCEPTED, C.confirmed_status.in_(("pending", "failed")))
            )
        return self._store.paged(query)


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
        query = query.where(C.updated_at >= utc(since))
    if until is not None:
        query = query.where(C.updated_at <= utc(until))
    return query
