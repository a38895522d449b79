"""Catena unavailable is a state of the run: ridden out, or the run ends with nothing lost.

The state machine is driven with a fake clock; everything else runs the real CLI against the
sandbox (refused connections, 503 gateways) or a closed port, with the outage tunables shortened
through the environment (quiet 1 s, probes at most 2 s apart).
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.catena.classify import FailureKind
from target_catena_messages.catena.client import Failure
from target_catena_messages.catena.retry import GiveUp, GiveUpReason, RetryPolicy
from target_catena_messages.delivery.availability import Availability, State
from target_catena_messages.errors import FatalKind
from tests.harness import TargetResult, run_target, sandbox_config, singer_lines

CONN_A = "11111111-1111-4111-8111-111111111111"
CONN_B = "22222222-2222-4222-8222-222222222222"
STREAM = "dispatch"
ENV = {"CATENA_OUTAGE_QUIET_SECONDS": "1", "CATENA_OUTAGE_PROBE_CAP_SECONDS": "2"}
BEGAN = "Catena unavailable since"
ENDED = "Catena available again"


# -- the state machine, with a fake clock ----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused() -> Failure:
    return Failure(FailureKind.SAFE, None, None, "ConnectionRefusedError", None, 0.0)


def answered(status: int) -> Failure:
    return Failure(FailureKind.SAFE, status, None, f"HTTP {status}", None, 0.0)


def machine(clock: Clock, *, quiet: float = 10.0, limit: float = 60.0) -> Availability:
    return Availability(
        lambda: None, quiet_seconds=quiet, limit_seconds=limit, clock=clock, threads=False
    )


def test_answers_that_prove_catena_is_up_never_raise_suspicion() -> None:
    clock = Clock()
    a = machine(clock)
    for status in (429, 500, 400, 404, 422):
        clock.now += 20
        a.failed(status)
        assert a.state is State.UP
        assert a.plan(clock.now) is None


def test_outage_begins_after_quiet_and_a_failed_probe_and_ends_after_three_answers() -> None:
    clock = Clock()
    a = machine(clock)
    clock.now += 2
    a.failed(None)
    assert a.state is State.SUSPECT
    assert a.available()
    assert a.plan(clock.now) == pytest.approx(8.0)  # nothing answered for 2 s of the 10
    clock.now += 8
    assert a.plan(clock.now) == 0.0
    a.record_probe(answered(503), clock.now)
    assert a.state is State.DOWN
    assert not a.available()
    for _ in range(2):
        clock.now += 1
        a.record_probe(None, clock.now)
    clock.now += 1
    a.record_probe(refused(), clock.now)  # a failure in between starts the count again
    for _ in range(2):
        clock.now += 1
        a.record_probe(answered(429), clock.now)  # an answer, even a rate limit, counts
    assert a.state is State.DOWN
    clock.now += 1
    a.record_probe(None, clock.now)
    assert a.state is State.UP
    assert a.available()
    assert a.fatal is None
    assert a.counters()["outages"] == 1
    assert a.counters()["outage_seconds"] == pytest.approx(14.0)  # since the failure


def test_an_answer_during_the_quiet_time_clears_the_suspicion() -> None:
    clock = Clock()
    a = machine(clock)
    clock.now += 1
    a.failed(None)
    clock.now += 1
    a.succeeded()
    assert a.plan(clock.now) is None
    assert a.state is State.UP
    assert a.counters() == {}


def test_a_slow_answer_to_a_request_sent_before_the_failure_is_no_sign_of_life() -> None:
    """A keep-alive request answered just after an outage began must not clear the suspicion."""
    clock = Clock()
    a = machine(clock)
    clock.now += 5
    a.failed(None)  # the outage's first failure, at t=5
    clock.now += 1
    a.succeeded(elapsed=3.0)  # sent at t=3, before it
    a.failed(500, elapsed=2.0)  # sent at t=4: an answer, but from before it too
    assert a.state is State.SUSPECT
    clock.now += 10
    assert a.plan(clock.now) == 0.0
    a.record_probe(refused(), clock.now)
    assert a.state is State.DOWN


def test_a_probe_that_answers_while_suspect_is_no_outage() -> None:
    clock = Clock()
    a = machine(clock)
    a.failed(502)
    clock.now += 10
    a.record_probe(answered(500), clock.now)
    assert a.state is State.UP


def test_an_outage_longer_than_the_limit_is_the_runs_fatal() -> None:
    clock = Clock()
    a = machine(clock, quiet=1.0, limit=30.0)
    a.failed(None)
    clock.now += 1
    a.record_probe(refused(), clock.now)
    clock.now += 10
    a.record_probe(refused(), clock.now)
    wait = a.plan(clock.now)
    assert wait is not None
    assert 0 < wait <= 30
    clock.now += 20  # 31 s since the first failure
    assert a.plan(clock.now) is None
    assert a.fatal is not None
    assert a.fatal.kind is FatalKind.CATENA_UNAVAILABLE
    assert "max_retry_seconds=30" in str(a.fatal)


def test_probe_backoff_grows_and_stays_under_the_cap() -> None:
    clock = Clock()
    a = Availability(
        lambda: None,
        quiet_seconds=0.0,
        limit_seconds=1e9,
        clock=clock,
        threads=False,
        probe_cap_seconds=30.0,
    )
    a.begin(refused())
    waits = []
    for _ in range(12):
        clock.now += a.plan(clock.now) or 0.0
        a.record_probe(refused(), clock.now)
        waits.append(a.plan(clock.now))
    assert all(w is not None and 1.0 <= w <= 30.0 for w in waits)
    assert sum(w or 0 for w in waits) > 60  # not a probe a second for minutes


def test_renewed_restores_the_budget_and_keeps_what_may_have_been_sent() -> None:
    policy = RetryPolicy(max_retries=1, jitter=False)
    state = policy.increment(FailureKind.SAFE, None)
    assert isinstance(state, RetryPolicy)
    end = state.increment(FailureKind.SAFE, None)
    assert isinstance(end, GiveUp)
    assert end.reason is GiveUpReason.RETRIES
    renewed = state.renewed(end)
    assert renewed.retries == 0
    assert renewed.waited == 0.0
    assert not renewed.maybe_sent
    ambiguous = RetryPolicy(max_retries=0, max_ambiguous_resends=3, jitter=False)
    end = ambiguous.increment(FailureKind.AMBIGUOUS, 504)
    assert isinstance(end, GiveUp)
    assert end.maybe_sent
    assert end.look_up
    renewed = ambiguous.renewed(end)
    assert renewed.maybe_sent
    assert renewed.resends == 0  # the resend that follows is counted by the ledger, then settled


# -- end to end -------------------------------------------------------------------------------


def records(first: int, last: int, *, drivers: int = 6) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "connection_id": CONN_A,
            "source_recipient_ids": [f"driver-{i % drivers}"],
            "message_text": f"msg {i:04d} for driver-{i % drivers}",
        }
        for i in range(first, last + 1)
    ]


def run(
    workdir: Path, url: str, recs: list[dict[str, Any]], *, state_every: int = 5, **settings: Any
) -> TargetResult:
    config = sandbox_config(url, operation_lookup_lag_seconds=0.5, **settings)
    lines = singer_lines(STREAM, recs, state_every=state_every)
    return run_target(workdir, config, lines, env=ENV, timeout=150)


def plan(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"faults": {"seed": 5, "rules": list(rules)}}


def sent_once(sandbox: Any, recs: list[dict[str, Any]]) -> None:
    counts = Counter(b["message_text"] for b in sandbox.accepted_bodies())
    expected = {r["message_text"] for r in recs}
    assert set(counts) == expected, f"missing: {sorted(expected - set(counts))[:5]}"
    assert max(counts.values()) == 1, [t for t, c in counts.items() if c > 1]


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def bookmark(result: TargetResult) -> int:
    state = result.last_state
    assert state is not None
    return int(state["bookmarks"][STREAM]["replication_key_value"])


def test_an_outage_shorter_than_max_retry_seconds_is_ridden_out(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory(
        plan(
            {"kind": "latency", "ms": 30},
            {"kind": "refuse", "seconds": 6, "match": {"requests": [10]}},
        )
    )
    recs = records(1, 40)
    result = run(tmp_path, sandbox.url, recs, max_retry_seconds=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.dead_letters == []
    sent_once(sandbox, recs)
    assert result.stderr.count(BEGAN) == 1, result.stderr[-3000:]
    assert result.stderr.count(ENDED) == 1
    assert result.summary is not None
    assert result.summary["http"]["outages"] == 1
    assert bookmark(result) == 40


def test_an_outage_past_max_retry_seconds_ends_the_run_and_the_next_run_catches_up(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory(
        plan(
            {"kind": "latency", "ms": 30},
            {"kind": "refuse", "seconds": 15, "match": {"requests": [10]}},
        )
    )
    first = run(tmp_path / "one", sandbox.url, records(1, 30), max_retry_seconds=3)
    ledger = f"sqlite:///{tmp_path / 'one' / 'ledger.sqlite'}"
    assert first.returncode == 1, first.stderr[-3000:]
    assert first.dead_letters == [], (first.dead_letters, first.stderr[-6000:])
    fatal = [line for line in first.stderr.splitlines() if "fatal:" in line]
    assert len(fatal) == 1, fatal
    assert BEGAN in fatal[0]
    assert first.stderr.count(BEGAN) == 2  # the warning, then the fatal line
    delivered = {b["message_text"] for b in sandbox.accepted_bodies()}
    safe = bookmark(first) if first.states else 0
    assert safe < 30
    # The last STATE covers only records Catena has.
    assert {r["message_text"] for r in records(1, safe)} <= delivered
    # The tap resumes from that STATE: the records after it, and new ones.
    second = run(
        tmp_path / "two",
        sandbox.url,
        records(safe + 1, 40),
        max_retry_seconds=60,
        ledger_url=ledger,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.dead_letters == []
    sent_once(sandbox, records(1, 40))
    assert bookmark(second) == 40 - safe  # the tap's positions count its own records


def test_catena_unreachable_from_the_start_ends_quickly_with_few_requests(
    tmp_path: Path,
) -> None:
    url = closed_port()
    result = run(tmp_path, url, records(1, 20), max_retry_seconds=3)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.dead_letters == []
    assert result.states == []
    assert result.stderr.count(BEGAN) == 2  # one warning, one fatal line
    assert result.summary is not None
    http = result.summary["http"]
    assert http["token_requests"] <= 20, http  # was hundreds: every sender fetched on its own
    warnings = [
        line
        for line in result.stderr.splitlines()
        if "WARNING" in line and "pipeline.run" not in line  # the summary's own lines
    ]
    assert len(warnings) <= 8, warnings


def test_a_gateway_answering_503_is_an_outage_like_refused_connections(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    # Not the token endpoint: its own retries could outlast the window before anything is sent.
    sandbox = sandbox_factory(
        plan(
            *(
                {
                    "kind": "status",
                    "status": 503,
                    "endpoint": endpoint,
                    "match": {"after_seconds": 0, "for_seconds": 5},
                }
                for endpoint in ("messages", "operations")
            )
        )
    )
    recs = records(1, 20)
    result = run(tmp_path, sandbox.url, recs, max_retry_seconds=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.dead_letters == []
    sent_once(sandbox, recs)
    assert result.stderr.count(BEGAN) == 1, result.stderr[-3000:]
    assert result.stderr.count(ENDED) == 1


def test_a_poison_message_is_dead_lettered_retryable_without_an_outage(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory(
        plan({"kind": "status", "status": 503, "match": {"connection_id": CONN_B}})
    )
    recs = records(1, 30)
    recs[4] = {**recs[4], "connection_id": CONN_B}
    result = run(tmp_path, sandbox.url, recs, max_retry_seconds=60, max_retries=3)
    assert result.returncode == 2, result.stderr[-3000:]
    assert [(d["key"], d["stage"], d["retryable"]) for d in result.dead_letters] == [
        ("5", "api", True)
    ]
    sent_once(sandbox, recs[:4] + recs[5:])
    assert BEGAN not in result.stderr


def test_500s_and_429_storms_never_declare_an_outage(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(
        plan(
            {
                "kind": "status",
                "status": 429,
                "retry_after_seconds": 1,
                "match": {"from": 5, "to": 40},
            },
            {"kind": "status", "status": 500, "match": {"connection_id": CONN_B}},
        )
    )
    recs = records(1, 20)
    recs[2] = {**recs[2], "connection_id": CONN_B}
    result = run(tmp_path, sandbox.url, recs, max_retry_seconds=60)
    assert BEGAN not in result.stderr, result.stderr[-3000:]
    assert [d["key"] for d in result.dead_letters] == ["3"]
    sent_once(sandbox, recs[:2] + recs[3:])


def test_three_outage_exits_in_a_row_make_a_retryable_dead_letter(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    # Each run: the start-up probe passes, the POST gets a 503, and so does every probe after.
    down_after_preflight = plan(
        {"kind": "status", "status": 503, "endpoint": "messages"},
        {"kind": "status", "status": 503, "endpoint": "operations", "match": {"from": 2}},
    )
    recs = records(1, 1)
    ledger = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    dead = str(tmp_path / "dead-letters.jsonl")
    common: dict[str, Any] = {"max_retry_seconds": 1, "ledger_url": ledger}
    common["dead_letter_path"] = dead
    for n in (1, 2):
        down = sandbox_factory(down_after_preflight)
        result = run(tmp_path / str(n), down.url, recs, **common)
        assert result.returncode == 1, result.stderr[-3000:]
        assert result.dead_letters == [], result.stderr[-4000:]
        assert result.states == []
        assert down.accepted_bodies() == []
    down = sandbox_factory(down_after_preflight)
    third = run(tmp_path / "3", down.url, recs, **common)
    assert third.returncode == 1, third.stderr[-3000:]
    assert [(d["key"], d["stage"], d["retryable"]) for d in third.dead_letters] == [
        ("1", "api", True)
    ]
    assert "3 runs in a row" in third.dead_letters[0]["errors"][0]["message"]
    assert bookmark(third) == 1  # STATE moves on past it
    # Retryable: a later run that reads the record again sends it once Catena is back.
    sandbox = sandbox_factory({})
    again = run(tmp_path / "4", sandbox.url, recs, max_retry_seconds=60, ledger_url=ledger)
    assert again.returncode == 0, again.stderr[-3000:]
    sent_once(sandbox, recs)


def test_flapping_availability_loses_and_doubles_nothing(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory(
        plan(
            {"kind": "latency", "ms": 20},
            {"kind": "refuse", "seconds": 3, "match": {"requests": [8, 25, 45]}},
        )
    )
    recs = records(1, 60)
    result = run(tmp_path, sandbox.url, recs, max_retry_seconds=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.dead_letters == []
    sent_once(sandbox, recs)
    assert bookmark(result) == 60
