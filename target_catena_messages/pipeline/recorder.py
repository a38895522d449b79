"""The recorder thread: every Outcome made durable, then settled in the checkpointer, then STATE.

One thread, fed by one queue (delivery's workers and admission put Outcomes in it). For each
group of outcomes gathered for a moment: ledger outcomes in one transaction → dead letters
written and flushed → settled in the checkpointer and report → a STATE line when one is due
(docs/design.md, "Durability order"). The recorder never claims or submits: the later copies of
a key that must be decided afresh go back to admission through its follow-up queue.

Owned here: the outcome queue's consumer side, the dead-letter writes of outcomes, the
confirmation list (read by the run only after this thread has ended), and the STATE writes
while the run lasts. Shared under the run lock: the checkpointer, the report, the keys in flight
and the backlog. It also renews our claims' leases through admission, because this thread wakes
regularly even while the reader is blocked on stdin (renewing extends a claim, never makes one).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

from target_catena_messages.dead_letters import DeadLetterWriter
from target_catena_messages.delivery.engine import Delivery
from target_catena_messages.ledger import Ledger, LedgerOutcome, retryable_fingerprint
from target_catena_messages.ops.confirm import Pending
from target_catena_messages.outcome import Message, Outcome, Resolution, Stage
from target_catena_messages.pipeline.backlog import Backlog
from target_catena_messages.pipeline.checkpoint import IN_STATE, Checkpointer
from target_catena_messages.pipeline.report import RunReport
from target_catena_messages.settings import Settings

logger = logging.getLogger(__name__)

_GATHER_SECONDS = 0.05  # outcomes gathered into one ledger transaction (the crash window)
_MAX_COMMIT = 2000
_GATHER_ITEMS = 100  # queued items (outcomes, or dry-run batches) worth committing at once
_STATE_EVERY = 60.0  # seconds: a line at least this often while records resolve
_STATE_MIN_GAP = 1.0  # seconds: at most one line a second (Meltano stores every line)

Key = tuple[str, str]


class WouldSend(list[Message]):
    """A dry run's new keys from one batch: one queue item and no Outcome per message.

    Resolving them writes nothing (no ledger, no dead letter), so the recorder only has to
    count them and resolve their numbers, which ``_settle_would_send`` does for the lot.
    """


QueueItem = Outcome | WouldSend | None
"""What the recorder's queue carries; None marks the end of the run."""


