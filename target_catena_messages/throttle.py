"""When the next request may start: one shared 429 pause, a rate ceiling, and a rate that learns.

Every sending thread calls :meth:`Throttle.wait_turn` before a request. A 429 pauses *all* of
them (Catena's limit is per client, not per thread), and the adaptive rate keeps the target just
under the limit it learned from 429s instead of bursting back into it after every pause.

The adaptive part is AIMD, as in TCP: on a 429 the rate drops to 90 % of what was achieved in the
last second, and that achieved rate is remembered as the learned limit. After every second without
a 429 the rate grows by 2 % up to 97 % of the learned limit, then only by 0.2 % (a slow probe, in
case the limit was raised), never above ``max_rate``. A 429 costs a shared pause of
``retry_after_seconds``, so the aim is to meet few of them, not to bounce off the limit. With no
ceiling and no 429 seen, nothing is limited.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

_WINDOW = 1.0


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
        self._learned: float | None = None  # the achieved rate when the last 429 came
        self._paused_until = 0.0
        self._next_start = 0.0
        self._starts: deque[float] = deque()
        self._last_increase = clock()
        self.throttled = 0
        self.wait_seconds = 0.0

    @property
    def rate(self) -> float | None:
        """The current allowed request starts per second (None: unlimited)."""
        return self._rate

    def wait_turn(self, stop: threading.Event | None = None) -> bool:
        """Block until this thread may start a request; False when ``stop`` was set meanwhile."""
        while True:
            with self._lock:
                now = self._clock()
                self._grow(now)
                start_at = max(now, self._paused_until, self._next_start)
                if start_at <= now:
                    if self._rate:
                        self._next_start = max(self._next_start, now) + 1.0 / self._rate
                    self._starts.append(now)
                    while self._starts and self._starts[0] < now - _WINDOW:
                        self._starts.popleft()
                    return True
                delay = start_at - now
            if stop is not None and stop.is_set():
                return False
            self._sleep(min(delay, 0.25))

    def pause(self, seconds: float) -> None:
        """A 429: stop every thread for ``seconds`` and, if adaptive, lower the rate."""
        with self._lock:
            now = self._clock()
            self.throttled += 1
            until = now + max(seconds, 0.0)
            if until > self._paused_until:
                self.wait_seconds += until - max(now, self._paused_until)
                self._paused_until = until
            if self._adaptive:
                achieved = float(sum(1 for t in self._starts if t >= now - _WINDOW))
                self._learned = max(1.0, achieved)
                # A window disturbed by an earlier pause undercounts: never cut by more than half.
                lowered = max(1.0, 0.9 * achieved, 0.5 * (self._rate or 0.0))
                if self._rate is None or lowered < self._rate:
                    self._rate = lowered
                self._last_increase = until

    def _grow(self, now: float) -> None:
        if not self._adaptive or self._rate is None or now < self._last_increase + _WINDOW:
            return
        steps = int((now - self._last_increase) / _WINDOW)
        for _ in range(steps):
            near_limit = self._learned is not None and self._rate >= 0.97 * self._learned
            self._rate += max(0.05, (0.002 if near_limit else 0.02) * self._rate)
        self._last_increase += steps * _WINDOW
        if self._max_rate is not None:
            self._rate = min(self._rate, self._max_rate)
