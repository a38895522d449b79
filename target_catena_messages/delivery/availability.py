"""Whether Catena is reachable at all: an outage is a state of the run, not of each message.

Without this, every message treated a Catena outage as its own failure: it used up its retries
in seconds and was dead-lettered, and every sender hammered the dead endpoint (and the token
endpoint) on its own. Here the run decides once (docs/design.md, "Catena unavailable"):

- *up* → *suspect*: a failure that may mean an outage (no answer, 502, 503, 504:
  ``signals_outage``) arms one prober thread. Any answer that proves Catena answers (a success,
  a 4xx, a 429, a 500) only moves ``last answer`` on: one float store, the hot path.
- *suspect* → *down*: nothing answered for ``quiet_seconds`` and a probe that carries no message
  (token, then a size-1 operation-list read) fails the same way. One warning.
  *suspect* → *up*: something answered meanwhile, or the probe did.
- *down*: senders, lookups and confirmation wait (:meth:`wait`); failures count nothing
  (the retry policy asks :meth:`available`); one prober probes with jittered backoff, one
  request at a time. *down* → *up* after ``probes_to_end`` answers in a row (one info line).
  Down for ``limit_seconds`` (max_retry_seconds): :attr:`fatal` is set, ``on_fatal`` called, and
  the run ends through its normal fatal path with no dead letters for the outage.

The decisions are plain methods over an injected clock (:meth:`plan`, :meth:`record_probe`), so
tests drive them without threads; the prober thread only carries them out.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from enum import Enum

from target_catena_messages.catena.classify import FailureKind, signals_outage
from target_catena_messages.catena.client import Failure
from target_catena_messages.errors import FatalError, FatalKind

__all__ = ["Availability", "State"]

logger = logging.getLogger(__name__)

#: Probes answered in a row that end an outage.
PROBES_TO_END = 3
#: The prober's backoff while Catena is down: 1 s doubling up to the cap, full jitter.
PROBE_BASE_SECONDS = 1.0
PROBE_CAP_SECONDS = 30.0
_POLL = 0.25  # seconds between checks of a caller's stop event while waiting


class State(str, Enum):
    """Where the run stands with Catena."""

    UP = "up"
    SUSPECT = "suspect"  # a failure hinted at an outage; the prober is finding out
    DOWN = "down"  # a probe confirmed it: senders wait


class Availability:
    """The run's one view of whether Catena is reachable; shared by every thread that calls it.

    Args:
        probe: One request that carries no message (``CatenaClient.probe``); None for a run
            that never decides an outage (everything is always available).
        quiet_seconds: How long nothing must have answered before a probe may declare an outage.
        limit_seconds: How long an outage may last before the run ends (max_retry_seconds).
        stop: The run's stop event: set on the fatal, and ends every wait.
        on_fatal: Told the fatal error once, when the limit is reached.
        clock: Monotonic seconds (tests pass a fake one).
        rng: The backoff's jitter.
        probe_cap_seconds: The prober's longest wait between two probes.
        threads: Start the prober thread when needed (False: a test drives :meth:`plan` and
            :meth:`record_probe` itself).
    """

    def __init__(
        self,
        probe: Callable[[], Failure | None] | None,
        *,
        quiet_seconds: float,
        limit_seconds: float,
        stop: threading.Event | None = None,
        on_fatal: Callable[[FatalError], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        probe_cap_seconds: float = PROBE_CAP_SECONDS,
        threads: bool = True,
    ) -> None:
        self._probe = probe
        self._quiet = quiet_seconds
        self._limit = limit_seconds
        self._stop = stop or threading.Event()
        self.on_fatal = on_fatal
        self._clock = clock
        self._rng = rng or random.Random()
        self._cap = max(probe_cap_seconds, PROBE_BASE_SECONDS)
        self._cond = threading.Condition()
        self.state = State.UP
        self._last_answer = clock()  # the run's start counts as an answer
        self._since = 0.0  # first outage-signalling failure after the last answer
        self._since_wall: datetime | None = None
        self._failure: str = ""  # the last outage-signalling failure, for the log lines
        self._probe_failures = 0  # probes failed in a row while down: the backoff's exponent
        self._answers = 0  # probes answered in a row while down
        self._next_probe = 0.0
        self._thread: threading.Thread | None = None
        self._threads = threads
        self.fatal: FatalError | None = None
        self.outages = 0
        self.probes = 0
        self._down_seconds = 0.0  # ended outages

    @classmethod
    def unmonitored(cls) -> Availability:
        """An availability that never declares an outage (tests, and callers without a run)."""
        return cls(None, quiet_seconds=0.0, limit_seconds=float("inf"))

    # -- what callers report (any thread) ----------------------------------------------------

    def succeeded(self, elapsed: float = 0.0) -> None:
        """A request was answered as it should be: Catena is up. No lock.

        ``elapsed``: how long the request took. An answer proves Catena up only from when its
        request was *sent*: a slow request sent before an outage and answered just after it
        began must not pass for a sign of life (it would dead-letter messages that fail in the
        outage's first seconds).
        """
        sent = self._clock() - elapsed
        self._last_answer = max(self._last_answer, sent)

    def failed(self, status: int | None, message: str = "", elapsed: float = 0.0) -> None:
        """A request failed; arms the prober when the failure may mean an outage.

        Any HTTP answer that does not signal an outage (4xx, 429, 500) proves Catena answers
        (from when it was sent, as for :meth:`succeeded`).
        """
        if not signals_outage(status):
            self.succeeded(elapsed)
            return
        if self._probe is None or self.state is not State.UP:
            return
        with self._cond:
            if self.state is State.UP:
                self._suspect(message or (f"HTTP {status}" if status else "no answer"))

    def begin(self, failure: Failure) -> None:
        """An outage known already (the start-up probe failed): down now, probing from here."""
        with self._cond:
            if self.state is State.DOWN:
                return
            now = self._clock()
            self._since, self._since_wall = now, _utcnow()
            self._go_down(now, failure.message)
            self._ensure_prober()

    # -- what callers ask --------------------------------------------------------------------

    def available(self) -> bool:
        """False while an outage is declared: the retry policy then counts nothing."""
        return self.state is not State.DOWN

    def doubtful(self) -> bool:
        """Whether an outage is suspected or declared (the token fetch then tries only once)."""
        return self.state is not State.UP

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Block while Catena is down; False when the run must end (stopped, or the limit)."""
        if self.state is not State.DOWN:
            return not self._stopped(stop)
        with self._cond:
            while self.state is State.DOWN and not self._stopped(stop):
                self._cond.wait(_POLL)
        return self.state is not State.DOWN and not self._stopped(stop)

    def holds(self, status: int | None, stop: threading.Event | None = None) -> bool:
        """A request is about to be given up after ``status``: should it wait for Catena instead?

        Only for a failure that may mean an outage. While the run has not decided (suspect),
        this waits for the prober's answer: a message must not be dead-lettered for an outage
        the run is about to declare. True: Catena is down, the caller waits (:meth:`wait`) and
        retries with its budget intact; False: Catena answers, give up as usual.
        """
        if self._probe is None or not signals_outage(status):
            return False
        self.failed(status)
        with self._cond:
            while self.state is State.SUSPECT and not self._stopped(stop):
                self._cond.wait(_POLL)
        return self.state is State.DOWN and not self._stopped(stop)

    def unavailable_for(self) -> float | None:
        """Seconds the current outage has lasted, or None when Catena is not down."""
        if self.state is not State.DOWN:
            return None
        return max(0.0, self._clock() - self._since)

    def counters(self) -> dict[str, float]:
        """For the summary: outages, seconds unavailable and probes (empty when none)."""
        if not self.outages:
            return {}
        seconds = self._down_seconds + (self.unavailable_for() or 0.0)
        return {
            "outages": self.outages,
            "outage_seconds": round(seconds, 1),
            "outage_probes": self.probes,
        }

    # -- the decisions (pure but for the clock; under the lock, a re-entrant one) ----------

    def plan(self, now: float) -> float | None:
        """Seconds until the prober should probe (0: now), or None when it has nothing to do."""
        with self._cond:
            return self._plan(now)

    def record_probe(self, failure: Failure | None, now: float) -> None:
        """A probe's result: the transitions it decides."""
        with self._cond:
            self._record_probe(failure, now)

    def _plan(self, now: float) -> float | None:
        """Seconds until the prober should probe (0: now), or None when it has nothing to do.

        Also takes the transitions time alone decides: suspect → up when something answered
        since the failure; down → fatal at the limit.
        """
        if self.state is State.UP or self.fatal is not None:
            return None
        if self.state is State.SUSPECT:
            if self._last_answer > self._since:
                self.state = State.UP
                self._cond.notify_all()
                return None
            return max(0.0, self._last_answer + self._quiet - now)
        if now - self._since >= self._limit:
            self._give_up(now)
            return None
        return max(0.0, min(self._next_probe, self._since + self._limit) - now)

    def _record_probe(self, failure: Failure | None, now: float) -> None:
        self.probes += 1
        answered = failure is None or not signals_outage(failure.status)
        if self.state is State.SUSPECT:
            if answered:
                self._last_answer = now
                self.state = State.UP
                self._cond.notify_all()
            else:
                assert failure is not None
                self._go_down(now, failure.message)
            return
        if self.state is not State.DOWN:
            return
        if answered:
            self._answers += 1
            self._probe_failures = 0
            if self._answers >= PROBES_TO_END:
                self._go_up(now)
                return
        else:
            assert failure is not None
            self._answers = 0
            self._probe_failures += 1
            self._failure = failure.message
        wait = PROBE_BASE_SECONDS * 2 ** min(self._probe_failures, 30)
        wait = self._rng.uniform(PROBE_BASE_SECONDS, min(self._cap, wait))
        if failure is not None and failure.retry_after:
            wait = max(wait, failure.retry_after)
        self._next_probe = now + (PROBE_BASE_SECONDS if self._answers else wait)

    def _suspect(self, message: str) -> None:
        self.state = State.SUSPECT
        self._since, self._since_wall = self._clock(), _utcnow()
        self._failure = message
        self._ensure_prober()

    def _go_down(self, now: float, message: str) -> None:
        self.state = State.DOWN
        self.outages += 1
        self._failure = message
        self._answers = self._probe_failures = 0
        self._next_probe = now + self._rng.uniform(PROBE_BASE_SECONDS / 2, PROBE_BASE_SECONDS)
        logger.warning(
            "Catena unavailable since %s: %s; waiting up to max_retry_seconds=%g before ending "
            "the run; nothing is dead-lettered for this",
            _hms(self._since_wall),
            message,
            self._limit,
        )

    def _go_up(self, now: float) -> None:
        lasted = now - self._since
        self._down_seconds += lasted
        self.state = State.UP
        self._last_answer = now
        self._cond.notify_all()
        logger.info(
            "Catena available again after %.0f s unavailable (since %s)",
            lasted,
            _hms(self._since_wall),
        )

    def _give_up(self, now: float) -> None:
        lasted = now - self._since
        self.fatal = FatalError(
            f"Catena unavailable since {_hms(self._since_wall)} ({lasted:.0f} s, longer than "
            f"max_retry_seconds={self._limit:g}): {self._failure}; nothing was dead-lettered "
            "for it, the next run sends what is left",
            kind=FatalKind.CATENA_UNAVAILABLE,
        )
        self._cond.notify_all()

    # -- the prober thread -------------------------------------------------------------------

    def _ensure_prober(self) -> None:
        if not self._threads:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._prober, name="catena-probe", daemon=True)
            self._thread.start()

    def _prober(self) -> None:
        """Carry out :meth:`plan`: wait, probe, record; one request at a time."""
        assert self._probe is not None
        while not self._stop.is_set():
            with self._cond:
                delay = self.plan(self._clock())
                if delay is None:
                    self._thread = None  # a later suspicion starts a new one
                    break
            if delay > 0:
                self._stop.wait(min(delay, 1.0))  # short: answers may come in meanwhile
                continue
            try:
                result = self._probe()
            except FatalError as exc:  # credentials refused while probing: the run's fatal
                self._fail(exc)
                return
            except Exception as exc:  # a broken probe must not hang every sender
                logger.debug("probe failed unexpectedly", exc_info=True)
                result = Failure(FailureKind.SAFE, None, None, str(exc), None, 0.0)
            with self._cond:
                self.record_probe(result, self._clock())
        if self.fatal is not None:
            self._fail(self.fatal)

    def _fail(self, exc: FatalError) -> None:
        with self._cond:
            if self.fatal is None:
                self.fatal = exc
            self._cond.notify_all()
        if self.on_fatal is not None:
            self.on_fatal(exc)
        self._stop.set()

    def _stopped(self, stop: threading.Event | None) -> bool:
        return self._stop.is_set() or (stop is not None and stop.is_set())


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _hms(moment: datetime | None) -> str:
    if moment is None:
        return "now"
    return (moment - timedelta(microseconds=moment.microsecond)).strftime("%H:%M:%S UTC")
