"""Before resending an ambiguous send, look for the operation Catena may already have created.

Catena has no idempotency key. A send that timed out, was reset after the
request went out, or got a 500/502/504 may have created a message; so may a claim left behind by a
process that died. The only trace is the resource-operation LIST: operations of one
connection, ``resource=message``, ``operation=create``, in a time window. We match on the payload
*as Catena stores it* — keys reordered, nulls dropped, resolved source ids added — so a match means
every non-null field we sent is there with the same value.

One candidate: adopt its operation id (accepted, not resent). Several: we cannot tell which is
ours, so the message is dead-lettered as ``ambiguous`` rather than risk a second copy. None: the
send is *settled as not created* and delivery resends it (within ``max_ambiguous_resends``, per
key across runs: the guard against a list that lags longer than configured).

"None" is only worth that if the search would have found the operation. So before the first
negative settle on a connection, the matcher checks itself on an operation this run knows it
created (one of its own acceptances whose lag has passed): the same snapshot, the same
``matches``. If Catena stores payloads our matcher cannot match, negative settling is switched off
for that connection and its ambiguous sends are not resent (docs/retry.md, "The matcher
self-check").

The list lags: a new operation appears only after a while. So a lookup first waits until the lag
has passed since our last attempt *ended* (a send that timed out may create its operation late;
for claims left by a dead process, whose attempt's end is unknown: since this run started), then
reads the list once per connection and window. The read has no upper bound from our clock (Catena
ends it at its own now), so a clock running behind Catena's cannot hide an operation. After a
crash hundreds of keys may need a lookup; they share one wait and one snapshot of operation ids,
indexed by message text, instead of one scan each; the payloads of the few operations with the
right text are then fetched by id.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

from target_catena_messages.catena.classify import FailureKind
from target_catena_messages.catena.client import CatenaClient, Failure, OperationSummary
from target_catena_messages.catena.errors import CatenaApiError
from target_catena_messages.catena.retry import GiveUp, RetryPolicy
from target_catena_messages.delivery.availability import Availability
from target_catena_messages.delivery.throttle import Throttle
from target_catena_messages.ledger import Ledger
from target_catena_messages.outcome import Message

logger = logging.getLogger(__name__)

# Clock skew between us and Catena: an operation's created_at is never before our send (or the
# claim a dead run made before sending) by more than this. Every operation of the window is held
# in memory while a lookup needs it, so the window is kept as narrow as safety allows.
_MARGIN = timedelta(seconds=30)
#: How one read of the list (or of one operation) is retried (docs/retry.md): 4 attempts,
#: 2, 4 then 6 s apart (or as the server asks), never for a rejection.
READ_POLICY = RetryPolicy(
    max_retries=3,
    max_retry_seconds=float("inf"),
    base_seconds=2.0,
    cap_seconds=6.0,
    jitter=False,
    idempotent=True,
    count_throttled=True,
)
_UNREADABLE = object()
# A refresh re-reads this much before the last read, beyond the lag: operations still appearing.
_REFRESH_OVERLAP = timedelta(seconds=10)
# A refresh is shared (waits up to ``_refresh_every``) only once re-reading has become costly.
_CHEAP_READ = 1000
# The matcher self-check: acceptances kept per connection, and how long (beyond the lag) the
# first negative settle on a connection waits for one when the run has none yet. Short: that
# settle already waited out the lag since the run began, time in which any other lane of the
# connection would have been accepted; with none accepted by then, none is coming (a re-run
# after a crash often holds only the recovered keys) and a longer wait only holds STATE back.
_SAMPLES = 8
_SAMPLE_WAIT = timedelta(seconds=5)


class Verdict(str, Enum):
    """What a lookup settles an ambiguous send as."""

    ADOPT = "adopt"  # exactly one operation matches: ours, accepted after all
    NOT_CREATED = "not_created"  # none matches: Catena did not create it; it may be sent again
    SEVERAL = "several"  # more than one matches: which is ours cannot be told
    UNREADABLE = "unreadable"  # the list (or an operation) could not be read: unknown
    UNCONFIRMED = "unconfirmed"  # none matches, but the matcher failed its self-check


class MatcherCheck(str, Enum):
    """Whether the search finds operations this run knows it created, per connection."""

    VERIFIED = "verified"  # it found one: a miss means "not created"
    UNVERIFIED = "unverified"  # no acceptance of this run to check with: settled on trust
    FAILED = "failed"  # it missed one: a miss means nothing on this connection


@dataclass(frozen=True, slots=True)
class Found:
    """A lookup's answer: the verdict, and the operation id when it is ADOPT."""

    verdict: Verdict
    operation_id: str | None = None
    candidates: int = 0  # operations that matched (-1: the list could not be read)
    connection_id: str | None = None


