"""Admission: which messages of a batch are sent, decided with the ledger. Reader thread only.

For each batch: catena_ids users resolution, then one ledger transaction that claims (or, in a
dry run, peeks at) every key, then the claimed messages go to delivery in input order. Owned
here, on the reader thread: every ledger claim and every submit to delivery, the keys held by
another process (re-polled), and the follow-up queue the recorder fills with later copies of a
key to decide afresh. Shared under the run lock with the recorder, which settles keys: the keys
in flight (``pending``: key → later copies held behind it) and our live claims (``claimed``).

The reader may sit blocked on stdin while follow-ups wait; they are admitted at the next batch,
in the backpressure wait and in the run's finish. They are not claimed meanwhile, so nothing
expires; they only hold STATE back until then. Decisions made here may be fatal
(``on_invalid_record: fail``); raising them on the reader thread sends the run down its fatal
path, which still writes the newest safe STATE. The rules kept here are in docs/design.md
("Exactly-once rules" 1, 4, 5, 6, 7, 11).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

from target_catena_messages.catena.errors import CatenaApiError
from target_catena_messages.delivery import Delivery
from target_catena_messages.errors import FatalError
from target_catena_messages.ledger import ClaimRequest, ClaimResult, Decision, Ledger
from target_catena_messages.outcome import Message, Outcome, Resolution, Stage
from target_catena_messages.pipeline.prepare import Preparer
from target_catena_messages.pipeline.recorder import Key, QueueItem, WouldSend
from target_catena_messages.resolve import UserResolver
from target_catena_messages.settings import Settings

_PLACEHOLDER_USER = "00000000-0000-4000-8000-000000000000"  # dry run: validate without lookups
_ELSEWHERE_POLL = 2.0  # seconds between looks at keys another process is sending


class Admission:
    """Ledger decisions per batch and the keys this run holds.

    Args:
        outcomes: The recorder's queue: decided-now messages end there as Outcomes.
        delivery: Where claimed messages go (None: a dry run).
        resolver: Looks up Catena user ids for catena_ids bodies (None: not needed or dry run).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        lock: threading.RLock,
        ledger: Ledger,
        preparer: Preparer,
        outcomes: queue.SimpleQueue[QueueItem],
        delivery: Delivery | None,
        resolver: UserResolver | None,
    ) -> None:
        self._settings = settings
        self._lock = lock
        self._ledger = ledger
        self._preparer = preparer
        self._resolve: Callable[[QueueItem], None] = outcomes.put
        self._delivery = delivery
        self._resolver = resolver
        self._resolve_ids = settings.message_schema == "catena_ids"
        self.pending: dict[Key, list[Message]] = {}  # run lock: key in flight -> later copies
        self.claimed: set[Key] = set()  # run lock: our live claims, their leases renewed
        self.followups: queue.SimpleQueue[list[Message]] = queue.SimpleQueue()  # from recorder
        self._elsewhere: list[Message] = []
        self._last_elsewhere_poll = 0.0
        self._last_renewal = time.monotonic()  # recorder thread only

    @property
    def has_followups(self) -> bool:
        """Whether the recorder handed back copies that wait to be admitted."""
        return not self.followups.empty()

    def admit(self, messages: Sequence[Message]) -> None:
        """Decide each message with the ledger (one transaction), send the new ones."""
        if self._resolve_ids:
            self._resolve_users([m for m in messages if m.unresolved is not None])
        invalid: list[Message] = []
        sendable: list[Message] = []
        with self._lock:
            pending = self.pending
            for m in messages:
                key = (m.namespace, m.key)
                waiting = pending.get(key)
                if waiting is not None:  # an earlier copy of this key is still on its way
                    waiting.append(m)
                else:
                    pending[key] = []
                    (invalid if m.errors or m.expired else sendable).append(m)
        for m, result in zip(invalid, self._ledger.peek(_claims(invalid)), strict=True):
            self._decide_invalid(m, result)
        claim = self._ledger.peek if self._settings.dry_run else self._ledger.claim
        dry = self._delivery is None
        would_send = WouldSend()
        to_send: list[Message] = []
        for m, result in zip(sendable, claim(_claims(sendable)), strict=True):
            if result.decision is _SEND:  # the usual case, decided here without a call
                (would_send if dry else to_send).append(m)
            elif self._decide_sendable(m, result):
                to_send.append(m)
        if would_send:
            self._resolve(would_send)
        self._send(to_send)

    def admit_followups(self) -> None:
        """Decide afresh the later copies the recorder handed back, in the order it did."""
        while True:
            try:
                followups = self.followups.get_nowait()
            except queue.Empty:
                return
            self.admit(followups)

    def poll_elsewhere(self) -> None:
        """Ask the ledger again about keys another process was sending (it may have died)."""
        now = time.monotonic()
        if not self._elsewhere or now - self._last_elsewhere_poll < _ELSEWHERE_POLL:
            return
        self._last_elsewhere_poll = now
        with self._lock:
            waiting, self._elsewhere = self._elsewhere, []
        if self._settings.dry_run:
            results = self._ledger.peek(_claims(waiting))
        else:
            results = self._ledger.claim(_claims(waiting))
        self._send(
            [m for m, r in zip(waiting, results, strict=True) if self._decide_sendable(m, r)]
        )

    def renew_leases(self, now: float) -> None:
        """Heartbeat (called by the recorder): claims waiting in a lane must not expire."""
        if (
            self._settings.dry_run
            or now - self._last_renewal < self._ledger.lease.total_seconds() / 3
        ):
            return
        self._last_renewal = now
        with self._lock:
            keys = list(self.claimed)
        if keys:
            self._ledger.renew_leases(keys)

    def _resolve_users(self, messages: list[Message]) -> None:
        """catena_ids: turn provider ids into Catena user ids, batched per connection."""
        by_connection: dict[str | None, list[Message]] = {}
        for m in messages:
            by_connection.setdefault(m.connection_id, []).append(m)
        for connection_id, group in by_connection.items():
            ids = {i for m in group for i in (m.unresolved.sender, m.unresolved.recipient) if i}
            if connection_id is None or self._resolver is None:
                # No connection (a validation error follows anyway) or a dry run: no requests.
                found: dict[str, str | None] = dict.fromkeys(ids, _PLACEHOLDER_USER)
            else:
                try:
                    found = self._resolver.resolve(connection_id, ids)
                except CatenaApiError as exc:
                    for m in group:
                        m.unresolved = None
                        m.errors = [{"field": None, "message": f"users lookup failed: {exc}"}]
                        m.lookup_failed = True
                    continue
            apply_users = self._preparer.apply_users
            for m in group:
                apply_users(m, found)

    def _decide_invalid(self, m: Message, result: ClaimResult) -> None:
        if result.decision is Decision.DUPLICATE:
            self._resolve(Outcome(m, Resolution.DUPLICATE, operation_id=result.operation_id))
        elif result.decision is Decision.PREVIOUSLY_DEAD_LETTERED:
            self._resolve(Outcome(m, Resolution.PREVIOUSLY_DEAD_LETTERED, stage=result.stage))
        elif m.lookup_failed:
            self._resolve(
                Outcome(
                    m,
                    Resolution.DEAD_LETTERED,
                    stage=Stage.API,
                    errors=tuple(m.errors),
                    retryable=True,
                )
            )
        elif m.errors:
            if self._settings.on_invalid_record == "fail":
                raise FatalError(
                    f"invalid record in stream {m.stream} (key {m.key}): "
                    + "; ".join(f"{e['field']}: {e['message']}" for e in m.errors)
                    + " (on_invalid_record: fail)"
                )
            self._resolve(
                Outcome(m, Resolution.DEAD_LETTERED, stage=Stage.VALIDATION, errors=tuple(m.errors))
            )
        else:
            hours = self._settings.max_message_age_hours
            expired = {
                "field": self._settings.message_time_field,
                "message": f"older than max_message_age_hours ({hours:g} h): never sent",
            }
            self._resolve(Outcome(m, Resolution.EXPIRED, stage=Stage.EXPIRED, errors=(expired,)))

    def _decide_sendable(self, m: Message, result: ClaimResult) -> bool:
        """Act on a claim decision; True: ``m`` is to be sent (the caller passes it to _send)."""
        decision = result.decision
        if decision is Decision.DUPLICATE:
            self._resolve(Outcome(m, Resolution.DUPLICATE, operation_id=result.operation_id))
        elif decision is Decision.PREVIOUSLY_DEAD_LETTERED:
            self._resolve(Outcome(m, Resolution.PREVIOUSLY_DEAD_LETTERED, stage=result.stage))
        elif decision is Decision.IN_PROGRESS_ELSEWHERE:
            with self._lock:
                self._elsewhere.append(m)
        elif self._delivery is None:  # dry run
            self._resolve(Outcome(m, Resolution.WOULD_SEND))
        else:
            if decision is Decision.RECOVER:  # an earlier run may have sent it: never released
                m.recover = True
                m.maybe_sent = True
                m.prior_claimed_at = result.prior_claimed_at
            return True
        return False

    def _send(self, messages: list[Message]) -> None:
        """Hand claimed messages to delivery in input order (lanes keep it), one lock hold each.

        One lock round per batch rather than two per message: the reader would otherwise take
        turns on delivery's lock with every sending thread (a thread switch each time).
        """
        if not messages or self._delivery is None:
            return
        with self._lock:
            self.claimed.update([(m.namespace, m.key) for m in messages])
        self._delivery.submit_many(messages)


_SEND = Decision.SEND


def _claims(messages: Sequence[Message]) -> list[ClaimRequest]:
    return [ClaimRequest(m.namespace, m.key, m.fingerprint, m.connection_id) for m in messages]
