"""The throttle with a fake clock: shared pause, learned rate, bounded cuts, growth to the limit."""

from __future__ import annotations

from target_catena_messages.throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def make(**kwargs: object) -> tuple[Throttle, Clock]:
    clock = Clock()
    return Throttle(clock=clock, sleep=clock.sleep, **kwargs), clock  # type: ignore[arg-type]


def starts(throttle: Throttle, clock: Clock, seconds: float, every: float) -> int:
    """Ask for turns every ``every`` seconds for ``seconds``; return how many were granted."""
    end = clock.now + seconds
    n = 0
    while clock.now < end:
        throttle.wait_turn()
        n += 1
        clock.sleep(every)
    return n


def test_unlimited_until_a_429_then_a_shared_pause() -> None:
    throttle, clock = make()
    assert starts(throttle, clock, 1.0, 0.01) == 100
    throttle.pause(2.0)
    before = clock.now
    throttle.wait_turn()
    assert clock.now - before >= 2.0  # every caller waits out the same pause
    assert throttle.throttled == 1
    assert throttle.wait_seconds == 2.0


def test_rate_learned_from_429s_stays_just_under_the_limit() -> None:
    throttle, clock = make()
    starts(throttle, clock, 1.0, 0.01)  # 100/s achieved
    throttle.pause(0.0)
    assert throttle.rate is not None
    assert 88.0 <= throttle.rate <= 90.0
    # grows back by 2 % a second towards the learned limit, then only probes
    starts(throttle, clock, 10.0, 0.001)
    assert throttle.rate is not None
    assert 97.0 <= throttle.rate < 100.0


def test_one_cut_never_more_than_halves_the_rate() -> None:
    throttle, clock = make(max_rate=200.0)
    starts(throttle, clock, 1.0, 0.001)
    throttle.pause(5.0)  # after a long pause the last window saw almost no starts
    clock.sleep(5.0)
    throttle.wait_turn()
    throttle.pause(0.0)
    assert throttle.rate is not None
    assert throttle.rate >= 0.5 * 180.0 - 1e-9


def test_max_rate_is_a_ceiling() -> None:
    throttle, clock = make(max_rate=20.0, adaptive=False)
    assert starts(throttle, clock, 2.0, 0.0001) <= 41
