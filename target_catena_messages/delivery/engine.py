"""Deliver messages concurrently, one at a time per driver, under one global cap; one Outcome each.

Why this shape:
- *Lanes*: messages for one (connection, recipient) go out strictly in input order, retries
  included, so a driver never reads "go to dock 5" before "go to dock 4". Only a lane's head is
  ever ready to send; its next message becomes ready when the head has its Outcome.
- *Oldest first*: ready lane heads wait in a heap by input sequence, so a lane that just finished
  a request queues behind the others (STATE advances in input order, no lane starves the rest).
- *One cap*: a semaphore around the HTTP call itself bounds requests in flight across every
  stream and sink.
- *As many sending threads as slots*: a worker takes the oldest ready head, sends it and comes
  back; with no more workers than slots none ever waits for a slot, and no slot changes hands
  between threads (each hand-off is a thread switch: with twice as many threads as slots the
  whole target spent ~15 % more CPU per message at 0 ms latency). A worker that sleeps in a
  backoff or looks up an operation is *parked*: another worker starts (up to twice the cap in
  all) so one failing driver does not slow the others, and a surplus worker retires once the
  parked one is back.
- *One throttle*: a 429 pauses everybody (see throttle.py).
- *One retry model*: whether and when to resend, the lookup before an ambiguous resend, and the
  rejection breaker are the policy's (``catena/retry.py``, docs/retry.md); this module only
  carries its answers out (sleeps, pauses, lookups).
- *Settling an ambiguous send*: a lookup that finds no operation settles it as not created (it is
  no longer maybe-sent) and it is resent, each resend counted across runs through
  ``before_resend`` before its POST; past ``max_ambiguous_resends``, several matches, an
  unreadable list or a matcher that failed its self-check make an ``ambiguous`` dead letter.
- The engine never touches the ledger, the dead letters or STATE: it reports each Outcome through
  a callback (and counts resends through another); the run wires both to the ledger.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Protocol

from target_catena_messages.catena.classify import configuration_problem, is_configuration_failure
from target_catena_messages.catena.client import Accepted, CatenaClient, Failure
from target_catena_messages.catena.retry import GiveUp, GiveUpReason, RejectionBreaker, RetryPolicy
from target_catena_messages.delivery.availability import Availability
from target_catena_messages.delivery.lookup import Found, Verdict
from target_catena_messages.delivery.throttle import Throttle
from target_catena_messages.errors import FatalError, FatalKind
from target_catena_messages.outcome import Message, Outcome, Resolution, Stage

logger = logging.getLogger(__name__)


class OperationLookup(Protocol):
    """Finds the operation an ambiguous send may already have created (exactly-once support)."""

    def settle(self, message: Message, *, check: bool = True) -> Found:
        """Look the message's operation up and say what its ambiguous send settles as."""

    def accepted(self, message: Message, operation_id: str) -> None:
        """A send of this run was accepted (the lookup checks its matcher on such operations)."""


class FairSlots:
    """A counting semaphore that serves waiters first come, first served, and counts its use.

    ``threading.Semaphore`` lets the thread that just released a slot take it straight back for
    its lane's next message, starving the other lanes (and holding STATE back behind them). Here a
    released slot goes directly to the longest waiter. The counters ride on the lock the slot
    takes anyway, so counting costs no extra lock per request.
    """

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._free = slots
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self.taken = 0  # slots taken so far (one per request)
        self.peak = 0  # most slots held at once

    @property
    def in_use(self) -> int:
        """Slots held right now."""
        return self._slots - self._free

    def __enter__(self) -> FairSlots:
        with self._lock:
            self.taken += 1
            if self._free and not self._waiters:
                self._free -= 1
                self.peak = max(self.peak, self._slots - self._free)
                return self
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # the slot passes on, never back to the pool
            else:
                self._free += 1


