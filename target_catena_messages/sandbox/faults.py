"""The fault plan as pure logic: which faults apply to one request, and the rate limiter.

Nothing here does I/O or reads a clock: the caller passes the request number, the time since the
plan started and owns the plan object (whose only state is the seeded random generator and how often
each rule fired). So the same seed and the same request sequence always give the same faults, and
the decisions can be unit-tested without a server.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from target_catena_messages.sandbox.config import ACTION_KINDS, FaultPlanConfig, FaultRule, Match


@dataclass(frozen=True)
class RequestInfo:
    """What the plan may look at for one request.

    Attributes:
        endpoint: ``messages``, ``token``, ``revoke``, ``operations`` or ``users``.
        n: 1-based number of this request on its endpoint.
        n_any: 1-based number of this request across all endpoints (used by ``endpoint: any``).
        connection_id: the request's connection, when it names one.
        elapsed: seconds since the plan started (server start, reset or reconfigure).
        is_sync: a create-message request with ``is_sync=true`` (only then can ``sync_fail`` fire).
    """

    endpoint: str
    n: int
    n_any: int
    connection_id: str | None = None
    elapsed: float = 0.0
    is_sync: bool = False


@dataclass(frozen=True)
class Decision:
    """The faults that apply to one request.

    Attributes:
        latency_ms: total added delay (every matching latency rule adds its share).
        revoke_tokens: revoke every token issued so far before handling the request.
        action: the first matching rule of an exclusive kind (status, reset, drop, refuse,
            forbid, sync_fail), or None.
        labels: names of every rule that fired, for the received log.
    """

    latency_ms: float = 0.0
    revoke_tokens: bool = False
    action: FaultRule | None = None
    labels: tuple[str, ...] = ()

    @property
    def label(self) -> str | None:
        """All fired rules as one string (``None`` when nothing fired)."""
        return ",".join(self.labels) or None


NO_FAULT = Decision()


class Matcher:
    """One ``match`` block plus how often it has fired (for ``times``)."""

    def __init__(self, match: Match) -> None:
        self.match = match
        self.fired = 0

    def check(self, n: int, connection_id: str | None, elapsed: float, rng: random.Random) -> bool:
        """Whether the match holds for request ``n``; counts a firing when it does.

        The random draw for ``probability`` happens last, and only when every other condition
        holds, so adding an unrelated request never shifts the random sequence of this rule.
        """
        m = self.match
        start = m.after_seconds or 0.0
        holds = (
            (m.requests is None or n in m.requests)
            and (m.from_n is None or n >= m.from_n)
            and (m.to_n is None or n <= m.to_n)
            and (m.every is None or n % m.every == 0)
            and (m.connection_id is None or connection_id == m.connection_id)
            and elapsed >= start
            and (m.for_seconds is None or elapsed < start + m.for_seconds)
            and (m.times is None or self.fired < m.times)
        )
        if not holds or (m.probability is not None and rng.random() >= m.probability):
            return False
        self.fired += 1
        return True


class FaultPlan:
    """A configured fault plan with its random generator and firing counters.

    Not thread-safe on its own: the server calls ``decide`` from its one event loop thread.
    """

    def __init__(self, config: FaultPlanConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self._matchers = [(rule, Matcher(rule.match)) for rule in config.rules]

    @property
    def empty(self) -> bool:
        """No rules: every request gets ``NO_FAULT`` (callers may skip building a request)."""
        return not self._matchers

    def decide(self, req: RequestInfo) -> Decision:
        """Pick the faults for one request (rules are tried in their configured order)."""
        if not self._matchers:
            return NO_FAULT
        latency = 0.0
        revoke = False
        action: FaultRule | None = None
        labels: list[str] = []
        for rule, matcher in self._matchers:
            if rule.endpoint not in (req.endpoint, "any"):
                continue
            if rule.kind in ACTION_KINDS and action is not None:
                continue
            if rule.kind == "sync_fail" and not req.is_sync:
                continue
            n = req.n_any if rule.endpoint == "any" else req.n
            if not matcher.check(n, req.connection_id, req.elapsed, self.rng):
                continue
            labels.append(rule.label)
            if rule.kind == "latency":
                jitter = self.rng.uniform(0.0, rule.jitter_ms) if rule.jitter_ms else 0.0
                latency += rule.ms + jitter
            elif rule.kind == "revoke_tokens":
                revoke = True
            else:
                action = rule
        if not labels:
            return NO_FAULT
        return Decision(latency, revoke, action, tuple(labels))

    def fired(self) -> list[int]:
        """How often each rule has fired, in rule order."""
        return [matcher.fired for _, matcher in self._matchers]


class SlidingWindowLimiter:
    """At most ``limit`` admitted requests in any 1-second window.

    Only admitted requests count, so a client that backs off as told gets through; the wait
    returned is the time until the oldest admitted request leaves the window, rounded up to whole
    seconds (at least 1), which is what a ``retry_after_seconds`` field can carry.
    """

    def __init__(self, limit_per_second: float) -> None:
        self.limit = limit_per_second
        self._window: deque[float] = deque()

    def admit(self, now: float) -> tuple[bool, int]:
        """Admit a request at monotonic time ``now``: ``(True, 0)`` or ``(False, retry_after)``."""
        window = self._window
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) < self.limit:
            window.append(now)
            return True, 0
        # One slot frees when the oldest admitted request leaves the window.
        return False, max(1, math.ceil(window[0] + 1.0 - now))
