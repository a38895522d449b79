"""One run of the target: records in, outcomes recorded durably, safe STATE out.

The run owns everything that lives for the whole process and is shared by all sinks: the ledger,
the dead letters, the checkpointer, the report and the delivery engine. Two threads touch it:

- the *main thread* (singer-sdk's reader) prepares each record and, per sink batch, asks the ledger
  which keys to send (one claim transaction per batch) and hands them to delivery;
- the *recorder thread* takes every Outcome, commits it to the ledger and the dead-letter file,
  and only then resolves it in the checkpointer and writes STATE. That order is the durability
  promise of contract §6: claim -> POST -> outcome committed, dead letters flushed -> STATE.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from target_catena_messages import jsonutil
from target_catena_messages.catena.auth import TokenProvider
from target_catena_messages.catena.client import CatenaClient
from target_catena_messages.catena.errors import CatenaApiError
from target_catena_messages.checkpoint import Checkpointer
from target_catena_messages.confirm import (
    Pending,
    confirm_operations,
    dead_letter_fields,
    ledger_updates,
    summary_counts,
    summary_lines,
)
from target_catena_messages.connect import client_from_settings
from target_catena_messages.dead_letters import DeadLetterWriter
from target_catena_messages.delivery import Delivery
from target_catena_messages.errors import FatalError
from target_catena_messages.ledger import (
    ClaimRequest,
    ClaimResult,
    Decision,
    Ledger,
    LedgerOutcome,
    new_run_id,
    retryable_fingerprint,
)
from target_catena_messages.lookup import CatenaOperationLookup
from target_catena_messages.message import (
    BodyRules,
    BodyValidator,
    body_hash_key,
    build_body,
    is_expired,
    message_time,
    recipient_lane,
    record_key,
)
from target_catena_messages.outcome import Message, Outcome, Resolution
from target_catena_messages.redact import Redactor
from target_catena_messages.report import RunReport
from target_catena_messages.resolve import UserResolver, wanted
from target_catena_messages.retry import RetryPolicy
from target_catena_messages.settings import Settings
from target_catena_messages.throttle import Throttle

logger = logging.getLogger(__name__)

_PLACEHOLDER_USER = "00000000-0000-4000-8000-000000000000"  # dry run: validate without lookups
_GATHER_SECONDS = 0.05  # outcomes gathered into one ledger transaction (the crash window)
_MAX_COMMIT = 2000
_GATHER_ITEMS = 100  # queued items (outcomes, or dry-run batches) worth committing at once
_STATE_EVERY = 60.0  # seconds: a line at least this often while records resolve
_STATE_MIN_GAP = 1.0  # seconds: at most one line a second (Meltano stores every line)
_ELSEWHERE_POLL = 2.0  # seconds between looks at keys another process is sending


class Interrupted(FatalError):
    """SIGTERM or SIGINT: stop taking records, finish what is in flight, write the safe STATE."""


class Run:
    """Everything one target process shares across its sinks."""

    def __init__(
        self,
        settings: Settings,
        *,
        write_state: Callable[[dict[str, Any]], None],
        redactor: Redactor,
        stderr: Callable[[str], None] | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.settings = settings
        self.run_id = new_run_id()
        self._write_state = write_state
        self._stderr = stderr or _write_stderr
        self._started = time.monotonic()
        self._rules = BodyRules(
            message_schema=settings.message_schema,
            default_connection_id=settings.default_connection_id,
            connection_id_by_fleet_ref=dict(settings.connection_id_by_fleet_ref),
            default_sender_id=settings.default_sender_id,
            allow_empty_message_text=settings.allow_empty_message_text,
        )
        self._validator = BodyValidator(
            settings.message_schema, allow_empty_message_text=settings.allow_empty_message_text
        )
        shape = settings.shape_fingerprint()
        self._shape_tail = b"," + jsonutil.canonical(shape) + b"]"  # see _fingerprint
        self._is_valid = self._validator.check_dict
        self._namespace = settings.ledger_namespace
        self.ledger = Ledger.open(
            settings.ledger_url, run_id=self.run_id, read_only=settings.dry_run
        )
        logger.info(
            "Ledger %s holds %d keys (run %s)%s",
            self.ledger.location,
            self.ledger.count(),
            self.run_id,
            " — dry run: read-only, nothing will be sent" if settings.dry_run else "",
        )
        self.dead_letters = DeadLetterWriter(
            settings.dead_letter_path, self.run_id, secrets=redactor.secrets
        )
        self.checkpointer = Checkpointer(self.run_id)
        self.report = RunReport(self.run_id)
        self._lock = threading.RLock()  # checkpointer, report, pending keys
        self._pending: dict[tuple[str, str], list[Message]] = {}  # key in flight -> later copies
        self._elsewhere: list[Message] = []
        self._claimed: set[tuple[str, str]] = set()  # our live claims: their leases are renewed
        self._last_renewal = time.monotonic()
        self._last_elsewhere_poll = 0.0
        self._outcomes: queue.SimpleQueue[Outcome | _WouldSend | None] = queue.SimpleQueue()
        # Later copies of a key to decide afresh: the recorder puts, the reader admits them.
        self._followups: queue.SimpleQueue[list[Message]] = queue.SimpleQueue()
        # One lock for the counter: prepare() adds under it, the recorder subtracts under it.
        self._resolved = threading.Condition(self._lock)
        self._unresolved = 0
        self._max_unresolved = 2 * batch_size
        self._last_state_at = 0.0
        self._state_written = threading.Lock()
        self.critical = False
        self.stop_requested = False
        self.tokens: TokenProvider | None = None
        self._client: CatenaClient | None = None
        self._stop: threading.Event | None = None
        self._to_confirm: list[Pending] = []  # accepted this run, when confirm_operations
        self._confirmation: dict[str, Any] | None = None
        self.delivery: Delivery | None = None
        self._resolver: UserResolver | None = None
        self._resolve_ids = settings.message_schema == "catena_ids"
        if not settings.dry_run:
            self.delivery = self._make_delivery(redactor)
        self._recorder_error: BaseException | None = None
        self._recorder_error_told = False  # the reader raised it: its line is written
        # False once a failure may have left the checkpointer or stdout half-updated: no more
        # STATE. A failing ledger or dead-letter write leaves it true (see docs/design.md).
        self._checkpoint_trusted = True
        self._recorder = threading.Thread(target=self._record_loop, name="recorder", daemon=True)
        self._recorder.start()

    def _make_delivery(self, redactor: Redactor) -> Delivery:
        s = self.settings
        client, tokens = client_from_settings(s, redactor)
        self.tokens = tokens.inner
        if s.message_schema == "catena_ids":
            self._resolver = UserResolver(client)
        stop = threading.Event()
        self._client, self._stop = client, stop
        lookup = CatenaOperationLookup(
            client, self.ledger, lag_seconds=s.operation_lookup_lag_seconds, stop=stop
        )
        return Delivery(
            client,
            lookup=lookup,
            stop=stop,
            on_outcome=self._outcomes.put,
            policy=RetryPolicy(max_retries=s.max_retries, max_retry_seconds=s.max_retry_seconds),
            throttle=Throttle(max_rate=s.max_requests_per_second),
            max_concurrency=s.max_concurrency,
            max_ambiguous_resends=s.max_ambiguous_resends,
            max_consecutive_rejections=s.max_consecutive_rejections,
            is_sync=s.is_sync,
        )

    # -- main thread: records in -------------------------------------------------------------

    def prepare(
        self,
        stream: str,
        key_properties: Sequence[str],
        record: dict[str, Any],
        namespace: str | None = None,
    ) -> Message:
        """Turn one record into a Message: body, validation, key, age (pure but for numbering).

        The per-record path of every run (P1 in the bench), so it avoids work a run can skip:
        a single str or int key is its own text (``record_key`` gives the same), the lane is
        only computed when there is a delivery to order (a dry run has none), and the
        fingerprint hashes the same canonical bytes as ``sha256_hex([body, shape])`` without
        building the list.
        """
        with self._lock:
            seq = self.checkpointer.next_seq()
            self._unresolved += 1
        body = build_body(record, self._rules)
        unresolved = wanted(record, body) if self._resolve_ids else None
        if unresolved is not None and unresolved.error is not None:
            errors = [unresolved.error]
        elif unresolved is not None and unresolved.any:
            errors = []  # validated once the provider ids are resolved (per batch)
        else:
            unresolved = None
            errors = [] if self._is_valid(body) else self._body_errors(body)
        key = _simple_key(record, key_properties)
        if key is None:
            try:
                key = record_key(record, key_properties) if key_properties else body_hash_key(body)
            except ValueError as exc:
                key = body_hash_key(body)
                errors.append({"field": None, "message": str(exc)})
        expired = False
        field = self.settings.message_time_field
        if field:
            try:
                created = message_time(record, field)
            except ValueError as exc:
                errors.append({"field": field, "message": str(exc)})
            else:
                if created is None:
                    errors.append({"field": field, "message": f"{field} is missing: age unknown"})
                else:
                    expired = is_expired(created, self.settings.max_message_age_hours, _utcnow())
        return Message(
            seq=seq,
            stream=stream,
            namespace=namespace or self._namespace or stream,
            key=key,
            record=record,
            body=body,
            fingerprint=self._fingerprint(body),
            lane=recipient_lane(body) if self.delivery is not None else "",
            errors=errors,
            expired=expired and not errors,
            unresolved=unresolved if not errors else None,
        )

    def _body_errors(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        return [e.as_dict() for e in self._validator.errors(body)]

    def _fingerprint(self, body: dict[str, Any]) -> str:
        """``jsonutil.sha256_hex([body, shape])``, byte for byte, without the list."""
        return hashlib.sha256(b"[" + jsonutil.canonical(body) + self._shape_tail).hexdigest()

    def dispatch(self, messages: Sequence[Message]) -> None:
        """One sink batch: decide each message with the ledger, send the new ones."""
        self._raise_if_failed()
        self.critical = True
        try:
            self._admit_followups()
            self._dispatch(messages)
        finally:
            self.critical = False
        if self.stop_requested:
            raise Interrupted("interrupted by a signal")
        self._wait_for_room()

    def _admit_followups(self) -> None:
        """Decide afresh the later copies the recorder handed back (reader thread only).

        The recorder never claims or submits: a decision made here may be fatal (e.g.
        ``on_invalid_record: fail``), and that must end the run on the reader's fatal path,
        which writes the newest safe STATE.
        """
        while True:
            try:
                followups = self._followups.get_nowait()
            except queue.Empty:
                return
            self._dispatch(followups)

    def _admit_followups_critical(self) -> None:
        """``_admit_followups`` outside ``dispatch``: a signal must not cut a claim in two."""
        if self._followups.empty():
            return
        self.critical = True
        try:
            self._admit_followups()
        finally:
            self.critical = False
        if self.stop_requested:
            raise Interrupted("interrupted by a signal")

    def _dispatch(self, messages: Sequence[Message]) -> None:
        if self._resolve_ids:
            self._resolve_users([m for m in messages if m.unresolved is not None])
        invalid: list[Message] = []
        sendable: list[Message] = []
        with self._lock:
            pending = self._pending
            for m in messages:
                key = (m.namespace, m.key)
                waiting = pending.get(key)
                if waiting is not None:  # an earlier copy of this key is still on its way
                    waiting.append(m)
                else:
                    pending[key] = []
                    (invalid if m.errors or m.expired else sendable).append(m)
        for m, result in zip(invalid, self.ledger.peek(_claims(invalid)), strict=True):
            self._decide_invalid(m, result)
        claim = self.ledger.peek if self.settings.dry_run else self.ledger.claim
        dry = self.delivery is None
        would_send = _WouldSend()
        to_send: list[Message] = []
        for m, result in zip(sendable, claim(_claims(sendable)), strict=True):
            if result.decision is _SEND:  # the usual case, decided here without a call
                (would_send if dry else to_send).append(m)
            elif self._decide_sendable(m, result):
                to_send.append(m)
        if would_send:
            self._outcomes.put(would_send)
        self._send(to_send)

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
            for m in group:
                self._apply_users(m, found)

    def _apply_users(self, m: Message, found: Mapping[str, str | None]) -> None:
        need, m.unresolved = m.unresolved, None
        errors = []
        for field, source_id, target in (
            ("sender_source_id", need.sender, "sender_id"),
            ("recipient_source_id", need.recipient, "recipient_id"),
        ):
            if source_id is None:
                continue
            user_id = found.get(source_id)
            if user_id is None:
                errors.append(
                    {
                        "field": field,
                        "message": f"no Catena user with provider id {source_id!r} on "
                        f"connection {m.connection_id}",
                    }
                )
            else:
                m.body[target] = user_id
        m.errors = errors or self._body_errors(m.body)
        m.expired = m.expired and not m.errors
        m.fingerprint = self._fingerprint(m.body)
        m.lane = recipient_lane(m.body)

    def _decide_invalid(self, m: Message, result: ClaimResult) -> None:
        if result.decision is Decision.DUPLICATE:
            self._resolve(Outcome(m, Resolution.DUPLICATE, operation_id=result.operation_id))
        elif result.decision is Decision.PREVIOUSLY_DEAD_LETTERED:
            self._resolve(Outcome(m, Resolution.PREVIOUSLY_DEAD_LETTERED, stage=result.stage))
        elif m.lookup_failed:
            self._resolve(
                Outcome(
                    m, Resolution.DEAD_LETTERED, stage="api", errors=tuple(m.errors), retryable=True
                )
            )
        elif m.errors:
            if self.settings.on_invalid_record == "fail":
                raise FatalError(
                    f"invalid record in stream {m.stream} (key {m.key}): "
                    + "; ".join(f"{e['field']}: {e['message']}" for e in m.errors)
                    + " (on_invalid_record: fail)"
                )
            self._resolve(
                Outcome(m, Resolution.DEAD_LETTERED, stage="validation", errors=tuple(m.errors))
            )
        else:
            hours = self.settings.max_message_age_hours
            expired = {
                "field": self.settings.message_time_field,
                "message": f"older than max_message_age_hours ({hours:g} h): never sent",
            }
            self._resolve(Outcome(m, Resolution.EXPIRED, stage="expired", errors=(expired,)))

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
        elif self.delivery is None:  # dry run
            self._resolve(Outcome(m, Resolution.WOULD_SEND))
        else:
            if decision is Decision.RECOVER:
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
        if not messages or self.delivery is None:
            return
        with self._lock:
            self._claimed.update([(m.namespace, m.key) for m in messages])
        self.delivery.submit_many(messages)

    def _resolve(self, outcome: Outcome) -> None:
        self._outcomes.put(outcome)

    def _wait_for_room(self) -> None:
        """Backpressure: keep at most ~two batches of records in memory."""
        while True:
            with self._resolved:
                if self._unresolved <= self._max_unresolved:
                    return
                self._resolved.wait(0.5)
            self._raise_if_failed()
            self._admit_followups_critical()
            self._poll_elsewhere()

    def _poll_elsewhere(self) -> None:
        """Ask the ledger again about keys another process was sending (it may have died)."""
        now = time.monotonic()
        if not self._elsewhere or now - self._last_elsewhere_poll < _ELSEWHERE_POLL:
            return
        self._last_elsewhere_poll = now
        with self._lock:
            waiting, self._elsewhere = self._elsewhere, []
        if self.settings.dry_run:
            results = self.ledger.peek(_claims(waiting))
        else:
            results = self.ledger.claim(_claims(waiting))
        self._send(
            [m for m, r in zip(waiting, results, strict=True) if self._decide_sendable(m, r)]
        )

    def add_tap_state(self, value: dict[str, Any]) -> None:
        """A tap STATE: tied to every record read before it."""
        with self._lock:
            self.checkpointer.add_tap_state(value)

    def _raise_if_failed(self) -> None:
        if self._recorder_error is not None:
            self._recorder_error_told = True
            raise FatalError(f"recording outcomes failed: {self._recorder_error}")
        if self.delivery is not None and self.delivery.fatal is not None:
            fatal = self.delivery.fatal
            raise fatal if isinstance(fatal, FatalError) else FatalError(str(fatal))

    # -- recorder thread: outcomes made durable, then STATE --------------------------------

    def _record_loop(self) -> None:
        done = False
        while not done:
            batch, would_send, done = self._take_outcomes()
            try:
                if batch or would_send:
                    self._commit(batch, would_send)
                self._after_commit(batch)
            except BaseException as exc:
                # One line comes from the reader's fatal path (or _close); details at debug.
                logger.debug("recording outcomes failed", exc_info=True)
                self._recorder_error = exc
                if self.delivery is not None:
                    self.delivery.stop()
                return

    def _take_outcomes(self) -> tuple[list[Outcome], list[Message], bool]:
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
            and not isinstance(item, _WouldSend)
            and self._outcomes.qsize() < _GATHER_ITEMS
        ):
            # Sleep through the gathering window, then take what came: a blocking get per item
            # would wake this thread for every outcome (a thread switch per message, ~7 % of
            # the target's CPU at 0 ms latency). Not when a backlog is already waiting, and not
            # for a dry run's batches (nothing to write; the reader waits for their room).
            time.sleep(_GATHER_SECONDS)
        while item is not None:
            if isinstance(item, _WouldSend):
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
        records: list[LedgerOutcome] = []
        released: list[tuple[str, str]] = []
        confirm = self.settings.confirm_operations
        for o in batch:
            resolution = o.resolution
            if resolution in _NOTHING_TO_WRITE:  # the usual case in a dry run, and duplicates
                continue
            m = o.message
            if resolution is _ABANDONED:
                if not m.maybe_sent:
                    released.append((m.namespace, m.key))
                continue
            if resolution in (Resolution.DEAD_LETTERED, Resolution.EXPIRED):
                self.dead_letters.write(
                    stream=m.stream,
                    key=m.key,
                    stage=o.stage or "api",
                    errors=list(o.errors),
                    status=o.status,
                    api_error=o.api_error,
                    operation_id=o.operation_id,
                    attempts=m.attempts,
                    retryable=o.retryable,
                    record=m.record,
                )
            if confirm and resolution is Resolution.ACCEPTED and m.connection_id and o.operation_id:
                self._to_confirm.append(
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
            status = _LEDGER_STATUS.get(resolution._value_)  # by value: an Enum hashes in Python
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
        if not self.settings.dry_run:
            if records:
                self.ledger.record(records)
            if released:
                self.ledger.release(released)
        self.dead_letters.flush()
        self._checkpoint_trusted = False  # a failure while settling leaves it half-updated
        self._settle_all(batch, would_send)
        self._checkpoint_trusted = True

    def _settle_all(self, batch: list[Outcome], would_send: Sequence[Message]) -> None:
        """Settle a committed batch, hand the copies to redo to the reader, wake it."""
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
            # be sent): the reader decides them afresh.
            self._followups.put(followups)
        if batch or would_send:
            with self._resolved:
                self._unresolved -= len(would_send) + sum(
                    1 for o in batch if o.resolution is not _ABANDONED
                )
                self._resolved.notify_all()

    def _settle(self, o: Outcome) -> list[Message]:
        """Resolve in the checkpointer and report; return later copies of the key to redo."""
        m = o.message
        key = (m.namespace, m.key)
        later = self._pending.pop(key, None) or []
        self._claimed.discard(key)
        resolution = o.resolution
        if resolution is _ABANDONED:  # not ``.resolves``: a property call per record
            return []
        # ``_value_``, not ``.value``: the same str, without the descriptor, once per record.
        self.report.count(m.stream, resolution._value_, o.stage)
        if resolution in _RESOLVED_SILENTLY:
            self.checkpointer.resolve_silently(m.seq)
        else:
            kind = _CHECKPOINT_KIND[resolution._value_]
            self.checkpointer.resolve(
                m.seq, m.stream, m.key, kind, operation_id=o.operation_id, stage=o.stage
            )
        if later and resolution in (Resolution.ACCEPTED, Resolution.DUPLICATE):
            for copy in later:
                self._outcomes.put(Outcome(copy, Resolution.DUPLICATE, operation_id=o.operation_id))
            return []
        return later

    def _settle_would_send(self, messages: Sequence[Message]) -> list[Message]:
        """``_settle`` for a dry run's would-send messages, without an Outcome each."""
        pending, claimed = self._pending, self._claimed
        count, resolve = self.report.count, self.checkpointer.resolve_silently
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

    def _renew_leases(self, now: float) -> None:
        """Heartbeat: claims waiting in a lane must not expire and be taken by another process."""
        if (
            self.settings.dry_run
            or now - self._last_renewal < self.ledger.lease.total_seconds() / 3
        ):
            return
        self._last_renewal = now
        with self._lock:
            keys = list(self._claimed)
        if keys:
            self.ledger.renew_leases(keys)

    def _after_commit(self, batch: list[Outcome]) -> None:
        now = time.monotonic()
        self._renew_leases(now)
        line = None
        with self._lock:
            due = now - self._last_state_at >= _STATE_EVERY or self.checkpointer.safe_advanced()
            if (
                not self.settings.dry_run
                and self.checkpointer.pending_news()
                and due
                and now - self._last_state_at >= _STATE_MIN_GAP
            ):
                line = self.checkpointer.take_line()
            progress = None
            if self.report.progress_due():  # the counters are gathered only for a line
                progress = self.report.progress_line(
                    in_flight=self.delivery.in_flight if self.delivery else 0,
                    queued=self._unresolved,
                    http=self.http_counters(),
                )
        if line is not None:
            self._checkpoint_trusted = False  # a line cut short must not be followed by another
            self._emit(line)
            self._checkpoint_trusted = True
            self._last_state_at = now
        if progress:
            logger.info("%s", progress)

    def _emit(self, line: dict[str, Any]) -> None:
        with self._state_written:
            self._write_state(line)

    def http_counters(self) -> dict[str, float]:
        """Request counters from delivery and the token provider."""
        counters = self.delivery.counters() if self.delivery else {}
        made = getattr(self.tokens, "requests_made", None)
        if made is not None:
            counters["token_requests"] = made
        return counters

    # -- the end -----------------------------------------------------------------------------

    def finish(self) -> int:
        """End of input: wait for every outcome, write the last STATE and the summary."""
        while True:
            self._admit_followups_critical()
            self._poll_elsewhere()
            with self._resolved:
                if self._unresolved == 0 and not self._elsewhere:
                    break
                self._resolved.wait(0.25)
            self._raise_if_failed()
        self._confirm()
        return self._close(fatal=None)

    def _confirm(self) -> None:
        """confirm_operations: Catena's final word on this run's accepted messages (issue 6)."""
        if not self._to_confirm or self._client is None:
            return
        try:
            results = confirm_operations(
                self._client,
                self._to_confirm,
                timeout_seconds=self.settings.confirm_timeout_seconds,
                max_concurrency=self.settings.max_concurrency,
                stop=self._stop,
            )
        except FatalError as exc:  # credentials refused: the messages stay accepted
            logger.error("confirmation stopped: %s", exc)  # noqa: TRY400
            return
        for c in results:
            if c.status == "failed":
                self.dead_letters.write(**dead_letter_fields(c))
        self.dead_letters.flush()  # before the final STATE
        self.ledger.record_confirmations(ledger_updates(results))
        self._confirmation = summary_counts(results)

    def abort(self, reason: BaseException, *, drain: bool = False) -> int:
        """Fatal: send nothing new, let in-flight requests finish, write the safe STATE.

        ``drain``: the input failed, not the delivery: the batches already claimed are valid
        and were read before the bad line, so they are delivered first (a signal still cuts
        this short). Otherwise queued messages stay claimed for the next run.
        """
        self.critical = True  # a signal now stops delivery; it must not raise in here
        if self.delivery is not None:
            if drain and not self.stop_requested and self.delivery.fatal is None:
                self.delivery.wait_idle()
            self.delivery.stop()
            self.delivery.wait_idle(self.settings.request_timeout_seconds + 5)
        return self._close(fatal=reason)

    def _close(self, *, fatal: BaseException | None) -> int:
        self._outcomes.put(None)
        self._recorder.join()
        if self.delivery is not None:
            self.delivery.close()
        if self._recorder_error is not None and not self._recorder_error_told:
            logger.error("fatal: recording outcomes failed: %s", self._recorder_error)
        if not self.settings.dry_run and self._checkpoint_trusted:
            with self._lock:
                line = self.checkpointer.take_line() if self.checkpointer.pending_news() else None
            if line is not None:
                self._emit(line)
        self.dead_letters.close()
        exit_code = 1 if fatal is not None or self._recorder_error is not None else 0
        failed_at_catena = bool(self._confirmation and self._confirmation["failed"])
        if (
            exit_code == 0
            and (self.report.has_failures() or failed_at_catena)
            and not self.settings.allow_dead_letters
        ):
            exit_code = 2
        lines, summary = self.report.summary(
            dead_letter_path=str(self.dead_letters.path),
            dead_letters_written=self.dead_letters.count,
            ledger_location=self.ledger.location,
            http=self.http_counters(),
            exit_code=exit_code,
            elapsed=time.monotonic() - self._started,
        )
        if self._confirmation is not None:
            summary["confirmation"] = self._confirmation
            lines += summary_lines(self._confirmation, label=lambda text: "  " + text)
        self.ledger.close()
        for text in lines:
            self._stderr(text)
        self._stderr(jsonutil.dumps({"summary": summary}))
        return exit_code


