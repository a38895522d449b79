"""Admission: claiming keys before their POST, and holding or giving back those claims.

A key is claimed (committed, with a lease) before anything is sent for it; the decision for a key
that already has a row is :func:`~target_catena_messages.ledger.decision._decide`, shared with
:meth:`Claims.peek` so a dry run decides exactly as a real run would. A claim ends with its outcome
(``outcomes``), with :meth:`Claims.release` when it was never sent, with
:meth:`Claims.leave_for_lookup` or :meth:`Claims.note_outage_exit` when the run stops with it
unresolved, or by running out of lease when its process died; the next claimant of an expired or
ambiguous claim gets ``RECOVER``. The counters the ledger keeps across runs for a key (resends
after ambiguous attempts, runs ended by an outage) are written here too: they belong to the claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from target_catena_messages.ledger.decision import _SEND, _decide
from target_catena_messages.ledger.records import (
    CLAIMED,
    ClaimRequest,
    ClaimResult,
    Decision,
    Key,
    LedgerError,
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

_CLAIM_ROUNDS = 5  # a key released by another process between our INSERT and SELECT is retried


class Claims:
    """This run's claims on one ledger: claim, peek, renew, release."""

    def __init__(self, store: Store, *, run_id: str, lease: timedelta) -> None:
        self._store = store
        self.run_id = run_id
        self.lease = lease

    def claim(
        self, requests: Sequence[ClaimRequest], *, now: datetime | None = None
    ) -> list[ClaimResult]:
        """Decide and claim a batch in ONE transaction; results follow request order.

        A key may appear only once per call (ValueError otherwise): one batch cannot race itself.
        """
        self._store.require_writable("claim")
        by_key: dict[Key, ClaimRequest] = unique_keys(requests)
        if not by_key:
            return []
        at = utc(now)
        decided = self._store.write(lambda conn: self._claim_in(conn, by_key, at))
        return [decided[(r.namespace, r.key)] for r in requests]

    def peek(
        self, requests: Sequence[ClaimRequest], *, now: datetime | None = None
    ) -> list[ClaimResult]:
        """The decisions :meth:`claim` would make, writing nothing (dry runs, read-only ledgers)."""
        by_key: dict[Key, ClaimRequest] = unique_keys(requests)
        at = utc(now)
        found = self._store.lookup(list(by_key))
        if not found:  # all new (a dry run's usual batch): what _decide says for a missing row
            return [_SEND] * len(requests)
        return [
            _decide(found.get((r.namespace, r.key)), r.fingerprint, self.run_id, at)
            for r in requests
        ]

    def renew_leases(self, keys: Sequence[Key], *, now: datetime | None = None) -> None:
        """Extend this run's open claims on ``keys`` (heartbeat while messages wait to be sent)."""
        self._store.require_writable("renew_leases")
        at = utc(now)
        values = {"lease_until": at + self.lease, "updated_at": at}
        renewed = self._store.write(lambda conn: self._update_own_claims(conn, keys, values))
        held = len(set(keys))
        if renewed < held:
            logger.warning(
                "%d of %d ledger claims were no longer held by this run when renewed",
                held - renewed,
                held,
            )

    def release(self, keys: Sequence[Key]) -> None:
        """Drop this run's claims that were never sent, so a later run sends them normally.

        A claim that carries an earlier ambiguous send (it came from ``RECOVER``) stays ambiguous:
        its lease is ended instead, and the next claimant gets ``RECOVER`` again. So does a claim
        with outage exits counted (its lease ended, the count kept; the next claimant sends it).
        A key that was dead-lettered before and reclaimed for a changed body is removed like a
        new one.
        """
        self._store.require_writable("release")
        at = utc(None)
        self._store.write(lambda conn: self._release_in(conn, keys, at))

    def note_resend(self, namespace: str, key: str, *, now: datetime | None = None) -> int:
        """Count one more resend after an ambiguous attempt of this run's claim on ``key``.

        Committed before the resend's POST, so the limit on such resends holds across runs even
        when this process dies right after sending.

        Returns:
            The key's resends after ambiguous attempts, across runs, this one included.

        Raises:
            LedgerError: the claim is no longer this run's (its lease ran out and another run
                took the key): that run looks the key up first, and a resend here could make a
                second copy.
        """
        self._store.require_writable("note_resend")
        at = utc(now)
        own = self._own((namespace, key))
        stmt = (
            sa.update(TABLE)
            .where(own)
            .values(ambiguous_resends=C.ambiguous_resends + 1, updated_at=at)
            .returning(C.ambiguous_resends)
        )
        count = self._store.write(lambda conn: conn.execute(stmt).scalar_one_or_none())
        if count is None:
            raise LedgerError(
                f"ledger at {self._store.location}: key {key!r} in namespace {namespace!r} is "
                "no longer claimed by this run (its lease ran out); a resend could make a copy"
            )
        return int(count)

    def leave_for_lookup(
        self, items: Sequence[tuple[Key, datetime]], *, now: datetime | None = None
    ) -> None:
        """End this run's claims whose send may have reached Catena and stays unresolved.

        For a run that stops with such keys: the lease ends now (a run elsewhere need not wait
        it out) and the claim stays, ambiguous since the given time (the first attempt's start)
        unless it already was; the next claimant gets ``RECOVER`` and looks the key up before
        any resend. Never deleted.
        """
        self._store.require_writable("leave_for_lookup")
        since: dict[Key, datetime] = {}
        for key, started in items:
            if key in since:
                raise ValueError(f"key {key!r} passed twice in one ledger call")
            since[key] = utc(started)
        if not since:
            return
        at = utc(now)
        held = self._store.write(lambda conn: self._leave_in(conn, since, at))
        self._warn_not_held("left for lookup", held, len(since))

    def note_outage_exit(
        self, keys: Sequence[Key], *, now: datetime | None = None
    ) -> dict[Key, int]:
        """Count a run that ends because Catena is unavailable with these claims of its own.

        Each claim's ``outage_exits`` grows by one and its lease ends; the row stays even if the
        key was never sent, so the count carries over to the next claimant, which sends it (a
        plain ``SEND``). A key whose send may have reached Catena must also be passed to
        :meth:`leave_for_lookup` (before or after): that makes its next claim ``RECOVER``.

        Returns:
            Each key's new count; keys this run no longer holds are left out (and logged).
        """
        self._store.require_writable("note_outage_exit")
        if not keys:
            return {}
        at = utc(now)
        counts = self._store.write(lambda conn: self._outage_in(conn, keys, at))
        self._warn_not_held("counted as outage exits", len(counts), len(set(keys)))
        return counts

    # -- statements (inside a transaction) ------------------------------------------------------

    def _claim_in(
        self, conn: Connection, by_key: dict[Key, ClaimRequest], at: datetime
    ) -> dict[Key, ClaimResult]:
        results: dict[Key, ClaimResult] = {}
        pending = sorted(by_key)
        # Normally one round. A row seen by the INSERT but deleted (released) by another process
        # before our SELECT is simply missing: try those keys again.
        until, new_claim = at + self.lease, self._new_claim
        for _ in range(_CLAIM_ROUNDS):
            new_rows = [new_claim(by_key[k], at, until) for k in pending]
            inserted = {(ns, key) for ns, key in conn.execute(_claim_insert(conn), new_rows)}
            results.update(dict.fromkeys(inserted, _SEND))
            existing = select_rows(conn, [k for k in pending if k not in inserted], lock=True)
            updates: list[dict[str, Any]] = []
            for key, row in existing.items():
                result = _decide(row, by_key[key].fingerprint, self.run_id, at)
                results[key] = result
                if result.decision in (Decision.SEND, Decision.RECOVER):
                    ambiguous = (
                        result.prior_claimed_at if result.decision is Decision.RECOVER else None
                    )
                    updates.append(self._claim_values(by_key[key], at, ambiguous, result))
            update_rows(conn, updates)
            pending = [k for k in pending if k not in results]
            if not pending:
                return results
        raise LedgerError(
            f"ledger at {self._store.location}: keys kept changing while being claimed"
        )

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
        self,
        request: ClaimRequest,
        at: datetime,
        ambiguous_since: datetime | None,
        decided: ClaimResult,
    ) -> dict[str, Any]:
        """Every column of a reclaimed row: what an earlier claim or outcome left is reset.

        The counters are the decision's: kept for the same message, 0 for a new one.
        """
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
            "ambiguous_resends": decided.ambiguous_resends,
            "outage_exits": decided.outage_exits,
        }

    def _own(self, key: Key) -> sa.ColumnElement[bool]:
        """The row of ``key`` while this run holds its claim."""
        return sa.and_(
            C.namespace == key[0], C.key == key[1], C.status == CLAIMED, C.run_id == self.run_id
        )

    def _warn_not_held(self, what: str, held: int, asked: int) -> None:
        if held < asked:
            logger.warning(
                "%d of %d ledger claims were no longer held by this run when %s",
                asked - held,
                asked,
                what,
            )

    def _leave_in(self, conn: Connection, since: dict[Key, datetime], at: datetime) -> int:
        held = 0
        for namespace, group in chunks(list(since)):
            _, locked = self._lock_own(conn, namespace, group)
            rows = [
                {"b_namespace": namespace, "b_key": k, "b_since": since[(namespace, k)]}
                for k in sorted(locked)
            ]
            if rows:
                conn.execute(_leave_update(self.run_id, at), rows)
            held += len(rows)
        return held

    def _outage_in(self, conn: Connection, keys: Sequence[Key], at: datetime) -> dict[Key, int]:
        counts: dict[Key, int] = {}
        for namespace, group in chunks(keys):
            own, _ = self._lock_own(conn, namespace, group)
            counted = conn.execute(
                sa.update(TABLE)
                .where(own)
                .values(outage_exits=C.outage_exits + 1, lease_until=None, updated_at=at)
                .returning(C.key, C.outage_exits)
            )
            counts.update({(namespace, k): int(n) for k, n in counted})
        return counts

    def _lock_own(
        self, conn: Connection, namespace: str, keys: list[str]
    ) -> tuple[sa.ColumnElement[bool], list[str]]:
        """Lock this run's claims among ``keys`` (in key order: no deadlock between runs).

        Returns the condition that selects them, and the keys it locked.
        """
        own = sa.and_(match(namespace, keys), C.status == CLAIMED, C.run_id == self.run_id)
        locked = conn.execute(
            sa.select(C.key).where(own).order_by(C.namespace, C.key).with_for_update()
        ).scalars()
        return own, list(locked)

    def _update_own_claims(
        self, conn: Connection, keys: Sequence[Key], values: dict[str, Any]
    ) -> int:
        changed = 0
        for namespace, group in chunks(keys):
            own, _ = self._lock_own(conn, namespace, group)
            changed += conn.execute(sa.update(TABLE).where(own).values(values)).rowcount
        return changed

    def _release_in(self, conn: Connection, keys: Sequence[Key], at: datetime) -> None:
        for namespace, group in chunks(keys):
            own, _ = self._lock_own(conn, namespace, group)
            fresh = sa.and_(C.ambiguous_since.is_(None), C.outage_exits == 0)
            conn.execute(sa.delete(TABLE).where(own, fresh))
            conn.execute(
                sa.update(TABLE).where(own, sa.not_(fresh)).values(lease_until=None, updated_at=at)
            )


def _claim_insert(conn: Connection) -> Any:
    """The claim's INSERT, built once per dialect and reused for every batch.

    Building it anew costs ~20 us a batch (the construct plus its SQL cache key, which a reused
    statement keeps), measured against a reused one; a batch can be a few rows (follow-ups).
    """

    def build() -> Any:
        dialect = pg_dialect if conn.dialect.name == "postgresql" else sqlite_dialect
        return (
            dialect.insert(TABLE)
            .on_conflict_do_nothing(index_elements=[C.namespace, C.key])
            .returning(C.namespace, C.key)
        )

    return _per_dialect(conn, "claim", build)


def _leave_update(run_id: str, at: datetime) -> Any:
    """One claim left for lookup: lease ended, ambiguous since the given time unless already."""
    return (
        sa.update(TABLE)
        .where(
            C.namespace == sa.bindparam("b_namespace"),
            C.key == sa.bindparam("b_key"),
            C.status == CLAIMED,
            C.run_id == run_id,
        )
        .values(
            lease_until=None,
            ambiguous_since=sa.func.coalesce(
                C.ambiguous_since, sa.bindparam("b_since", type_=C.ambiguous_since.type)
            ),
            updated_at=at,
        )
    )
