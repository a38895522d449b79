"""Admission: which messages of a batch are sent, decided with the ledger.

For each batch: provider ids resolved to Catena user ids (body versions that need them), then
one ledger transaction that claims (or, in a dry run, peeks at) every key, then the claimed
messages go to delivery in input order. Two threads admit, one at a time under the admission
lock: the *reader* admits each sink batch itself (inline: handing it to another thread would
only add a GIL hand-over per batch, measured at several per cent of a dry run's CPU), and the
*follow-up thread* admits the later copies of a key that the recorder hands back and re-polls
the keys held by another process. That thread exists because the reader may sit blocked on
stdin while such copies wait: they would hold STATE back until the tap sent more (a tap that
waits for STATE, or a quiet stream, would never see it).

A key held by another (or a dead) run also holds its driver's lane: every later message of that
lane waits here (not claimed, or claimed by us but not submitted) until the held key is decided,
so a re-run never sends a driver's message 5 before message 4 that another run still holds.

Shared under the run lock with the recorder, which settles keys: the keys in flight
(``pending``: key → later copies held behind them) and our live claims (``claimed``). A decision
may be fatal (``on_invalid_record: fail``): on the reader it raises at once; on the follow-up
thread it stops that thread and is kept in :attr:`Admission.error`, which the reader raises at
its next look. Either way the run takes its fatal path with the newest safe STATE. The rules
kept here are in docs/design.md ("Exactly-once rules" 1, 4, 5, 6, 7, 11).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from target_catena_messages.catena.errors import CatenaApiError
from target_catena_messages.delivery.engine import Delivery
from target_catena_messages.errors import FatalError, FatalKind
from target_catena_messages.ledger import ClaimRequest, ClaimResult, Decision, Ledger
from target_catena_messages.outcome import Message, Outcome, Resolution, Stage
from target_catena_messages.pipeline.prepare import Preparer
from target_catena_messages.pipeline.recorder import Key, QueueItem, WouldSend
from target_catena_messages.pipeline.report import plural
from target_catena_messages.pipeline.users import PLACEHOLDER_USER_ID, UserResolver
from target_catena_messages.settings import Settings

logger = logging.getLogger(__name__)

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
        self._version = settings.body_version
        self._resolve_ids = self._version.resolves_user_ids
        self.pending: dict[Key, list[Message]] = {}  # run lock: key in flight -> later copies
        self.claimed: set[Key] = set()  # run lock: our live claims, their leases renewed
        self._followups: queue.SimpleQueue[list[Message]] = queue.SimpleQueue()  # from recorder
        self._wake: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: copies; False: stop
        self._admitting = threading.Lock()  # one admitter at a time: reader or follow-up thread
        self._elsewhere: list[Message] = []  # keys held by another run: one per lane in _behind
        # Lane -> its later messages waiting behind the lane's key in _elsewhere, in input order;
        # True: claimed by us (lease renewed, not submitted), False: not claimed yet.
        self._behind: dict[str, list[tuple[Message, bool]]] = {}
        self._last_elsewhere_poll = 0.0
        self._last_renewal = time.monotonic()  # recorder thread only
        self._duplicates: list[Message] = []  # this batch's, for _hint_changed_duplicates
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="follow-ups", daemon=True)

    def start(self) -> None:
        """Start the follow-up thread."""
        self._thread.start()

    def admit_batch(self, messages: Sequence[Message]) -> None:
        """A sink batch (reader thread): copies handed back first, then the batch, inline."""
        with self._admitting:
            self._admit_followups()
            self._admit(messages)

    def hand_back(self, messages: list[Message]) -> None:
        """Later copies of settled keys (recorder thread): decided afresh by admission."""
        self._followups.put(messages)
        self._wake.put(True)

    def stop(self) -> None:
        """End the follow-up thread (after the transaction in progress); admit nothing more.

        Messages claimed by us while they waited behind a key held elsewhere were never
        submitted: they end ABANDONED through the recorder, which releases the claims that
        were surely never sent (a recovered one keeps its claim). The rest that wait, like the
        keys held elsewhere, simply stay unresolved: STATE never passes them.
        """
        self._wake.put(False)
        self._thread.join()
        behind, self._behind = self._behind, {}
        for waiting in behind.values():
            for m, ours in waiting:
                if ours:
                    self._resolve(Outcome(m, Resolution.ABANDONED))

    def _loop(self) -> None:
        try:
            while True:
                try:
                    more = self._wake.get(timeout=_ELSEWHERE_POLL)
                except queue.Empty:
                    more = True  # a quiet moment: still look at keys held elsewhere
                if not more:
                    return
                with self._admitting:
                    self._admit_followups()
                    self.poll_elsewhere()
        except BaseException as exc:  # noqa: BLE001 - the reader raises it on its next look
            self.error = exc

    def _admit(self, messages: Sequence[Message]) -> None:
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
        peeked = zip(invalid, self._ledger.peek(_claims(invalid)), strict=True)
        lookups = [m for m, result in peeked if self._decide_invalid(m, result)]
        behind = self._behind
        if behind:  # lanes waiting behind a key held elsewhere: their messages are not claimed
            sendable = self._wait_behind(sendable)
        claim = self._ledger.peek if self._settings.dry_run else self._ledger.claim
        dry = self._delivery is None
        would_send = WouldSend()
        to_send: list[Message] = []
        for m, result in zip(sendable, claim(_claims(sendable)), strict=True):
            if behind and m.lane in behind:  # an earlier one of this batch is held elsewhere
                self._hold(m, result)
            elif result.decision is _SEND:  # the usual case, decided here without a call
                (would_send if dry else to_send).append(m)
            elif self._decide_sendable(m, result):
                to_send.append(m)
        if would_send:
            self._resolve(would_send)
        if lookups:  # expired keys with an open claim: claimed like sendable ones, in order
            claimed = zip(lookups, self._ledger.claim(_claims(lookups)), strict=True)
            to_send = sorted(
                to_send + [m for m, result in claimed if self._decide_lookup(m, result)],
                key=lambda m: m.seq,
            )
        self._send(to_send)
        if self._duplicates:
            self._hint_changed_duplicates()

    def _admit_followups(self) -> None:
        """Decide afresh the later copies the recorder handed back, in the order it did."""
        while True:
            try:
                followups = self._followups.get_nowait()
            except queue.Empty:
                return
            self._admit(followups)

    def poll_elsewhere(self) -> None:
        """Ask the ledger again about keys another process was sending (it may have died).

        A key decided now (its holder finished, or its lease ran out: RECOVER) frees its lane:
        it is sent first, then the messages that waited behind it, in input order.
        """
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
        to_send: list[Message] = []
        freed: list[tuple[Message, bool]] = []
        for m, r in zip(waiting, results, strict=True):
            if self._decide_sendable(m, r):
                to_send.append(m)
            if r.decision is not Decision.IN_PROGRESS_ELSEWHERE:
                freed.extend(self._behind.pop(m.lane, ()))
        if freed:
            to_send.extend(self._readmit(freed))
        self._send(to_send)

    def _wait_behind(self, messages: list[Message]) -> list[Message]:
        """Keep back, unclaimed, the messages of lanes held behind a key; return the others."""
        behind = self._behind
        rest: list[Message] = []
        for m in messages:
            waiting = behind.get(m.lane)
            if waiting is None:
                rest.append(m)
            else:
                waiting.append((m, False))
        return rest

    def _hold(self, m: Message, result: ClaimResult) -> None:
        """A claim answer for a message whose lane became held earlier in the same batch.

        Resolved now if nothing is to be sent (duplicate, earlier dead letter); claimed by us:
        kept, claimed (its lease renewed) but not submitted; held elsewhere too: asked again
        once the lane moves on.
        """
        if result.decision is Decision.IN_PROGRESS_ELSEWHERE:
            self._behind[m.lane].append((m, False))
        elif self._decide_sendable(m, result):
            with self._lock:
                self.claimed.add((m.namespace, m.key))
            self._behind[m.lane].append((m, True))

    def _readmit(self, freed: list[tuple[Message, bool]]) -> list[Message]:
        """Decide, in input order, the messages that waited behind keys now decided.

        Those not claimed yet are claimed in one transaction; a lane may be held again by one
        of them (another run holds it too), and then its later ones wait again. Returns the
        messages to send, after the freed keys themselves.
        """
        freed.sort(key=lambda item: item[0].seq)  # copies handed back may have joined late
        ask = [m for m, ours in freed if not ours]
        answers = iter(self._ledger.claim(_claims(ask)) if ask else ())
        behind = self._behind
        to_send: list[Message] = []
        for m, ours in freed:
            waiting = behind.get(m.lane)
            if ours:
                if waiting is None:
                    to_send.append(m)
                else:
                    waiting.append((m, True))
            elif waiting is not None:
                self._hold(m, next(answers))
            elif self._decide_sendable(m, next(answers)):
                to_send.append(m)
        return to_send

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
        """Turn provider ids into Catena user ids, batched per connection."""
        by_connection: dict[str | None, list[Message]] = {}
        for m in messages:
            by_connection.setdefault(m.connection_id, []).append(m)
        fields = self._version.user_ids
        for connection_id, group in by_connection.items():
            ids = {i for m in group for f in fields if (i := m.unresolved.source_id(f))}
            if connection_id is None or self._resolver is None:
                # No connection (a validation error follows anyway) or a dry run: no requests.
                found: dict[str, str | None] = dict.fromkeys(ids, PLACEHOLDER_USER_ID)
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

    def _hint_changed_duplicates(self) -> None:
        """Warn about duplicates whose body is not the one sent (an edited TMS row).

        The ledger rightly keeps them from going out twice, but "duplicate" alone hides that
        the driver has the old text. One ledger read per batch that has duplicates.
        """
        duplicates, self._duplicates = self._duplicates, []
        rows = self._ledger.get_many([(m.namespace, m.key) for m in duplicates])
        changed = [
            m
            for m in duplicates
            if (row := rows.get((m.namespace, m.key))) is not None
            and row.get("fingerprint") not in (None, m.fingerprint)
        ]
        if not changed:
            return
        keys = ", ".join(m.key for m in changed[:10]) + (", ..." if len(changed) > 10 else "")
        logger.warning(
            "%s in stream %s not sent again although the body changed since it was sent "
            "(keys %s): the driver has the first version. To send a correction, give it a new "
            "message (a new key) in the source; the ledger report shows the operation ids sent",
            plural(len(changed), "duplicate"),
            changed[0].stream,
            keys,
        )

    def _decide_invalid(self, m: Message, result: ClaimResult) -> bool:
        """Resolve a message that is not to be sent; True: claim it for a lookup instead."""
        if result.decision is Decision.DUPLICATE:
            self._resolve(Outcome(m, Resolution.DUPLICATE, operation_id=result.operation_id))
            self._duplicates.append(m)
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
                    + " (on_invalid_record: fail)",
                    kind=FatalKind.INVALID_RECORD,
                )
            self._resolve(
                Outcome(m, Resolution.DEAD_LETTERED, stage=Stage.VALIDATION, errors=tuple(m.errors))
            )
        elif result.decision in _OPEN_CLAIM and self._delivery is not None:
            # An earlier run's claim may have sent it: look it up before calling it expired
            # (it could be resent blindly after a re-arm otherwise). Never sent by this run.
            m.lookup_only = True
            return True
        else:
            self._expire(m)
        return False

    def _expire(self, m: Message) -> None:
        hours = self._settings.max_message_age_hours
        expired = {
            "field": self._settings.message_time_field,
            "message": f"older than max_message_age_hours ({hours:g} h): never sent",
        }
        self._resolve(Outcome(m, Resolution.EXPIRED, stage=Stage.EXPIRED, errors=(expired,)))

    def _decide_lookup(self, m: Message, result: ClaimResult) -> bool:
        """The claim of an expired key peeked as an open claim; True: delivery looks it up.

        A plain SEND now means the holder let the key go unsent meanwhile: simply expired.
        """
        if result.decision is _SEND:
            self._expire(m)
            return False
        return self._decide_sendable(m, result)

    def _decide_sendable(self, m: Message, result: ClaimResult) -> bool:
        """Act on a claim decision; True: ``m`` is to be sent (the caller passes it to _send)."""
        decision = result.decision
        if decision is Decision.DUPLICATE:
            self._resolve(Outcome(m, Resolution.DUPLICATE, operation_id=result.operation_id))
            self._duplicates.append(m)
        elif decision is Decision.PREVIOUSLY_DEAD_LETTERED:
            self._resolve(Outcome(m, Resolution.PREVIOUSLY_DEAD_LETTERED, stage=result.stage))
        elif decision is Decision.IN_PROGRESS_ELSEWHERE:
            with self._lock:
                self._elsewhere.append(m)
            if self._delivery is not None:  # its lane waits behind it (a dry run sends nothing)
                self._behind.setdefault(m.lane, [])
        elif self._delivery is None:  # dry run
            self._resolve(Outcome(m, Resolution.WOULD_SEND))
        else:
            if decision is Decision.RECOVER:  # an earlier run may have sent it: never released
                m.recover = True
                m.maybe_sent = True
                m.prior_claimed_at = result.prior_claimed_at
            m.ambiguous_resends, m.outage_exits = result.ambiguous_resends, result.outage_exits
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
_OPEN_CLAIM = (Decision.RECOVER, Decision.IN_PROGRESS_ELSEWHERE)


def _claims(messages: Sequence[Message]) -> list[ClaimRequest]:
    return [ClaimRequest(m.namespace, m.key, m.fingerprint, m.connection_id) for m in messages]