class Recorder:
    """The recorder thread and what it writes.

    Args:
        outcomes: The queue it consumes (delivery and admission put into it).
        pending: Keys in flight → later copies held behind them (admission's, run lock).
        claimed: Our live claims (admission's, run lock): settled keys leave it.
        hand_back: Gives later copies to decide afresh back to admission.
        renew_leases: Admission's lease heartbeat, called after every group.
        write_state: Writes one STATE value to stdout.
        progress: Delivery's in-flight count and HTTP counters, for progress lines.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        outcomes: queue.SimpleQueue[QueueItem],
        lock: threading.RLock,
        backlog: Backlog,
        ledger: Ledger,
        dead_letters: DeadLetterWriter,
        checkpointer: Checkpointer,
        report: RunReport,
        pending: dict[Key, list[Message]],
        claimed: set[Key],
        hand_back: Callable[[list[Message]], None],
        renew_leases: Callable[[float], None],
        write_state: Callable[[dict[str, Any]], None],
        delivery: Delivery | None,
        http_counters: Callable[[], dict[str, float]],
    ) -> None:
        self._settings = settings
        self._outcomes = outcomes
        self._lock = lock
        self._backlog = backlog
        self._ledger = ledger
        self._dead_letters = dead_letters
        self._checkpointer = checkpointer
        self._report = report
        self._pending = pending
        self._claimed = claimed
        self._hand_back = hand_back
        self._renew_leases = renew_leases
        self._write_state = write_state
        self._delivery = delivery
        self._http_counters = http_counters
        self._last_state_at = 0.0
        self._state_written = threading.Lock()
        self.to_confirm: list[Pending] = []  # accepted this run, when confirm_operations
        self.error: BaseException | None = None
        # False once a failure may have left the checkpointer or stdout half-updated: no more
        # STATE. A failing ledger or dead-letter write leaves it true (see docs/design.md).
        self.checkpoint_trusted = True
        self._thread = threading.Thread(target=self._loop, name="recorder", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Record what is queued, then end the thread (the caller sends nothing more)."""
        self._outcomes.put(None)
        self._thread.join()

    def final_line(self) -> None:
        """After :meth:`stop`: write the newest safe STATE if it says anything new.

        Also after a recording failure, as long as the checkpointer was not caught mid-update.
        """
        if self._settings.dry_run or not self.checkpoint_trusted:
            return
        with self._lock:
            line = self._checkpointer.take_line() if self._checkpointer.pending_news() else None
        if line is not None:
            self._emit(line)

    # -- the thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        done = False
        while not done:
            batch, would_send, done = self._take()
            try:
                if batch or would_send:
                    self._commit(batch, would_send)
                self._after_commit()
            except BaseException as exc:
                # One line comes from the run's fatal path; details at debug.
                logger.debug("recording outcomes failed", exc_info=True)
                self.error = exc
                if self._delivery is not None:
                    self._delivery.stop()
                return

    def _take(self) -> tuple[list[Outcome], list[Message], bool]:
        """Wait for outcomes, then gather more for a moment: one transaction for many.

        Returns the outcomes, the dry run's would-send messages, and whether the end-of-run
        marker was seen.
        """
        try:
            item = self._outcomes.get(timeout=0.2)
        except queue.Empty:
            return [], [], False
        batch: list[Outcome] = []
        would_send: list[Message] = []
        if (
            item is not None
            and not isinstance(item, WouldSend)
            and self._outcomes.qsize() < _GATHER_ITEMS
        ):
            # Sleep through the gathering window, then take what came: a blocking get per item
            # would wake this thread for every outcome (a thread switch per message, ~7 % of
            # the target's CPU at 0 ms latency). Not when a backlog is already waiting, and not
            # for a dry run's batches (nothing to write; the reader waits for their room).
            time.sleep(_GATHER_SECONDS)
        while item is not None:
            if isinstance(item, WouldSend):
                would_send.extend(item)
            else:
                batch.append(item)
            if len(batch) + len(would_send) >= _MAX_COMMIT:
                return batch, would_send, False
            try:
                item = self._outcomes.get_nowait()
            except queue.Empty:
                return batch, would_send, False
        return batch, would_send, True

    def _commit(self, batch: list[Outcome], would_send: Sequence[Message] = ()) -> None:
        """Make a group durable (ledger, dead letters), then settle it."""
        records: list[LedgerOutcome] = []
        released: list[Key] = []
        left: list[tuple[Key, datetime]] = []  # maybe sent, unresolved: for the next run's lookup
        confirm = self._settings.confirm_operations
        for o in batch:
            resolution = o.resolution
            if resolution in _NOTHING_TO_WRITE:  # the usual case in a dry run, and duplicates
                continue
            m = o.message
            if resolution is _ABANDONED:
                # Only a claim that was surely never sent may go (docs/design.md, rule 3); one
                # that may have been sent ends its lease, so no run elsewhere waits it out.
                if not m.maybe_sent:
                    released.append((m.namespace, m.key))
                else:
                    left.append(((m.namespace, m.key), _first_attempt(m)))
                continue
            if resolution in (Resolution.DEAD_LETTERED, Resolution.EXPIRED):
                self._dead_letters.write(
                    stream=m.stream,
                    key=m.key,
                    stage=o.stage or Stage.API,
                    errors=list(o.errors),
                    status=o.status,
                    api_error=o.api_error,
                    operation_id=o.operation_id,
                    attempts=m.attempts,
                    retryable=o.retryable,
                    record=m.record,
                )
            if confirm and resolution is Resolution.ACCEPTED and m.connection_id and o.operation_id:
                self.to_confirm.append(
                    Pending(
                        m.namespace,
                        m.key,
                        m.stream,
                        m.connection_id,
                        o.operation_id,
                        m.record,
                        m.attempts,
                    )
                )
            status = _LEDGER_STATUS.get(resolution._value_)  # the member's str: see the table
            if status is not None:
                records.append(
                    LedgerOutcome(
                        m.namespace,
                        m.key,
                        status,
                        # A retryable failure (retries ran out) is tried again by a later run:
                        # its stored fingerprint can never equal a body's.
                        retryable_fingerprint(m.fingerprint) if o.retryable else m.fingerprint,
                        o.operation_id,
                        o.stage,
                        m.attempts,
                        m.connection_id,
                    )
                )
        if not self._settings.dry_run:
            if records:
                self._ledger.record(records)
            if released:
                self._ledger.release(released)
            if left:
                self._ledger.leave_for_lookup(left)
        self._dead_letters.flush()
        self.checkpoint_trusted = False  # a failure while settling leaves it half-updated
        self._settle_all(batch, would_send)
        self.checkpoint_trusted = True

    def _settle_all(self, batch: list[Outcome], would_send: Sequence[Message]) -> None:
        """Settle a committed group, hand the copies to redo to admission, wake the reader."""
        followups: list[Message] = []
        with self._lock:
            settle = self._settle
            for o in batch:
                later = settle(o)
                if later:
                    followups.extend(later)
            if would_send:
                followups.extend(self._settle_would_send(would_send))
        if followups:
            # Later copies of a key whose first copy was dead-lettered (or, in a dry run, would
            # be sent): admission decides them afresh (docs/design.md, rule 4).
            self._hand_back(followups)
        if batch or would_send:
            self._backlog.settled(
                len(would_send) + sum(1 for o in batch if o.resolution is not _ABANDONED)
            )

    def _settle(self, o: Outcome) -> list[Message]:
        """Resolve in the checkpointer and report; return later copies of the key to redo."""
        m = o.message
        key = (m.namespace, m.key)
        later = self._pending.pop(key, None) or []
        self._claimed.discard(key)
        resolution = o.resolution
        if resolution is _ABANDONED:  # not ``.resolves``: a property call per record
            return []
        self._report.count(m.stream, resolution, o.stage)
        if resolution in _RESOLVED_SILENTLY:
            self._checkpointer.resolve_silently(m.seq)
        else:
            self._checkpointer.resolve(
                m.seq, m.stream, m.key, resolution, operation_id=o.operation_id, stage=o.stage
            )
        if later and resolution in (Resolution.ACCEPTED, Resolution.DUPLICATE):
            for copy in later:
                self._outcomes.put(Outcome(copy, Resolution.DUPLICATE, operation_id=o.operation_id))
            return []
        return later

    def _settle_would_send(self, messages: Sequence[Message]) -> list[Message]:
        """``_settle`` for a dry run's would-send messages, without an Outcome each."""
        pending, claimed = self._pending, self._claimed
        count, resolve = self._report.count, self._checkpointer.resolve_silently
        redo: list[Message] = []
        for m in messages:
            key = (m.namespace, m.key)
            later = pending.pop(key, None)
            claimed.discard(key)
            count(m.stream, _WOULD_SEND, None)
            resolve(m.seq)
            if later:
                redo.extend(later)  # as _settle: later copies are decided afresh
        return redo

    def _after_commit(self) -> None:
        now = time.monotonic()
        self._renew_leases(now)
        line = None
        with self._lock:
            checkpointer = self._checkpointer
            due = now - self._last_state_at >= _STATE_EVERY or checkpointer.safe_advanced()
            if (
                not self._settings.dry_run
                and checkpointer.pending_news()
                and due
                and now - self._last_state_at >= _STATE_MIN_GAP
            ):
                line = checkpointer.take_line()
            progress = None
            if self._report.progress_due():  # the counters are gathered only for a line
                progress = self._report.progress_line(
                    in_flight=self._delivery.in_flight if self._delivery else 0,
                    queued=self._backlog.unresolved,
                    http=self._http_counters(),
                )
        if line is not None:
            self.checkpoint_trusted = False  # a line cut short must not be followed by another
            self._emit(line)
            self.checkpoint_trusted = True
            self._last_state_at = now
        if progress:
            logger.info("%s", progress)

    def _emit(self, line: dict[str, Any]) -> None:
        with self._state_written:
            self._write_state(line)


