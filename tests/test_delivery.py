"""The delivery engine's parts on their own: lanes and their order, FairSlots, the breaker.

Lanes are driven against the real sandbox (real HTTP, its fault plan); FairSlots with threads
whose order is forced by events, never by sleeps; the breaker is pure.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from target_catena_messages.catena.client import CatenaClient
from target_catena_messages.catena.retry import RejectionBreaker, RetryPolicy
from target_catena_messages.delivery.engine import Delivery, FairSlots
from target_catena_messages.delivery.throttle import Throttle
from target_catena_messages.errors import FatalError
from target_catena_messages.outcome import Message, Outcome, Resolution
from tests.harness import sandbox_client

CONN_A = "11111111-1111-4111-8111-111111111111"
CONN_B = "22222222-2222-4222-8222-222222222222"
QUICK = RetryPolicy(max_retries=20, base_seconds=0.01, cap_seconds=0.05, max_ambiguous_resends=1)


def make_client(sandbox: Any) -> CatenaClient:
    return sandbox_client(sandbox.url, CatenaClient)


def message(seq: int, conn: str, driver: str) -> Message:
    body = {
        "connection_id": conn,
        "source_sender_id": "dispatcher-7",
        "source_recipient_ids": [driver],
        "message_text": f"msg {seq:04d} for {driver}",
    }
    return Message(
        seq=seq,
        stream="dispatch",
        namespace="dispatch",
        key=str(seq),
        record={"id": seq},
        body=body,
        fingerprint=f"fp-{seq}",
        lane=f"{conn}|{driver}",
    )


class Engine:
    """A Delivery on the sandbox that collects its outcomes in the order they were reported."""

    def __init__(self, sandbox: Any, **kwargs: Any) -> None:
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        options: dict[str, Any] = {
            "policy": QUICK,
            "throttle": Throttle(),
            "max_concurrency": 4,
            "max_consecutive_rejections": 1000,
            **kwargs,
        }
        self.delivery = Delivery(make_client(sandbox), on_outcome=self._record, **options)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def run(self, messages: list[Message]) -> list[Outcome]:
        self.delivery.submit_many(messages)
        assert self.delivery.wait_idle(timeout=120)
        self.delivery.close()
        return self.outcomes


@pytest.fixture
def engine_factory(sandbox_factory: Any) -> Iterator[Any]:
    engines: list[Engine] = []

    def make(config: dict[str, Any] | None = None, **kwargs: Any) -> tuple[Engine, Any]:
        box = sandbox_factory(config)
        engine = Engine(box, **kwargs)
        engines.append(engine)
        return engine, box

    yield make
    for engine in engines:
        engine.delivery.close()


# -- lanes -----------------------------------------------------------------------------------


def test_one_sender_sends_oldest_ready_head_first(engine_factory: Any) -> None:
    engine, box = engine_factory(max_concurrency=1)
    drivers = ["d1", "d2", "d1", "d3", "d2", "d1"]
    messages = [message(i, CONN_A, d) for i, d in enumerate(drivers, start=1)]
    outcomes = engine.run(messages)
    # One slot: the next lane head is always the lowest sequence ready, so input order overall.
    assert [b["message_text"] for b in box.accepted_bodies()] == [
        m.body["message_text"] for m in messages
    ]
    assert [o.message.seq for o in outcomes] == [1, 2, 3, 4, 5, 6]
    assert all(o.resolution is Resolution.ACCEPTED for o in outcomes)


def test_each_driver_gets_its_messages_in_order_through_faults(engine_factory: Any) -> None:
    rules = [
        {"kind": "status", "status": 503, "endpoint": "messages", "match": {"probability": 0.3}},
        {"kind": "status", "status": 429, "endpoint": "messages", "match": {"every": 7}},
    ]
    engine, box = engine_factory({"faults": {"seed": 5, "rules": rules}}, max_concurrency=4)
    messages = [message(i, CONN_A if i % 2 else CONN_B, f"driver-{i % 5}") for i in range(1, 61)]
    outcomes = engine.run(messages)
    assert sorted(o.message.seq for o in outcomes) == list(range(1, 61))
    assert all(o.resolution is Resolution.ACCEPTED for o in outcomes), [
        (o.message.seq, o.stage, o.errors)
        for o in outcomes
        if o.resolution is not Resolution.ACCEPTED
    ]
    sent: dict[str, list[int]] = defaultdict(list)
    for body in box.accepted_bodies():
        seq = int(body["message_text"].split()[1])
        sent[f"{body['connection_id']}|{body['source_recipient_ids'][0]}"].append(seq)
    assert sorted(s for seqs in sent.values() for s in seqs) == list(range(1, 61))  # each once
    reported: dict[str, list[int]] = defaultdict(list)
    for o in outcomes:
        reported[o.message.lane].append(o.message.seq)
    for lane, seqs in sent.items():
        assert seqs == sorted(seqs), f"out of order for {lane}: {seqs}"
        assert len(seqs) == len(set(seqs)), f"sent twice on {lane}: {seqs}"
        assert reported[lane] == seqs  # outcomes are reported in lane order too
    assert engine.delivery.counters()["retries"] > 0  # the faults did fire


def test_breaker_stops_the_engine_after_rejections_in_a_row(engine_factory: Any) -> None:
    rules = [{"kind": "status", "status": 422, "endpoint": "messages"}]
    engine, box = engine_factory(
        {"faults": {"rules": rules}}, max_concurrency=1, max_consecutive_rejections=3
    )
    messages = [message(i, CONN_A, "d1") for i in range(1, 7)]
    outcomes = engine.run(messages)
    assert isinstance(engine.delivery.fatal, FatalError)
    assert "3 rejections in a row with status 422" in str(engine.delivery.fatal)
    dead = [o for o in outcomes if o.resolution is Resolution.DEAD_LETTERED]
    assert [o.message.seq for o in dead] == [1, 2, 3]
    assert all((o.stage, o.status, o.retryable) == ("api", 422, False) for o in dead)
    assert all(o.resolution is Resolution.ABANDONED for o in outcomes[3:])
    assert box.stats()["requests"]["messages"] == 3  # nothing sent after the breaker tripped


# -- FairSlots -------------------------------------------------------------------------------


def _wait_for(condition: Any, limit: float = 30.0) -> None:
    """Spin on ``condition`` (a state the threads reach); fail, not hang, if it never comes."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the threads never reached the state"
        time.sleep(0.001)