# Keyed by ``Resolution`` value (a str hashes in C; the Enum member's hash is Python code).
_LEDGER_STATUS: Mapping[str, Any] = {
    Resolution.ACCEPTED.value: "accepted",
    Resolution.DEAD_LETTERED.value: "dead_lettered",
    Resolution.EXPIRED.value: "dead_lettered",
}
_CHECKPOINT_KIND: Mapping[str, Any] = {
    Resolution.ACCEPTED.value: "accepted",
    Resolution.DUPLICATE.value: "duplicate",
    Resolution.DEAD_LETTERED.value: "dead_lettered",
    Resolution.EXPIRED.value: "expired",
}
# Per-outcome membership tests on the recorder's path; an Enum's ``__hash__`` is Python code,
# so these are tuples (compared by identity first) rather than sets or dict keys.
_NOTHING_TO_WRITE = (
    Resolution.WOULD_SEND,
    Resolution.DUPLICATE,
    Resolution.PREVIOUSLY_DEAD_LETTERED,
)
_RESOLVED_SILENTLY = tuple(r for r in Resolution if r.resolves and r.value not in _CHECKPOINT_KIND)
_ABANDONED = Resolution.ABANDONED
_SEND = Decision.SEND
_WOULD_SEND: str = Resolution.WOULD_SEND.value


class _WouldSend(list[Message]):
    """A dry run's new keys from one batch: one queue item and no Outcome per message.

    Resolving them writes nothing (no ledger, no dead letter), so the recorder only has to
    count them and resolve their numbers, which ``_settle_would_send`` does for the lot.
    """


def _simple_key(record: Mapping[str, Any], key_properties: Sequence[str]) -> str | None:
    """The key of a record keyed by one str or int property (the usual case), else None.

    Exactly what ``record_key`` returns for these (``str(value)``); anything else, a missing
    or null value included, is left to ``record_key``.
    """
    if len(key_properties) != 1:
        return None
    value = record.get(key_properties[0])
    kind = type(value)
    if kind is str:
        return value
    if kind is int:
        return str(value)
    return None


def _claims(messages: Sequence[Message]) -> list[ClaimRequest]:
    return [ClaimRequest(m.namespace, m.key, m.fingerprint, m.connection_id) for m in messages]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _write_stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
