"""Every fault of the sandbox plan, end to end: nothing lost, nothing twice, order per driver kept.

Each test runs the real CLI against an in-process sandbox with a fault plan and then checks the
sandbox's truth: which bodies created an operation, in which order, how many requests were made.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.harness import TargetResult, run_target, sandbox_config, singer_lines

CONN_A = "11111111-1111-4111-8111-111111111111"
CONN_B = "22222222-2222-4222-8222-222222222222"
STREAM = "dispatch"
FAST = {"operation_lookup_lag_seconds": 0.5, "max_retry_seconds": 60}


def records(n: int, drivers: int = 6) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "connection_id": CONN_A if i % 2 else CONN_B,
            "source_recipient_ids": [f"driver-{i % drivers}"],
            "message_text": f"msg {i:04d} for driver-{i % drivers}",
        }
        for i in range(1, n + 1)
    ]


def run(tmp_path: Path, sandbox: Any, recs: list[dict[str, Any]], **settings: Any) -> TargetResult:
    lines = singer_lines(STREAM, recs, state_every=10)
    return run_target(tmp_path, sandbox_config(sandbox.url, **{**FAST, **settings}), lines)


def assert_exactly_once_in_order(sandbox: Any, recs: list[dict[str, Any]]) -> None:
    """Every record created exactly one operation, and each driver got its messages in order."""
    bodies = sandbox.accepted_bodies()
    counts = Counter(b["message_text"] for b in bodies)
    expected = {r["message_text"] for r in recs}
    assert set(counts) == expected, f"missing: {sorted(expected - set(counts))[:5]}"
    assert max(counts.values()) == 1, f"duplicated: {[t for t, c in counts.items() if c > 1]}"
    lanes: dict[tuple[str, str], list[str]] = defaultdict(list)
    for b in bodies:
        lanes[(b["connection_id"], json.dumps(b["source_recipient_ids"]))].append(b["message_text"])
    for texts in lanes.values():
        assert texts == sorted(texts), f"out of order for one driver: {texts}"


def plan(*rules: dict[str, Any], seed: int = 3, **extra: Any) -> dict[str, Any]:
    return {"faults": {"seed": seed, "rules": list(rules)}, **extra}


@pytest.mark.parametrize("retry_after", [1, None])
def test_429_storm_is_waited_out_without_counting_as_retries(
    tmp_path: Path, sandbox_factory: Any, retry_after: int | None
) -> None:
    rule: dict[str, Any] = {"kind": "status", "status": 429, "match": {"from": 5, "to": 14}}
    if retry_after:
        rule["retry_after_seconds"] = retry_after
    sandbox = sandbox_factory(plan(rule))
    recs = records(40)
    result = run(tmp_path, sandbox, recs, max_retries=0)
    assert result.returncode == 0, result.stderr
    assert_exactly_once_in_order(sandbox, recs)
    assert result.summary is not None
    assert result.summary["http"]["throttled"] >= 1


@pytest.mark.parametrize("status", [500, 502, 504])
def test_ambiguous_statuses_are_looked_up_before_any_resend(
    tmp_path: Path, sandbox_factory: Any, status: int
) -> None:
    # Half of them fail AFTER the message was stored: a blind resend would duplicate it.
    sandbox = sandbox_factory(
        plan(
            {"kind": "status", "status": status, "match": {"every": 7}},
            {
                "kind": "status",
                "status": status,
                "after_processing": True,
                "match": {"every": 5},
            },
        )
    )
    recs = records(60)
    result = run(tmp_path, sandbox, recs, max_ambiguous_resends=5)
    assert result.returncode == 0, result.stderr
    assert_exactly_once_in_order(sandbox, recs)
    assert result.summary is not None
    assert result.summary["http"]["ambiguous_sends"] >= 1


def test_503_and_refused_connections_are_retried_safely(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory(
        plan(
            {"kind": "status", "status": 503, "match": {"every": 4}},
            {"kind": "refuse", "seconds": 1.0, "match": {"requests": [20]}},
        )
    )
    recs = records(50)
    result = run(tmp_path, sandbox, recs)
    assert result.returncode == 0, result.stderr
    assert_exactly_once_in_order(sandbox, recs)


def test_resets_and_accept_then_drop_end_exactly_once(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(
        plan(
            {"kind": "reset", "match": {"every": 9}},
            {"kind": "drop", "match": {"every": 11}},
        )
    )
    recs = records(80)
    result = run(tmp_path, sandbox, recs, max_ambiguous_resends=5)
    assert result.returncode == 0, result.stderr
    assert_exactly_once_in_order(sandbox, recs)
    # The dropped ones were adopted: their operation ids in STATE are the stored operations.
    state_ops = {op for _, _, op in result.operations()}
    assert state_ops == {op["id"] for op in sandbox.operations()}


def test_latency_past_the_request_timeout_is_ambiguous_and_resolved(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory(plan({"kind": "latency", "ms": 2500, "match": {"requests": [3, 8]}}))
    recs = records(12)
    result = run(tmp_path, sandbox, recs, request_timeout_seconds=1, max_ambiguous_resends=5)
    assert result.returncode == 0, result.stderr
    assert_exactly_once_in_order(sandbox, recs)


def test_non_json_error_bodies(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(
        plan({"kind": "status", "status": 502, "non_json": True, "match": {"every": 6}})
    )
    recs = records(30)
    result = run(tmp_path, sandbox, recs, max_ambiguous_resends=5)
    assert result.returncode == 0, result.stderr
    assert_exactly_once_in_order(sandbox, recs)


def test_revoked_tokens_mid_run_refresh_once_and_go_on(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    # One revocation: every thread holding the old token gets a 401, one refresh serves them all.
    # (A second revocation while a retry is on the wire is a repeated 401: a rejection, by the
    # retry rules.)
    sandbox = sandbox_factory(plan({"kind": "revoke_tokens", "match": {"requests": [10]}}))
    recs = records(40)
    result = run(tmp_path, sandbox, recs)
    assert result.returncode == 0, result.stderr
    assert_exactly_once_in_order(sandbox, recs)
    assert sandbox.stats()["token_requests"] == 2


def test_short_lived_tokens_are_reused_not_fetched_per_message(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory({"token_lifetime_seconds": 5})
    recs = records(200)
    result = run(tmp_path, sandbox, recs)
    assert result.returncode == 0, result.stderr
    assert sandbox.stats()["token_requests"] <= 3


def test_slow_and_failing_token_endpoint(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(
        plan(
            {"kind": "latency", "endpoint": "token", "ms": 300},
            {"kind": "status", "endpoint": "token", "status": 503, "match": {"requests": [1, 2]}},
        )
    )
    recs = records(10)
    result = run(tmp_path, sandbox, recs)
    assert result.returncode == 0, result.stderr
    assert_exactly_once_in_order(sandbox, recs)


def test_401_forever_is_fatal_with_safe_state(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(plan({"kind": "revoke_tokens", "match": {"from": 16}}))
    recs = [dict(r, connection_id=CONN_A) for r in records(40, drivers=1)]  # one lane: in order
    result = run(tmp_path, sandbox, recs, max_consecutive_rejections=3, max_concurrency=1)
    assert result.returncode == 1, result.stderr
    # A 401 with a fresh token is refused credentials: fatal at once, not one rejection each.
    assert "answered 401 Unauthorized" in result.stderr
    assert "max_consecutive_rejections" not in result.stderr
    assert "Traceback" not in result.stderr
    assert result.dead_letters == []
    assert result.summary is not None
    assert result.summary["fatal"] == "configuration"
    delivered = {b["message_text"] for b in sandbox.accepted_bodies()}
    assert len(delivered) == 15
    # The safe STATE: the newest tap state whose records all resolved (records 1-10).
    assert result.last_state is not None
    assert result.last_state["bookmarks"][STREAM]["replication_key_value"] == 10


def test_403_on_one_connection_dead_letters_it_and_the_rest_flow(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    # Once a message of the run was accepted, a 403 is about its connection, not the settings
    # (before that it would end the run): one sender, and the first record is CONN_A's.
    sandbox = sandbox_factory(plan({"kind": "forbid", "match": {"connection_id": CONN_B}}))
    recs = records(20)
    result = run(tmp_path, sandbox, recs, max_concurrency=1)
    assert result.returncode == 2, result.stderr
    delivered = {b["message_text"] for b in sandbox.accepted_bodies()}
    assert delivered == {r["message_text"] for r in recs if r["connection_id"] == CONN_A}
    assert {d["status"] for d in result.dead_letters} == {403}
    assert {d["stage"] for d in result.dead_letters} == {"api"}
    assert len(result.dead_letters) == 10


def test_poison_pill_is_dead_lettered_as_retryable_while_the_rest_flow(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    # The only message on CONN_B fails every time it is tried; the others must not wait for it.
    sandbox = sandbox_factory(
        plan({"kind": "status", "status": 503, "match": {"connection_id": CONN_B}})
    )
    recs = [dict(r, connection_id=CONN_A) for r in records(12, drivers=12)]
    recs[3]["connection_id"] = CONN_B
    result = run(tmp_path, sandbox, recs, max_retries=2)
    assert result.returncode == 2, result.stderr
    [dead] = result.dead_letters
    assert dead["key"] == "4"
    assert dead["retryable"] is True
    assert dead["stage"] == "api"
    assert dead["status"] == 503
    assert dead["attempts"] == 3
    assert len(sandbox.accepted_bodies()) == 11


def test_a_lane_in_backoff_gives_up_the_only_slot(tmp_path: Path, sandbox_factory: Any) -> None:
    # One slot: while the failing message waits out its backoffs, another worker sends the rest,
    # so their requests arrive between its attempts, not all after them.
    sandbox = sandbox_factory(
        plan({"kind": "status", "status": 503, "match": {"connection_id": CONN_B}})
    )
    recs = [dict(r, connection_id=CONN_A) for r in records(12, drivers=12)]
    recs[0]["connection_id"] = CONN_B
    result = run(tmp_path, sandbox, recs, max_retries=3, max_concurrency=1)
    assert result.returncode == 2, result.stderr
    statuses = [entry["status"] for entry in sandbox.received()]
    assert statuses.count(503) == 4
    assert statuses.count(202) == 11
    last_attempt = max(i for i, status in enumerate(statuses) if status == 503)
    assert 202 in statuses[:last_attempt], statuses
    assert sandbox.stats()["peak_in_flight"] == 1


def test_rejections_in_a_row_stop_the_run(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(
        plan({"kind": "status", "status": 400, "match": {"connection_id": CONN_A}})
    )
    recs = records(30)
    result = run(tmp_path, sandbox, recs, max_consecutive_rejections=4, max_concurrency=2)
    assert result.returncode == 1
    assert "4 rejections in a row with status 400" in result.stderr


def test_cap_holds_with_two_streams_draining(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(plan({"kind": "latency", "ms": 20, "jitter_ms": 10}))
    a = [dict(r, message_text="a " + r["message_text"]) for r in records(120, drivers=60)]
    b = [dict(r, message_text="b " + r["message_text"]) for r in records(120, drivers=60)]
    lines = singer_lines("stream_a", a, state_every=40) + singer_lines(
        "stream_b", b, state_every=40
    )
    config = sandbox_config(sandbox.url, max_concurrency=5, batch_size_rows=50, **FAST)
    result = run_target(tmp_path, config, lines)
    assert result.returncode == 0, result.stderr
    assert len(sandbox.accepted_bodies()) == 240
    assert 2 <= sandbox.stats()["peak_in_flight"] <= 5


def test_order_per_driver_holds_under_mixed_faults(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(
        plan(
            {"kind": "latency", "ms": 5, "jitter_ms": 15},
            {"kind": "status", "status": 429, "retry_after_seconds": 1, "match": {"every": 17}},
            {"kind": "status", "status": 503, "match": {"probability": 0.08}},
            {"kind": "drop", "match": {"probability": 0.04}},
            seed=11,
        )
    )
    recs = records(150, drivers=4)
    result = run(tmp_path, sandbox, recs, max_ambiguous_resends=5, max_concurrency=8)
    assert result.returncode == 0, result.stderr
    assert_exactly_once_in_order(sandbox, recs)


def test_lanes_share_the_slots_fairly(tmp_path: Path, sandbox_factory: Any) -> None:
    # 6 drivers, 3 slots: a lane that just finished a request must queue behind the others,
    # or three drivers get all the slots and STATE stalls behind the other three.
    sandbox = sandbox_factory(plan({"kind": "latency", "ms": 30}))
    recs = [dict(r, connection_id=CONN_A) for r in records(120, drivers=6)]
    result = run(tmp_path, sandbox, recs, max_concurrency=3, batch_size_rows=20)
    assert result.returncode == 0, result.stderr
    first = [b["source_recipient_ids"][0] for b in sandbox.accepted_bodies()[:18]]
    assert len(set(first)) == 6, first
