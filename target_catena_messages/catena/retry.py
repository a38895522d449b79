"""One retry model for every loop that talks to Catena: a policy value and its ``increment``.

In the spirit of urllib3's ``Retry``: :class:`RetryPolicy` is immutable and carries both the rules
(how many retries, how long in all, the backoff) and the state of one retried request (retries
used, seconds waited, ambiguous resends, history). A caller starts from the policy itself (no
allocation on the path where the first attempt succeeds) and, after each failure, asks
``state = state.increment(kind, ...)``. The answer is either the next state, which says how long
to wait, whether that wait is the shared 429 pause, and whether to look the operation up first, or
a :class:`GiveUp` saying why and whether the message may have reached Catena.

The rules that decide *whether* to retry live here and nowhere else (docs/retry.md lists them):

- a rejection is never retried; with a :class:`RejectionBreaker`, N rejections in a row with one
  status on one connection end the run;
- a 429 is one shared pause, and for a create it does not use up a retry (only waiting time);
- an ambiguous failure of a create is looked up before it is resent or given up; a lookup that
  finds nothing settles the send as not created (:meth:`RetryPolicy.settle`), and such resends
  are capped at ``max_ambiguous_resends`` per key across runs; a read is simply retried;
- while Catena is unavailable (``available`` answers False) a network failure uses up no retry.

Why this module sits inside ``catena/``: the client's own loops (the token fetch) use it, and the
client package imports nothing from the rest of the target. The target's callers (delivery,
operation lookup, users lookup, confirmation) import it from here, so the dependency points from
the target into the client, never back. Pure: no I/O, no clock; randomness only through ``rng``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import NamedTuple

from target_catena_messages.catena.classify import FailureKind

__all__ = ["Attempt", "GiveUp", "GiveUpReason", "RejectionBreaker", "RetryPolicy", "always"]

_AMBIGUOUS = FailureKind.AMBIGUOUS
_REJECTION = FailureKind.REJECTION


def always() -> bool:
    """The default availability: Catena is taken to be reachable."""
    return True


class Attempt(NamedTuple):
    """One failed attempt in a state's history."""

    kind: FailureKind
    status: int | None
    wait: float  # seconds waited after it (0.0 for the last one, before a give-up)


