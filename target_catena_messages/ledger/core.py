"""The :class:`Ledger`: one object per opened ledger, handing each call to the job that owns it.

Claims and admission live in ``claims``, outcome writes in ``outcomes``, the read side in
``reads``; all three share one :class:`~target_catena_messages.ledger.store.Store` (the engine
and its transactions). Callers keep one object to open, pass around and close; the methods here
only forward, so each job's rules and SQL are read in one module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from target_catena_messages.ledger.claims import Claims
from target_catena_messages.ledger.engines import (
    _parse_url,
    _postgresql_engine,
    _sqlite_engine,
)
from target_catena_messages.ledger.outcomes import Outcomes
from target_catena_messages.ledger.reads import Reads
from target_catena_messages.ledger.records import (
    ClaimRequest,
    ClaimResult,
    ConfirmedStatus,
    Key,
    LedgerOutcome,
)
from target_catena_messages.ledger.store import Store


class Ledger:
    """Claims, outcomes and leases of message keys; open it with :meth:`Ledger.open`.

    A facade: each method forwards to the job that owns its SQL (``claims``, ``outcomes``,
    ``reads``), so callers keep one object while the jobs stay in modules of their own.
    """

    def __init__(self, store: Store, *, run_id: str, lease_seconds: float) -> None:
        self._store = store
        self.location = store.location
        self.run_id = run_id
        self.lease = timedelta(seconds=lease_seconds)
        self.claims = Claims(store, run_id=run_id, lease=self.lease)
        self.outcomes = Outcomes(store, run_id=run_id)
        self.reads = Reads(store)

    @classmethod
    def open(
        cls, url: str, *, run_id: str, read_only: bool = False, lease_seconds: float = 300.0
    ) -> Ledger:
        """Connect, and create or upgrade the tables (never when read-only).

        Raises:
            ConfigError: the URL is not a supported ledger URL.
            LedgerError: the ledger cannot be opened or prepared, or a newer target wrote it.
        """
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        parsed = _parse_url(url)
        if parsed.get_backend_name() == "sqlite":
            engine, location = _sqlite_engine(parsed, read_only=read_only)
        else:
            engine, location = _postgresql_engine(parsed, read_only=read_only)
        store = Store(engine, location=location, read_only=read_only)
        try:
            store.prepare()
        except BaseException:
            store.close()
            raise
        return cls(store, run_id=run_id, lease_seconds=lease_seconds)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release all connections."""
        self._store.close()

    # -- claims ---------------------------------------------------------------------------------

    def claim(
        self, requests: Sequence[ClaimRequest], *, now: datetime | None = None
    ) -> list[ClaimResult]:
        """Decide and claim a batch in one transaction: :meth:`Claims.claim`."""
        return self.claims.claim(requests, now=now)

    def peek(
        self, requests: Sequence[ClaimRequest], *, now: datetime | None = None
    ) -> list[ClaimResult]:
        """The decisions a claim would make, writing nothing: :meth:`Claims.peek`."""
        return self.claims.peek(requests, now=now)

    def renew_leases(self, keys: Sequence[Key], *, now: datetime | None = None) -> None:
        """Extend this run's open claims: :meth:`Claims.renew_leases`."""
        self.claims.renew_leases(keys, now=now)

    def release(self, keys: Sequence[Key]) -> None:
        """Give back this run's claims that were never sent: :meth:`Claims.release`."""
        self.claims.release(keys)

    def note_resend(self, namespace: str, key: str) -> int:
        """Count a resend after an ambiguous attempt: :meth:`Claims.note_resend`."""
        return self.claims.note_resend(namespace, key)

    def leave_for_lookup(self, items: Sequence[tuple[Key, datetime]]) -> None:
        """End unresolved maybe-sent claims, ambiguous: :meth:`Claims.leave_for_lookup`."""
        self.claims.leave_for_lookup(items)

    def note_outage_exit(self, keys: Sequence[Key]) -> dict[Key, int]:
        """Count an outage exit on this run's claims: :meth:`Claims.note_outage_exit`."""
        return self.claims.note_outage_exit(keys)

    # -- outcomes -------------------------------------------------------------------------------

    def record(self, outcomes: Sequence[LedgerOutcome], *, now: datetime | None = None) -> None:
        """Store outcomes and end their claims, in one transaction: :meth:`Outcomes.record`."""
        self.outcomes.record(outcomes, now=now)

    def record_confirmations(
        self, updates: Sequence[ConfirmedStatus], *, now: datetime | None = None
    ) -> int:
        """Store Catena's final statuses: :meth:`Outcomes.record_confirmations`."""
        return self.outcomes.record_confirmations(updates, now=now)

    def rearm_dead_letters(
        self, keys: Sequence[Key], *, now: datetime | None = None
    ) -> dict[str, int]:
        """Make dead letters sendable again (re-drive): :meth:`Outcomes.rearm_dead_letters`."""
        return self.outcomes.rearm_dead_letters(keys, now=now)

    # -- reads ----------------------------------------------------------------------------------

    def count(self) -> int:
        """Keys in the ledger, all namespaces."""
        return self.reads.count()

    def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        """One row as a dict, or None."""
        return self.reads.get(namespace, key)

    def get_many(self, keys: Sequence[Key]) -> dict[Key, dict[str, Any]]:
        """Rows of ``keys`` read in one transaction; keys without a row are absent."""
        return self.reads.get_many(keys)

    def operation_ids_in_use(self, operation_ids: Sequence[str]) -> set[str]:
        """Which of these operation ids some key in the ledger already owns."""
        return self.reads.operation_ids_in_use(operation_ids)

    def rows(
        self, *, namespace: str | None = None, status: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Matching rows in key order, page by page: :meth:`Reads.rows`."""
        return self.reads.rows(namespace=namespace, status=status)

    def status_counts(
        self,
        *,
        namespace: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        now: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Key counts for the ledger report: :meth:`Reads.status_counts`."""
        return self.reads.status_counts(namespace=namespace, since=since, until=until, now=now)

    def report_rows(
        self,
        *,
        namespace: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        settled: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Rows for the ledger report, page by page: :meth:`Reads.report_rows`."""
        return self.reads.report_rows(
            namespace=namespace, since=since, until=until, settled=settled
        )