def test_fair_slots_hand_a_released_slot_to_the_longest_waiter() -> None:
    slots = FairSlots(1)
    order: list[str] = []
    holder_may_leave = threading.Event()

    def holder() -> None:
        with slots:
            order.append("holder")
            holder_may_leave.wait()
        with slots:  # straight back in: must queue behind the waiters
            order.append("holder again")

    def waiter(name: str) -> None:
        with slots:
            order.append(name)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    _wait_for(lambda: order == ["holder"])
    for name, taken in (("first", 2), ("second", 3)):
        thread = threading.Thread(target=waiter, args=(name,))
        threads.append(thread)
        thread.start()
        _wait_for(lambda taken=taken: slots.taken == taken)  # queued before the next one
    assert slots.in_use == 1
    holder_may_leave.set()
    for thread in threads:
        thread.join()
    assert order == ["holder", "first", "second", "holder again"]
    assert (slots.taken, slots.peak, slots.in_use) == (4, 1, 0)


def test_fair_slots_let_as_many_in_as_they_have_and_count_the_peak() -> None:
    slots = FairSlots(3)
    inside = threading.Semaphore(0)
    leave = threading.Event()

    def worker() -> None:
        with slots:
            inside.release()
            leave.wait()

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for thread in threads:
        thread.start()
    for _ in range(3):
        inside.acquire()
    _wait_for(lambda: slots.taken == 5)  # the other two are waiting for a slot
    assert (slots.in_use, slots.peak) == (3, 3)
    assert not inside.acquire(blocking=False)
    leave.set()
    for thread in threads:
        thread.join()
    assert (slots.in_use, slots.peak, slots.taken) == (0, 3, 5)


# -- RejectionBreaker ------------------------------------------------------------------------


def test_breaker_trips_on_n_rejections_in_a_row_with_one_status_on_one_connection() -> None:
    breaker = RejectionBreaker(3)
    assert breaker.rejected(CONN_A, 422) is None
    assert breaker.rejected(CONN_A, 422) is None
    assert breaker.rejected(CONN_B, 422) is None  # another connection has its own streak
    reason = breaker.rejected(CONN_A, 422)
    assert reason is not None
    assert reason.startswith(f"3 rejections in a row with status 422 on connection {CONN_A}")


def test_breaker_streak_restarts_on_another_status_or_an_acceptance() -> None:
    breaker = RejectionBreaker(2)
    assert breaker.rejected(CONN_A, 422) is None
    assert breaker.rejected(CONN_A, 400) is None  # a different status starts a new streak
    breaker.accepted(CONN_A)
    assert breaker.rejected(CONN_A, 400) is None  # the acceptance ended the streak
    assert breaker.rejected(CONN_A, 400) is not None
    breaker.accepted(CONN_B)  # a connection without a streak: nothing to end
