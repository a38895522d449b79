"""When the next request may start: one shared 429 pause, a rate ceiling, and a rate that learns.

Every sending thread calls :meth:`Throttle.wait_turn` before a request. A 429 pauses *all* of
them (Catena's limit is per client, not per thread), and the adaptive rate keeps the target just
under a limit it has learned instead of bursting back into it after every pause.

One 429 cannot say whether our rate caused it: a rate limiter refuses more the faster we go, while
a storm (every request refused for a while) or a server that refuses one request in N does not
care about our rate, and a ceiling then only adds to the pauses (with one in 23 refused and 1 s
pauses, ~23/s get through unthrottled; a cut at each 429 held it near 5/s). So a 429 puts a cut
*on trial*:

- The rate drops to 90 % of what got through in the last second, never below half the rate in
  force (or, with none, half the most requests seen in a second), and is held there while the
  429 share at that rate is counted.
- The share did not fall (at least half the share before the cut): our rate did not matter. The
  old rate comes back, and 429s at up to twice that share are *tolerated*, only paused for,
  until they stop coming. The pauses then bound the rate by themselves.
- The share fell: the cut is kept. The first time it may only have been the end of a storm, so
  the rate doubles every second back to where it was (no ceiling, if there was none). A cut that
  helps again on the way back, after a second of sending undisturbed by pauses, is a real limit:
  it is learned, and the rate grows 5 % a second up to 97 % of it, then by 0.1 % a second (a
  slow probe, in case the limit was raised). A 429 well below a learned limit is a surprise: the
  rate goes back under the limit and only a second surprise within 10 s lowers it, so scattered
  429s do not wear a limit down.

A 429 that comes while an earlier one's pause runs answers a request sent before that pause: it
extends the pause and counts, but starts nothing. With no ``max_rate`` and no 429 seen, nothing
is limited; ``max_rate`` is a ceiling the rate never grows past.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

_WINDOW = 1.0  # seconds over which the achieved rate is measured, and one growth step
_CUT = 0.9  # a trial's rate: this share of what got through in the second before the 429
_NEAR = 0.97  # grow quickly up to this share of a learned limit, then only probe
_GROW = 0.05  # per second, below _NEAR of the limit
_PROBE = 0.001  # per second, above it
_DECAY = 1.0 - 1.0 / 128  # per request: the 429 share is measured over about the last 128
_EVIDENCE = 4.0  # a cut helped once this many 429s were expected at the old share and few came
_MIN_TRIAL = 8  # requests, whatever the share
_TRIAL_SECONDS = 3.0  # a trial ends by then: a 429 rarer than that costs little either way
_SECOND_STRIKE = 10.0  # seconds: a second 429 well below the learned limit lowers it


@dataclass(slots=True)
class _Trial:
    """A rate cut on probation: does the 429 share fall at the lower rate?"""

    before: float | None  # the rate to restore when it does not
    achieved: float  # requests/s that got through in the second before the 429
    hit_at: float  # the rate the 429 came at: ``before`` when that bound the sending, else achieved
    paced: bool  # ``before`` bound the sending
    undisturbed: bool  # no pause in that second, so ``achieved`` is a fair limit estimate
    known_limit: bool  # a limit was already learned, or the rate was doubling back
    cut: float
    share: float  # the 429 share before the cut (answers to requests sent before it included)
    t0: float = 0.0  # the first request at the trial's rate
    needed: int = 0  # requests at the trial's rate before it may call the cut a help
    n: int = 0
    k: int = 0


class Throttle:
    """Thread-safe gate for request starts."""

    def __init__(
        self,
        *,
        max_rate: float | None = None,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._sleep = sleep
        self._max_rate = max_rate
        self._adaptive = adaptive
        self._rate: float | None = max_rate  # current allowed starts per second; None = unlimited
        self._paused_until = -math.inf
        self._next_start = -math.inf
        self._starts: deque[float] = deque()  # start times in the last window
        self._refused: deque[float] = deque()  # 429 times in the last window
        self._sent = 0.0  # requests, decayed per request (see _DECAY)
        self._hits = 0.0  # 429s, decayed the same way: their share is _hits / _sent
        self._best = 0.0  # the most requests started in a window when a 429 came
        self._trial: _Trial | None = None
        self._tolerated = 0.0  # a 429 share shown not to depend on our rate
        self._limit: float | None = None  # a learned limit (requests/s)
        self._back_to: float | None = None  # doubling back towards this rate ...
        self._back_free = False  # ... and then to no ceiling at all
        self._surprised = -math.inf  # when a 429 last came well below the learned limit
        self._last_step = clock()
        self.throttled = 0
        self.wait_seconds = 0.0

    @property
    def rate(self) -> float | None:
        """The current allowed request starts per second (None: unlimited)."""
        return self._rate

    @property
    def limit(self) -> float | None:
        """The learned limit in requests per second (None: no limit learned)."""
        return self._limit

    def wait_turn(self, stop: threading.Event | None = None) -> bool:
        """Block until this thread may start a request; False when ``stop`` was set meanwhile."""
        while True:
            delay = self.try_turn()
            if delay <= 0.0:
                return True
            if stop is not None and stop.is_set():
                return False
            self._sleep(min(delay, 0.25))

    def try_turn(self) -> float:
        """Take a request start now if one is allowed (0.0), else the seconds to wait first."""
        with self._lock:
            now = self._clock()
            self._grow(now)
            start_at = max(now, self._paused_until, self._next_start)
            if start_at > now:
                return start_at - now
            if self._rate:
                self._next_start = max(self._next_start, now) + 1.0 / self._rate
            starts = self._starts
            starts.append(now)
            while starts[0] < now - _WINDOW:
                starts.popleft()
            if self._adaptive:
                self._started(now)
            return 0.0

    def pause(self, seconds: float) -> None:
        """A 429: stop every thread for ``seconds`` and, if adaptive, put the rate on trial."""
        with self._lock:
            now = self._clock()
            self.throttled += 1
            previous_end = self._paused_until
            until = now + max(seconds, 0.0)
            if until > previous_end:
                self.wait_seconds += until - max(now, previous_end)
                self._paused_until = until
            if self._adaptive:
                # A 429 during an earlier one's pause answers a request sent before that pause.
                self._throttled(now, echo=previous_end > now, calm=previous_end <= now - _WINDOW)

    # -- the adaptive rate (called under the lock) -------------------------------------------

    def _share(self) -> float:
        return min(1.0, self._hits / max(self._sent, 1.0))

    def _started(self, now: float) -> None:
        self._sent = self._sent * _DECAY + 1.0
        self._hits *= _DECAY
        trial = self._trial
        if trial is None:
            if self._tolerated and self._hits < 0.25 * self._tolerated * self._sent:
                self._tolerated = 0.0  # those 429s stopped coming: the next one is news
            return
        if trial.n == 0:
            trial.t0 = now
            by_share = math.ceil(_EVIDENCE / trial.share)
            trial.needed = max(_MIN_TRIAL, min(by_share, math.ceil(_TRIAL_SECONDS * trial.cut)))
        trial.n += 1
        if (trial.n >= trial.needed or now >= trial.t0 + _TRIAL_SECONDS) and (
            trial.k < 0.5 * trial.share * trial.n
        ):
            self._kept(trial, now)

    def _throttled(self, now: float, *, echo: bool, calm: bool) -> None:
        refused = self._refused
        refused.append(now)
        while refused[0] < now - _WINDOW:
            refused.popleft()
        self._hits += 1.0
        trial = self._trial
        if trial is not None:
            if trial.n == 0:
                # Sent before the cut and counted as got through: part of the share before it.
                trial.share = self._share()
                trial.achieved = max(trial.achieved - 1.0, 1.0)
                if trial.hit_at > trial.achieved and not trial.paced:
                    trial.hit_at = trial.achieved
                floor = 0.5 * (self._best if trial.before is None else trial.before)
                trial.cut = min(trial.cut, max(1.0, _CUT * trial.achieved, floor))
                self._rate = trial.cut
            else:
                trial.k += 1
                if trial.k >= 0.5 * trial.share * trial.n:
                    self._restore(trial, now)
            return
        if echo or (self._tolerated and self._share() <= 2.0 * self._tolerated):
            return
        self._start_trial(now, calm)

    def _start_trial(self, now: float, calm: bool) -> None:
        starts = sum(1 for t in self._starts if t >= now - _WINDOW)
        self._best = max(self._best, float(starts))
        achieved = float(max(starts - len(self._refused), 1))
        before = self._rate
        # A window disturbed by an earlier pause undercounts: never cut by more than half.
        cut = max(1.0, _CUT * achieved, 0.5 * (self._best if before is None else before))
        if before is not None:
            cut = min(before, cut)
        paced = before is not None and achieved >= _CUT * before
        self._trial = _Trial(
            before=before,
            achieved=achieved,
            hit_at=before if paced and before is not None else achieved,
            paced=paced,
            undisturbed=calm,
            known_limit=self._limit is not None or self._back_to is not None,
            cut=cut,
            share=self._share(),
        )
        self._rate = cut
        self._last_step = max(self._last_step, self._paused_until)  # grow after the pause

    def _restore(self, trial: _Trial, now: float) -> None:
        """The share did not fall at the lower rate: our rate did not cause these 429s."""
        self._trial = None
        self._rate = trial.before
        self._tolerated = trial.share
        self._last_step = now

    def _kept(self, trial: _Trial, now: float) -> None:
        """The share fell at the lower rate: keep the cut, and learn a limit if it is one."""
        self._trial = None
        self._tolerated = 0.0
        self._last_step = now
        limit = self._limit
        # Below a learned limit, and not on the way back to it, a 429 is a surprise: one alone
        # does not lower the limit (rare rate-free 429s would wear it down), a second one does.
        surprise = (
            limit is not None
            and self._back_to is None
            and trial.hit_at < 0.99 * limit
            and now >= self._surprised + _SECOND_STRIKE
        )
        if surprise:
            self._surprised = now
        if trial.known_limit and trial.undisturbed and not surprise:
            self._limit = trial.hit_at
            self._back_to, self._back_free = None, False
        elif self._back_to is not None:
            pass  # already on the way back: keep heading where the rate was before the 429s
        elif limit is not None:
            # A window disturbed by pauses says nothing new about the limit: back to under it.
            self._back_to = _NEAR * limit
        else:
            # Perhaps only the end of a storm: go back to where we were, and see.
            self._back_free = trial.before is None
            self._back_to = max(2.0 * self._best, trial.cut) if self._back_free else trial.before

    def _grow(self, now: float) -> None:
        if not self._adaptive or self._rate is None or now < self._last_step + _WINDOW:
            return
        trial = self._trial
        if trial is not None and not (trial.known_limit and self._limit is not None):
            return  # hold the rate on trial still (below a learned limit, growing is fine)
        steps = int((now - self._last_step) / _WINDOW)
        self._last_step += steps * _WINDOW
        rate = self._rate
        for _ in range(steps):
            if self._back_to is not None:
                rate = min(2.0 * rate, self._back_to)
                if rate >= self._back_to:
                    free = self._back_free and self._max_rate is None
                    self._back_to, self._back_free = None, False
                    if free:
                        self._rate = None
                        return
            elif self._limit is not None:
                near = _NEAR * self._limit
                rate = min(rate * (1.0 + _GROW), near) if rate < near else rate + _PROBE * rate
            else:
                break
        if self._max_rate is not None:
            rate = min(rate, self._max_rate)
        self._rate = rate