# The ledger's own status words for the outcomes it stores (an expired record is a dead letter
# there, with stage ``expired``). Keyed by the member's value: a plain str key stays cheap to
# hash whatever the Python version does for Enum members.
_LEDGER_STATUS: Mapping[str, Literal["accepted", "dead_lettered"]] = {
    Resolution.ACCEPTED.value: "accepted",
    Resolution.DEAD_LETTERED.value: "dead_lettered",
    Resolution.EXPIRED.value: "dead_lettered",
}
# Per-outcome membership tests on the recorder's path: tuples, compared by identity first.
_NOTHING_TO_WRITE = (
    Resolution.WOULD_SEND,
    Resolution.DUPLICATE,
    Resolution.PREVIOUSLY_DEAD_LETTERED,
)
_RESOLVED_SILENTLY = tuple(r for r in Resolution if r.resolves and r not in IN_STATE)
_ABANDONED = Resolution.ABANDONED
_WOULD_SEND = Resolution.WOULD_SEND


def _first_attempt(m: Message) -> datetime:
    """The earliest moment a send of ``m`` may have begun: the next run's lookup starts there."""
    known = [t for t in (m.prior_claimed_at, m.first_sent_at) if t is not None]
    # A maybe-sent message has one or both (recovered, or attempted); now is only a last resort.
    return min(known) if known else datetime.now(timezone.utc)