class Delivery:
    """The concurrent delivery engine."""

    def __init__(
        self,
        client: CatenaClient,
        *,
        on_outcome: Callable[[Outcome], None],
        policy: RetryPolicy,
        throttle: Throttle,
        max_concurrency: int,
        max_consecutive_rejections: int,
        is_sync: bool = False,
        lookup: OperationLookup | None = None,
        before_resend: Callable[[Message], int] | None = None,
        stop: threading.Event | None = None,
        availability: Availability | None = None,
    ) -> None:
        """Wire the engine; it starts no thread until messages are submitted.

        ``before_resend`` counts one more resend of the message's key after an ambiguous
        attempt, durably, and returns the count across runs; called before that resend's POST.
        """
        self._client = client
        # Whether Catena is reachable at all: senders wait while it is not (availability.py).
        self._availability = availability or Availability.unmonitored()
        self._before_resend = before_resend
        self._on_outcome = on_outcome
        self._policy = policy
        self._throttle = throttle
        self._is_sync = is_sync
        self._lookup = lookup
        self._breaker = RejectionBreaker(max_consecutive_rejections)
        self._slots = FairSlots(max_concurrency)
        self._cap = max_concurrency
        # Parked workers (backoff, lookup) are replaced, up to this many threads in all.
        self._max_workers = max_concurrency * 2
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here for a ready lane head
        self._idle = threading.Condition(self._lock)  # wait_idle waits here
        self._lanes: dict[str, deque[Message]] = {}  # lane -> messages behind its head
        self._ready: list[tuple[int, int, Message]] = []  # lane heads: (seq, tiebreak, message)
        self._tiebreak = itertools.count()
        self._names = itertools.count()
        self._threads: list[threading.Thread] = []  # running workers
        self._workers = 0  # worker threads running
        self._waiting = 0  # workers waiting for a ready head and not yet woken
        self._parked = 0  # workers in a backoff or a lookup (they hold no slot)
        self._closing = False
        self._outstanding = 0
        self._stop = stop or threading.Event()
        self.fatal: BaseException | None = None
        self._counts: Counter[str] = Counter()
        self._accepted_any = False  # Catena accepted a POST of this run: its URL is right

    # -- the caller's side -------------------------------------------------------------------

    def submit_many(self, messages: Sequence[Message]) -> None:
        """Queue each message behind earlier ones of its lane, in order; returns at once.

        One hold of the lock for the whole batch.
        """
        if not messages:
            return
        with self._lock:
            self._outstanding += len(messages)
            lanes, ready, tiebreak = self._lanes, self._ready, self._tiebreak
            for message in messages:
                queue = lanes.get(message.lane)
                if queue is not None:
                    queue.append(message)
                    continue
                lanes[message.lane] = deque()
                heapq.heappush(ready, (message.seq, next(tiebreak), message))
                self._staff()

    @property
    def in_flight(self) -> int:
        """Requests on the wire right now."""
        return self._slots.in_use

    @property
    def peak_in_flight(self) -> int:
        """The most requests on the wire at once so far."""
        return self._slots.peak

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted message has an outcome."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def stop(self) -> None:
        """Take no new attempt: queued and waiting messages end ABANDONED, in-flight ones finish."""
        self._stop.set()

    def fail(self, exc: BaseException) -> None:
        """End the run with ``exc`` (the first one counts): send nothing new.

        Delivery's own fatal errors come here, and so do those found outside it (the outage
        limit).
        """
        if self.fatal is None:
            self.fatal = exc
        self._stop.set()

    def close(self) -> None:
        """Stop the worker threads (after wait_idle or stop); queued messages end ABANDONED."""
        self._stop.set()
        with self._lock:
            self._closing = True
            self._waiting = 0
            self._work.notify_all()
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    def counters(self) -> dict[str, float]:
        """Request counters for progress lines and the summary."""
        with self._lock:
            counts: dict[str, float] = dict(self._counts)
        counts["requests"] = self._slots.taken
        counts["throttled"] = self._throttle.throttled
        counts["throttle_wait_seconds"] = round(self._throttle.wait_seconds, 1)
        counts["peak_in_flight"] = self.peak_in_flight
        return counts

    # -- the workers' side -------------------------------------------------------------------

    def _staff(self) -> None:
        """With the lock held: make sure a worker is coming for the ready heads (wake or start).

        Called once per head made ready and once per worker parked, so there are never fewer
        active workers than ready heads, up to the cap.
        """
        if not self._ready:
            return
        if self._waiting:
            self._waiting -= 1
            self._work.notify()
        elif (
            self._workers - self._parked < self._cap
            and self._workers < self._max_workers
            and not self._closing
        ):
            self._workers += 1
            thread = threading.Thread(
                target=self._work_loop, name=f"catena-send-{next(self._names)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _work_loop(self) -> None:
        """Take the oldest ready head, deliver it, report it, make its lane's next one ready."""
        message: Message | None = None
        while True:
            with self._lock:
                if message is not None:
                    self._finished(message)
                if self._workers - self._parked > self._cap:  # a parked worker is back
                    self._retire()
                    self._staff()  # hand on what this worker would have taken
                    return
                while not self._ready:
                    if self._closing:
                        self._retire()
                        return
                    self._waiting += 1
                    self._work.wait()
                message = heapq.heappop(self._ready)[2]
            outcome = self._deliver_guarded(message)
            try:
                self._on_outcome(outcome)
            except Exception as exc:  # noqa: BLE001 - the recorder failed: nothing more may be sent
                self.fail(exc)

    def _retire(self) -> None:
        """With the lock held: the calling worker ends."""
        self._workers -= 1
        self._threads.remove(threading.current_thread())

    def _finished(self, message: Message) -> None:
        """With the lock held: ``message`` has its outcome; its lane's next message is ready.

        The caller is a worker about to take a ready head itself, so nobody is woken here.
        """
        self._outstanding -= 1
        queue = self._lanes[message.lane]
        if queue:
            follower = queue.popleft()
            heapq.heappush(self._ready, (follower.seq, next(self._tiebreak), follower))
        else:
            del self._lanes[message.lane]
        if not self._outstanding:
            self._idle.notify_all()

    @contextmanager
    def _parked_worker(self) -> Iterator[None]:
        """Around a wait that holds no slot (backoff, lookup): let another worker send meanwhile."""
        with self._lock:
            self._parked += 1
            self._staff()
        try:
            yield
        finally:
            with self._lock:
                self._parked -= 1

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _deliver_guarded(self, message: Message) -> Outcome:
        try:
            return self._deliver(message)
        except FatalError as exc:
            self.fail(exc)
        except Exception as exc:  # a bug must stop the run, not lose the message
            logger.exception("delivery of %s/%s failed unexpectedly", message.stream, message.key)
            self.fail(exc)
        return Outcome(message, Resolution.ABANDONED)

    def _post(self, message: Message) -> Accepted | Failure:
        with self._slots:
            message.attempts += 1
            message.last_sent_at = datetime.now(timezone.utc)
            if message.first_sent_at is None:
                message.first_sent_at = message.last_sent_at
            try:
                return self._client.create_message(message.body, is_sync=self._is_sync)
            finally:
                # The lag before a lookup counts from here: a timed-out send may still create
                # its operation after we gave up on the answer.
                message.last_ended_at = datetime.now(timezone.utc)

    def _deliver(self, message: Message) -> Outcome:
        """Send until accepted or given up; the policy decides every retry (docs/retry.md).

        The state starts as the policy itself, so a first attempt that is accepted allocates
        nothing for retrying. A recovered key (claimed by a run that died) is looked up first;
        a lookup-only one (expired meanwhile) is only looked up, never sent.
        """
        if message.lookup_only:
            return self._look_up_only(message)
        state = self._policy
        if message.recover or message.maybe_sent or message.ambiguous_resends:
            state = state.resume(resends=message.ambiguous_resends, maybe_sent=message.maybe_sent)
        if message.recover:
            ended = self._settle(message, resend=state.may_resend)
            if ended is not None:
                return ended
            state = state.settle(self._count_resend(message))
        available = self._availability
        while True:
            if (
                self._stop.is_set()
                or not available.wait(self._stop)
                or not self._throttle.wait_turn(self._stop)
            ):
                return self._abandoned(message, state)
            result = self._post(message)
            if isinstance(result, Accepted):
                available.succeeded(result.elapsed)
                self._accepted_any = True
                self._breaker.accepted(message.connection_id)
                if self._lookup is not None:
                    self._lookup.accepted(message, result.operation_id)
                return Outcome(message, Resolution.ACCEPTED, operation_id=result.operation_id)
            available.failed(result.status, result.message, result.elapsed)
            step = state.increment(
                result.kind,
                result.status,
                result.retry_after,
                breaker=self._breaker,
                scope=message.connection_id,
            )
            if step.look_up:
                settled = self._after_ambiguous(message, step)
                if isinstance(settled, Outcome):
                    return settled
                step = settled
            if isinstance(step, GiveUp):
                renewed = self._give_up_or_renew(message, state, step, result)
                if isinstance(renewed, Outcome):
                    return renewed
                state = renewed  # Catena was down, not this message: a fresh budget
                continue
            state = step
            if step.shared_pause:
                self._throttle.pause(step.wait)
                continue
            self._count("retries")
            with self._parked_worker():
                stopped = self._stop.wait(step.wait)
            if stopped:
                return self._abandoned(message, state)

    def _give_up_or_renew(
        self, message: Message, state: RetryPolicy, end: GiveUp, result: Failure
    ) -> Outcome | RetryPolicy:
        """The message's Outcome at the end of its retries, or the state to go on with.

        Out of budget on a failure that may mean an outage: the run, not the message, decides
        (``Availability.holds``). Catena down: wait for it, then a fresh budget (a renewed
        state); the run ending meanwhile (the outage outlasted max_retry_seconds, or a signal):
        left for the next run, never dead-lettered for that.
        """
        available = self._availability
        if end.reason in _OUT_OF_BUDGET and available.holds(result.status, self._stop):
            renewed = state.renewed(end)
            if not end.look_up:
                return renewed
            # The last attempt was ambiguous and settled as not created: the next POST resends.
            if not renewed.may_resend:
                return _ambiguous(message, _resent_too_often(message))
            return renewed.settle(self._count_resend(message))
        if self._stop.is_set() or available.fatal is not None:
            return self._abandoned(message, state)
        if end.pause:
            self._throttle.pause(end.pause)
        return self._given_up(message, result, end)

    def _after_ambiguous(
        self, message: Message, step: RetryPolicy | GiveUp
    ) -> Outcome | RetryPolicy | GiveUp:
        """After an ambiguous attempt: its Outcome if the lookup ends it, else the next step.

        Settled as not created, the message is resent (the resend counted first), or, when its
        retries or time are used up, given up as a plain retryable failure.
        """
        message.maybe_sent = True
        self._count("ambiguous_sends")
        # A give-up for retries or time is not a resend: not created, it ends as a retryable
        # failure; only a give-up for the resend cap has no resend left.
        resend = isinstance(step, RetryPolicy) or step.reason is not GiveUpReason.RESENDS
        ended = self._settle(message, resend=resend)
        if ended is not None:
            return ended
        if isinstance(step, GiveUp):
            return replace(step, maybe_sent=False)
        return step.settle(self._count_resend(message))

    def _abandoned(self, message: Message, state: RetryPolicy) -> Outcome:
        """The run stopped first: the message is not resolved.

        A key with an ambiguous attempt keeps its claim even when a lookup settled it: its
        operation may still appear (a list lag beyond the configured one), so the next run looks
        it up again, and its resend count lives on in that claim.
        """
        if state.resends or message.recover:
            message.maybe_sent = True
        return Outcome(message, Resolution.ABANDONED)

    def _count_resend(self, message: Message) -> int:
        """Count the coming resend durably (before its POST), then the message is not maybe-sent.

        In that order: if counting fails, the message still counts as maybe sent and its claim
        is kept.
        """
        if self._before_resend is not None:
            message.ambiguous_resends = self._before_resend(message)
        else:
            message.ambiguous_resends += 1
        message.maybe_sent = False
        self._count("ambiguous_resends")
        return message.ambiguous_resends

    def _look_up(self, message: Message, *, check: bool) -> Found | None:
        """The lookup's verdict; None when the run stopped during it without finding anything."""
        if self._lookup is None:
            return Found(Verdict.NOT_CREATED)
        with self._parked_worker():
            found = self._lookup.settle(message, check=check)
        if self._stop.is_set() and found.verdict is not Verdict.ADOPT:
            return None  # interrupted while looking: not resolved; the claim stays
        return found

    def _settle(self, message: Message, *, resend: bool) -> Outcome | None:
        """Settle an ambiguous send by a lookup: the Outcome, or None to send it (again).

        ``resend``: another resend is within ``max_ambiguous_resends``.
        """
        found = self._look_up(message, check=True)
        if found is None:
            message.maybe_sent = True
            return Outcome(message, Resolution.ABANDONED)
        if found.verdict is Verdict.ADOPT:
            return self._adopted(message, found)
        if found.verdict is Verdict.NOT_CREATED:
            return None if resend else _ambiguous(message, _resent_too_often(message))
        return _unsettled(message, found)

    def _look_up_only(self, message: Message) -> Outcome:
        """An expired key an earlier run's claim may have sent: adopt its operation, never send.

        Not found: expired (never sent by us); the matcher's self-check is not needed, as no
        second copy can come of a miss.
        """
        found = self._look_up(message, check=False)
        if found is None:
            return Outcome(message, Resolution.ABANDONED)
        if found.verdict is Verdict.ADOPT:
            return self._adopted(message, found)
        if found.verdict is Verdict.NOT_CREATED:
            error = {
                "field": None,
                "message": "older than max_message_age_hours: an earlier run claimed it, so it "
                "was looked up at Catena and not found; never sent",
            }
            return Outcome(message, Resolution.EXPIRED, stage=Stage.EXPIRED, errors=(error,))
        return _unsettled(message, found)

    def _adopted(self, message: Message, found: Found) -> Outcome:
        self._count("operations_adopted")
        return Outcome(message, Resolution.ACCEPTED, operation_id=found.operation_id)

    def _given_up(self, message: Message, result: Failure, end: GiveUp) -> Outcome:
        misconfigured = self._misconfigured(result, end)
        if misconfigured is not None:
            # About the settings, not the message: not dead-lettered. ABANDONED releases the
            # claim unless an earlier attempt may have reached Catena (then it is recovered).
            self.fail(misconfigured)
            return Outcome(message, Resolution.ABANDONED)
        if end.fatal is not None:
            self.fail(FatalError(end.fatal, kind=FatalKind.REJECTIONS))
        if end.reason is GiveUpReason.REJECTED:
            self._count("rejections")
            stage = "api"
        else:
            stage = "ambiguous" if end.maybe_sent else "api"
        return Outcome(
            message,
            Resolution.DEAD_LETTERED,
            stage=stage,
            errors=_api_errors(result),
            status=result.status,
            api_error=result.api_error,
            retryable=end.retryable,
        )

    def _misconfigured(self, result: Failure, end: GiveUp) -> FatalError | None:
        """The fatal error when a rejection says the URL, a proxy or the credentials are wrong.

        Only until Catena has accepted a message of this run (after that the URL is proven
        right, and a 403/404/405 is about one message: the rejection breaker guards), except
        for a 401 after a token refresh: the credentials are refused, whatever came before.
        """
        if end.reason is not GiveUpReason.REJECTED or result.status is None:
            return None
        if self._accepted_any and result.status != 401:
            return None
        if not is_configuration_failure(result.status, result.api_error):
            return None
        when = "" if self._accepted_any else "before any message was accepted"
        text = configuration_problem("POST", self._client.messages_url, result.status, when=when)
        return FatalError(text, kind=FatalKind.CONFIGURATION)


_OUT_OF_BUDGET = (GiveUpReason.RETRIES, GiveUpReason.TIME)


def _ambiguous(message: Message, reason: str) -> Outcome:
    """The send may have reached Catena and cannot be settled: never resent."""
    return Outcome(
        message,
        Resolution.DEAD_LETTERED,
        stage=Stage.AMBIGUOUS,
        errors=({"field": None, "message": f"{reason}; not resent (it may have been delivered)"},),
        retryable=False,
    )


def _unsettled(message: Message, found: Found) -> Outcome:
    """The ambiguous dead letter of a lookup that neither adopted nor settled "not created"."""
    if found.verdict is Verdict.SEVERAL:
        reason = f"{found.candidates} operations at Catena match this message"
    elif found.verdict is Verdict.UNCONFIRMED:
        reason = (
            "the operation list could not confirm that Catena did not create it (the lookup "
            f"missed operations this run created on connection {found.connection_id})"
        )
    else:
        reason = "Catena's operation list could not be read"
    return _ambiguous(message, reason)


def _resent_too_often(message: Message) -> str:
    return (
        "no operation found at Catena, but this key was already resent "
        f"{plural_times(message.ambiguous_resends)} after ambiguous attempts "
        "(max_ambiguous_resends)"
    )


def plural_times(n: int) -> str:
    """``once``, ``twice``, ``3 times``."""
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _api_errors(result: Failure) -> tuple[dict[str, Any], ...]:
    """Catena's 422 detail as per-field errors; otherwise the one-line failure message."""
    detail = result.api_error.get("detail") if isinstance(result.api_error, dict) else None
    if isinstance(detail, list) and detail:
        return tuple(
            {
                "field": str(item.get("path")) if isinstance(item, dict) else None,
                "message": str(item.get("message")) if isinstance(item, dict) else str(item),
            }
            for item in detail
        )
    return ({"field": None, "message": result.message},)