class GiveUpReason(str, Enum):
    """Why a request is not tried again."""

    REJECTED = "rejected"
    """Catena (or the request itself) refused it: resending the same request cannot help."""
    RETRIES = "retries"
    """``max_retries`` used up."""
    TIME = "time"
    """``max_retry_seconds`` used up."""
    RESENDS = "resends"
    """``max_ambiguous_resends`` used up: another resend could make a second copy."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The end of the retries of one request.

    Attributes:
        reason: Why.
        maybe_sent: Some attempt may have reached Catena: not to be resent blindly later.
        look_up: The last failure was ambiguous: look for the operation before giving up (if it
            exists, the request succeeded after all).
        fatal: The rejection breaker tripped: end the run with this one line.
        history: Every failed attempt, oldest first.
        pause: A 429 pause every other sender still owes the rate limit (0.0: none).
    """

    reason: GiveUpReason
    maybe_sent: bool
    look_up: bool = False
    fatal: str | None = None
    history: tuple[Attempt, ...] = ()
    pause: float = 0.0

    @property
    def retryable(self) -> bool:
        """Whether a later run may send it again without a lookup (not rejected, never sent)."""
        return self.reason is not GiveUpReason.REJECTED and not self.maybe_sent


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The rules of one kind of request, and the state of one request retried under them.

    Rules (set once per caller; docs/retry.md says which caller uses which):
        max_retries: Retries after the first attempt.
        max_retry_seconds: Cap on the total time one request may spend waiting to be retried.
        base_seconds: Backoff ceiling for the first retry.
        growth: Factor by which the ceiling grows with every retry.
        cap_seconds: Largest ceiling a single backoff may reach.
        jitter: Draw the backoff uniformly below the ceiling (full jitter) instead of using it.
        idempotent: A read (or a token request): an ambiguous failure is retried like a safe one
            and a server's retry-after is honoured whatever the status.
        count_throttled: Whether a 429 uses up a retry (reads keep their attempt counts) or only
            waiting time (creates: a rate limit says nothing about the message).
        max_ambiguous_resends: Resends allowed after ambiguous attempts of a create, per key
            across runs (the caller seeds ``resends`` from the ledger's count).
        available: Whether Catena is reachable at all right now; while it is not, a network
            failure uses up no retry and no waiting time (the outage is the run's, not the
            request's).

    State (starts at zero; ``increment`` returns the next one):
        retries, waited, resends, maybe_sent: Counters so far.
        wait: Seconds to wait before the next attempt.
        shared_pause: ``wait`` is a 429 pause every sender shares (``Throttle.pause``).
        look_up: Look for the operation before the next attempt (the last one was ambiguous).
        history: Every failed attempt, oldest first.
    """

    max_retries: int = 6
    max_retry_seconds: float = 900.0
    base_seconds: float = 0.5
    cap_seconds: float = 30.0
    growth: float = 2.0
    jitter: bool = True
    idempotent: bool = False
    count_throttled: bool = False
    max_ambiguous_resends: int = 3
    available: Callable[[], bool] = field(default=always, compare=False, repr=False)
    retries: int = 0
    waited: float = 0.0
    resends: int = 0
    maybe_sent: bool = False
    wait: float = 0.0
    shared_pause: bool = False
    look_up: bool = False
    history: tuple[Attempt, ...] = ()

    def __post_init__(self) -> None:
        """Reject nonsensical settings early, where the mistake is made."""
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.max_retry_seconds < 0:
            raise ValueError("max_retry_seconds must be >= 0")
        if self.base_seconds <= 0 or self.cap_seconds < self.base_seconds:
            raise ValueError("need 0 < base_seconds <= cap_seconds")
        if self.growth < 1:
            raise ValueError("growth must be >= 1")
        if self.max_ambiguous_resends < 0:
            raise ValueError("max_ambiguous_resends must be >= 0")

    # -- the backoff --------------------------------------------------------------------------

    def ceiling(self, attempt: int) -> float:
        """The largest backoff for retry number ``attempt`` (0-based): base * growth**n, capped."""
        exponent = min(max(attempt, 0), 64)  # far beyond any cap already; avoids overflow
        return min(self.cap_seconds, self.base_seconds * self.growth**exponent)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based).

        Full jitter (uniform between 0 and the ceiling) spreads retries of many requests that
        failed together, so they don't return as one burst and trip the rate limit again.
        """
        ceiling = self.ceiling(attempt)
        return (rng or random).uniform(0.0, ceiling) if self.jitter else ceiling

    def may_retry(self, retries_done: int, waited_seconds: float, next_wait: float) -> bool:
        """Whether one more retry fits in both the count and the total waiting-time budget."""
        return (
            retries_done < self.max_retries and waited_seconds + next_wait <= self.max_retry_seconds
        )

    # -- the state ----------------------------------------------------------------------------

    def resume(self, *, resends: int, maybe_sent: bool) -> RetryPolicy:
        """The state of a request an earlier attempt (maybe of a dead run) may already have sent.

        ``resends``: the ambiguous resends already made for this key, by every run (the ledger's
        count), so the cap holds across runs.
        """
        return replace(self, resends=resends, maybe_sent=maybe_sent)

    def renewed(self, end: GiveUp) -> RetryPolicy:
        """The state to retry with after Catena was unavailable: the budget restored.

        ``self`` is the state before the failure that ended in ``end`` (RETRIES or TIME after a
        failure that signalled an outage): those failures were the run's outage, not the
        request's. What may already have reached Catena is kept; a resend that follows an
        ambiguous last attempt is counted by the caller (durably, before it is sent).
        """
        return replace(
            self,
            retries=0,
            waited=0.0,
            maybe_sent=end.maybe_sent,
            wait=0.0,
            shared_pause=False,
            look_up=False,
            history=end.history,
        )

    @property
    def may_resend(self) -> bool:
        """Whether another resend after an ambiguous attempt stays within the cap."""
        return self.resends < self.max_ambiguous_resends

    def settle(self, resends: int) -> RetryPolicy:
        """A lookup found no operation: the ambiguous send is settled as *not created*.

        The message is no longer maybe-sent, so a later give-up for retries or time is a
        retryable failure, not an ambiguous one. ``resends`` is the count the ledger committed
        for the resend about to be made (it is authoritative: it spans runs).
        """
        return replace(self, resends=max(resends, self.resends), maybe_sent=False)

    def increment(
        self,
        kind: FailureKind,
        status: int | None = None,
        retry_after: float | None = None,
        *,
        rng: random.Random | None = None,
        breaker: RejectionBreaker | None = None,
        scope: str | None = None,
    ) -> RetryPolicy | GiveUp:
        """The next state after a failed attempt, or the end of the retries.

        Args:
            kind: The failure's class (``classify_status`` / ``classify_exception``).
            status: The HTTP status, None when no response arrived.
            retry_after: Seconds the server asked us to wait, when it said so.
            rng: The backoff's randomness (tests pass a seeded one).
            breaker: Counts rejections in a row across requests; trips into ``GiveUp.fatal``.
            scope: The breaker's key (the connection id).
        """
        if kind is _REJECTION:
            fatal = breaker.rejected(scope, status) if breaker is not None else None
            history = (*self.history, Attempt(kind, status, 0.0))
            return GiveUp(GiveUpReason.REJECTED, self.maybe_sent, False, fatal, history)
        if status == 429 and not self.count_throttled:
            return self._throttled(kind, retry_after, rng)
        maybe_sent, resends, look_up = self.maybe_sent, self.resends, False
        if kind is _AMBIGUOUS and not self.idempotent:
            maybe_sent = look_up = True
            if resends >= self.max_ambiguous_resends:
                history = (*self.history, Attempt(kind, status, 0.0))
                return GiveUp(GiveUpReason.RESENDS, True, True, None, history)
            resends += 1
        if retry_after and (status == 429 or self.idempotent):
            wait = retry_after
        else:
            wait = self.backoff(self.retries, rng)
        retries, waited = self.retries, self.waited
        if not self.available():
            pass  # an outage of the run: this failure says nothing about the request
        elif not self.may_retry(retries, waited, wait):
            reason = GiveUpReason.RETRIES if retries >= self.max_retries else GiveUpReason.TIME
            history = (*self.history, Attempt(kind, status, 0.0))
            return GiveUp(reason, maybe_sent, look_up, None, history)
        else:
            retries += 1
            waited += wait
        return replace(
            self,
            retries=retries,
            waited=waited,
            resends=resends,
            maybe_sent=maybe_sent,
            wait=wait,
            shared_pause=status == 429,
            look_up=look_up,
            history=(*self.history, Attempt(kind, status, wait)),
        )

    def _throttled(
        self, kind: FailureKind, retry_after: float | None, rng: random.Random | None
    ) -> RetryPolicy | GiveUp:
        """A 429 of a create: one shared pause, paid from the waiting budget, not from retries.

        The give-up keeps ``maybe_sent`` from earlier attempts: the 429 itself sent nothing, but
        an earlier ambiguous attempt may have, so such a message must not be resent blindly.
        """
        pause = retry_after or self.backoff(self.retries, rng)
        waited = self.waited + pause
        history = (*self.history, Attempt(kind, 429, pause))
        if waited > self.max_retry_seconds:
            return GiveUp(GiveUpReason.TIME, self.maybe_sent, False, None, history, pause)
        return replace(
            self, waited=waited, wait=pause, shared_pause=True, look_up=False, history=history
        )


class RejectionBreaker:
    """Trips after N rejections in a row with one status on one connection.

    A revoked grant or a wrong body version rejects every message: stop the run instead of
    dead-lettering the whole backlog. Shared by every request of a run (hence the lock); the
    policy consults it when a rejection comes, and callers report acceptances.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._streaks: dict[str | None, tuple[int | None, int]] = {}

    def rejected(self, connection_id: str | None, status: int | None) -> str | None:
        """Count a rejection; return the fatal reason once the limit is reached."""
        with self._lock:
            last, count = self._streaks.get(connection_id, (None, 0))
            count = count + 1 if last == status else 1
            self._streaks[connection_id] = (status, count)
        if count >= self._limit:
            return (
                f"{count} rejections in a row with status {status} on connection {connection_id}"
                " (max_consecutive_rejections): check credentials, grants and message_schema"
            )
        return None

    def accepted(self, connection_id: str | None) -> None:
        """Any acceptance ends the streak."""
        if connection_id not in self._streaks:  # the common case, without the lock
            return
        with self._lock:
            self._streaks.pop(connection_id, None)