def settle_verdict(candidates: int, check: MatcherCheck | None) -> Verdict:
    """The settling rule (pure): what ``candidates`` matches mean, given the matcher's check.

    ``check`` matters only when nothing matched; None there means the check itself could not be
    made (the list was unreadable, or the run stopped): nothing is known.
    """
    if candidates < 0:
        return Verdict.UNREADABLE
    if candidates == 1:
        return Verdict.ADOPT
    if candidates > 1:
        return Verdict.SEVERAL
    if check is None:
        return Verdict.UNREADABLE
    if check is MatcherCheck.FAILED:
        return Verdict.UNCONFIRMED
    return Verdict.NOT_CREATED


@dataclass(frozen=True, slots=True)
class _Sample:
    """An operation this run created (an acceptance): what the self-check searches for."""

    operation_id: str
    body: Mapping[str, Any]
    sent_at: datetime
    ended_at: datetime


def matches(payload: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """Whether a stored payload is this body: every non-null field we sent, equal."""
    return not differing_fields(payload, body, first_only=True)


def differing_fields(
    payload: Mapping[str, Any], body: Mapping[str, Any], *, first_only: bool = False
) -> list[str]:
    """The non-null fields of ``body`` whose stored value differs (what a failed match names)."""
    differ = []
    for name, value in body.items():
        if value is None:
            continue
        stored = payload.get(name)
        if isinstance(value, list) and isinstance(stored, list):
            same = sorted(map(str, value)) == sorted(map(str, stored))
        else:
            same = stored == value
        if not same:
            differ.append(name)
            if first_only:
                break
    return differ


@dataclass
class _Snapshot:
    """Ids of the operations of one connection created from ``since``, read at ``read_at``.

    Only ids, indexed by a hash of the message text: a payload per operation was most of a long
    run's memory (~1.3 KB each, tens of thousands in a window), while a lookup needs the payload
    of the one or two operations whose text it is looking for, fetched by id. ``order`` lets
    ``prune`` drop the oldest first.
    """

    since: datetime
    read_at: datetime
    by_text: dict[int, list[str]] = field(default_factory=dict)
    order: deque[tuple[float, int, str]] = field(default_factory=deque)
    last_read: int = 0  # operations the last read returned: what a refresh now would cost

    def add(self, op: OperationSummary, read_at: datetime) -> None:
        key = text_key(op.message_text)
        ids = self.by_text.setdefault(key, [])
        if op.id not in ids:  # a refresh re-reads its overlap
            ids.append(op.id)
            self.order.append((_created_at(op.created_at, read_at), key, op.id))

    def prune(self, before: datetime) -> None:
        """Forget operations created before ``before``: no lookup in progress reaches back there."""
        if before <= self.since:
            return
        cut = before.timestamp()
        while self.order and self.order[0][0] < cut:
            _, key, op_id = self.order.popleft()
            ids = self.by_text.get(key, [])
            if op_id in ids:
                ids.remove(op_id)
            if not ids:
                self.by_text.pop(key, None)
        self.since = before


def text_key(text: Any) -> int:
    """The index key of a message text (collisions only cost a fetch: payloads are compared)."""
    return hash(text if isinstance(text, str) else repr(text))


def _created_at(text: str | None, default: datetime) -> float:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return default.timestamp()  # unknown: kept as long as the newest


_FINAL = (MatcherCheck.VERIFIED, MatcherCheck.FAILED)


class CatenaOperationLookup:
    """Finds an earlier operation for an ambiguous message through the LIST endpoint.

    Memory and list reads stay bounded on a long run with many ambiguous sends: a snapshot holds
    only the ids lookups in progress reach back to, and once a refresh costs more than a page it
    happens at most every half of (lag + overlap), so each operation is read about three times
    however many lookups there are.
    """

    def __init__(
        self,
        client: CatenaClient,
        ledger: Ledger,
        *,
        lag_seconds: float,
        stop: threading.Event,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        policy: RetryPolicy = READ_POLICY,
        throttle: Throttle | None = None,
        availability: Availability | None = None,
    ) -> None:
        self._client = client
        # While Catena is down a failed read counts nothing and the next one waits for it.
        self._availability = availability or Availability.unmonitored()
        self._policy = replace(policy, available=self._availability.available)
        self._throttle = throttle  # delivery's: reads share its 429 pauses and rate
        self._ledger = ledger
        self._lag = timedelta(seconds=lag_seconds)
        self._refresh_every = (self._lag + _REFRESH_OVERLAP) / 2
        self._stop = stop
        self._now = now
        self._started = now()
        self._lock = threading.Lock()
        self._snapshots: dict[str, _Snapshot] = {}
        self._active: list[datetime] = []  # the ``since`` of every lookup in progress
        # The matcher self-check, per connection: recent acceptances, and the check's result.
        self._samples: dict[str, deque[_Sample]] = {}
        # Guards the samples; a self-check waits on it for one. Not ``_lock``: that one is held
        # while a list page is read, and every acceptance of the run would wait for the read.
        self._sampled = threading.Condition()
        self._checks: dict[str, MatcherCheck] = {}
        self._checking: dict[str, threading.Lock] = {}  # one check at a time per connection

    def accepted(self, message: Message, operation_id: str) -> None:
        """An acceptance of this run: a sample for the matcher self-check of its connection.

        Cheap on the hot path: nothing once the connection's check is settled either way.
        """
        connection_id = message.connection_id
        if connection_id is None or self._checks.get(connection_id) in _FINAL:
            return
        ended = message.last_ended_at or self._now()
        sample = _Sample(operation_id, message.body, message.last_sent_at or ended, ended)
        with self._sampled:
            samples = self._samples.get(connection_id)
            if samples is None:
                samples = self._samples[connection_id] = deque(maxlen=_SAMPLES)
            samples.append(sample)
            self._sampled.notify_all()

    def settle(self, message: Message, *, check: bool = True) -> Found:
        """Look for the operation of an ambiguous send and settle it (``settle_verdict``).

        ``check``: a negative answer will lead to a resend, so the matcher must have passed its
        self-check on the connection first (a lookup-only message is never sent: no check).
        """
        operation_id, candidates = self.find(message)
        connection_id = message.connection_id
        matcher: MatcherCheck | None = MatcherCheck.UNVERIFIED
        if candidates == 0 and check and connection_id is not None:
            matcher = self._matcher_check(connection_id)
        return Found(
            settle_verdict(candidates, matcher), operation_id, candidates, message.connection_id
        )

    def find(self, message: Message) -> tuple[str | None, int]:
        """Return (operation id, candidates): an id only when exactly one operation matches.

        Candidates is -1 when the list could not be read: not knowing is not "not found", so
        the caller must not resend.
        """
        connection_id = message.connection_id
        if connection_id is None:
            return None, 0
        since = (message.prior_claimed_at or message.first_sent_at or self._started) - _MARGIN
        settled = (message.last_ended_at or self._started) + self._lag
        with self._reaching_back(since):
            wait = (settled - self._now()).total_seconds()
            if wait > 0 and self._stop.wait(wait):
                return None, -1
            candidates = self._candidates(
                connection_id, since, settled, text_key(message.body.get("message_text"))
            )
        if candidates is None:
            return None, -1
        if candidates:
            taken = self._ledger.operation_ids_in_use(candidates)
            candidates = [op_id for op_id in candidates if op_id not in taken]
        found = []
        for op_id in candidates:
            payload = self._payload(connection_id, op_id)
            if payload is _UNREADABLE:
                return None, -1
            if isinstance(payload, dict) and matches(payload, message.body):
                found.append(op_id)
        if len(found) == 1:
            logger.info(
                "adopted operation %s for %s/%s after an ambiguous send",
                found[0],
                message.stream,
                message.key,
            )
            return found[0], 1
        return None, len(found)

    # -- the matcher self-check ---------------------------------------------------------------

    def _matcher_check(self, connection_id: str) -> MatcherCheck | None:
        """The connection's self-check result, checking now if it has none (None: unknown).

        One check at a time per connection; lookups arriving meanwhile wait for its result.
        Only the first check waits for a sample to come; an unverified connection is checked
        again at its next negative settle (waiting at most the lag for a sample to ripen).
        """
        known = self._checks.get(connection_id)
        if known in _FINAL:
            return known
        with self._lock:
            checking = self._checking.setdefault(connection_id, threading.Lock())
        with checking:
            known = self._checks.get(connection_id)
            if known in _FINAL:
                return known
            result = self._self_check(connection_id, wait=known is None)
            if result is not None:
                self._checks[connection_id] = result
            return result

    def _self_check(self, connection_id: str, *, wait: bool) -> MatcherCheck | None:
        """Search for acceptances of this run the way a lookup does; FAILED at the first miss.

        A sample whose operation is not in the list yet although its stored payload matches is
        a list lag outlier, not a matcher fault: the next sample is tried.
        """
        # A check again (after an unverified one) waits at most the lag: for a fresh sample to
        # ripen, not for one to come.
        deadline = self._now() + self._lag + (_SAMPLE_WAIT if wait else timedelta(0))
        tried: set[str] = set()
        while True:
            sample = self._ripe_sample(connection_id, tried, deadline)
            if sample is None:
                if self._stop.is_set():
                    return None
                if self._checks.get(connection_id) is None:
                    logger.warning(
                        "no message of this run was accepted on connection %s to check the "
                        "operation lookup with: ambiguous sends there that are not found are "
                        "resent unverified",
                        connection_id,
                    )
                return MatcherCheck.UNVERIFIED
            tried.add(sample.operation_id)
            found = self._finds(connection_id, sample)
            if found is None:
                return None
            if found:
                return MatcherCheck.VERIFIED
            payload = self._payload(connection_id, sample.operation_id)
            if payload is _UNREADABLE:
                return None
            differ = differing_fields(payload, sample.body) if isinstance(payload, dict) else []
            if isinstance(payload, dict) and not differ:
                logger.info(
                    "operation %s is not in Catena's operation list yet, %.0f s after it was "
                    "created: its list lag is longer than operation_lookup_lag_seconds",
                    sample.operation_id,
                    (self._now() - sample.ended_at).total_seconds(),
                )
                continue
            what = (
                f"its stored payload differs in {', '.join(differ)}"
                if differ
                else "Catena did not return its payload"
            )
            logger.warning(
                "the operation lookup cannot find operations this run created on connection %s "
                "(operation %s: %s): ambiguous sends there whose operation is not found are not "
                "resent but dead-lettered as ambiguous",
                connection_id,
                sample.operation_id,
                what,
            )
            return MatcherCheck.FAILED

    def _ripe_sample(
        self, connection_id: str, tried: set[str], deadline: datetime
    ) -> _Sample | None:
        """The newest untried sample whose lag has passed, waiting (until ``deadline``) for one.

        None: none came in time (or the run stopped).
        """
        with self._sampled:
            while True:
                now = self._now()
                waiting = [
                    s for s in self._samples.get(connection_id, ()) if s.operation_id not in tried
                ]
                ripe = [s for s in waiting if s.ended_at + self._lag <= now]
                if ripe:
                    return ripe[-1]
                if now >= deadline or self._stop.is_set():
                    return None
                until = min([deadline, *(s.ended_at + self._lag for s in waiting)])
                self._sampled.wait(min(max((until - now).total_seconds(), 0.01), 1.0))

    def _finds(self, connection_id: str, sample: _Sample) -> bool | None:
        """Whether a lookup's search (snapshot, text index, ``matches``) finds the sample."""
        since = sample.sent_at - _MARGIN
        with self._reaching_back(since):
            key = text_key(sample.body.get("message_text"))
            candidates = self._candidates(connection_id, since, sample.ended_at + self._lag, key)
        if candidates is None:
            return None
        if sample.operation_id not in candidates:
            return False
        payload = self._payload(connection_id, sample.operation_id)
        if payload is _UNREADABLE:
            return None
        return isinstance(payload, dict) and matches(payload, sample.body)

    @contextmanager
    def _reaching_back(self, since: datetime) -> Iterator[None]:
        """A search in progress reaches back to ``since``: snapshots keep what it needs."""
        with self._lock:
            self._active.append(since)
        try:
            yield
        finally:
            with self._lock:
                self._active.remove(since)

    def _candidates(
        self, connection_id: str, since: datetime, settled: datetime, key: int
    ) -> list[str] | None:
        """Ids of operations with this text key, from a snapshot read after ``settled``.

        A fresher snapshot reads only what is new since the last read (minus the lag and an
        overlap, when late operations may still appear). On a busy connection, where that is
        more than a page, not sooner than ``_refresh_every`` after the last read: lookups arriving
        meanwhile wait and share the next read.
        """
        while True:
            with self._lock:
                snap = self._snapshots.get(connection_id)
                covers = snap is not None and snap.since <= since
                if snap is not None and covers and snap.read_at >= settled:
                    return list(snap.by_text.get(key, ()))
                now = self._now()
                if snap is not None and covers:
                    wait = (snap.read_at + self._refresh_every - now).total_seconds()
                    if wait <= 0 or snap.last_read < _CHEAP_READ:
                        start = max(snap.since, snap.read_at - self._lag - _REFRESH_OVERLAP)
                        if not self._refresh(connection_id, snap, start, now):
                            return None
                        continue
                else:
                    snap = _Snapshot(since=since, read_at=now)
                    if not self._refresh(connection_id, snap, since, now):
                        return None
                    self._snapshots[connection_id] = snap
                    continue
            if self._stop.wait(wait):
                return None

    def _refresh(self, connection_id: str, snap: _Snapshot, start: datetime, now: datetime) -> bool:
        """Read ``start..now`` into ``snap``, then drop what no lookup in progress needs.

        Page by page: a whole window as a list of operation dicts (with logs) would be the
        run's memory peak. A retried read re-adds nothing (``add`` skips known ids), and a
        failed one leaves ``read_at`` as it was, so the next refresh starts from the same point.
        """
        state: RetryPolicy | None = self._policy
        while state is not None:
            snap.last_read = 0
            try:
                self._take_turn()
                for op in self._client.list_operation_summaries(connection_id, from_datetime=start):
                    snap.add(op, now)
                    snap.last_read += 1
            except CatenaApiError as exc:
                logger.warning("reading Catena's operation list failed: %s", exc)
                state = self._retry(state, exc.kind, exc.status, exc.retry_after)
                continue
            snap.read_at = now
            snap.prune(min(self._active, default=snap.since))
            return True
        return False

    def _payload(self, connection_id: str, operation_id: str) -> object:
        """The stored payload of one operation; None if it is gone; ``_UNREADABLE`` on failure."""
        state: RetryPolicy | None = self._policy
        while state is not None:
            self._take_turn()
            answer = self._client.get_operation(connection_id, operation_id)
            if not isinstance(answer, Failure):
                return answer.get("payload")
            if answer.status == 404:
                return None
            logger.warning("reading Catena's operation %s failed: %s", operation_id, answer.message)
            state = self._retry(state, answer.kind, answer.status, answer.retry_after)
        return _UNREADABLE

    def _take_turn(self) -> None:
        """Wait while Catena is down, then out a 429 pause delivery's senders share."""
        self._availability.wait(self._stop)
        if self._throttle is not None:
            self._throttle.wait_turn(self._stop)

    def _retry(
        self, state: RetryPolicy, kind: FailureKind, status: int | None, retry_after: float | None
    ) -> RetryPolicy | None:
        """After a failed read: the next state once its wait is over; None to give up.

        None also when the run stopped while waiting. A read that fails while Catena is down is
        not given up: it waits for Catena and starts again (an outage must not dead-letter).
        """
        self._availability.failed(status)
        step = state.increment(kind, status, retry_after)
        if isinstance(step, GiveUp):
            if self._availability.holds(status, self._stop) and self._availability.wait(self._stop):
                return self._policy
            return None
        if step.shared_pause and self._throttle is not None:
            self._throttle.pause(step.wait)
        return None if self._stop.wait(step.wait) else step
