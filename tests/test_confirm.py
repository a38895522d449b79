"""Confirmation against the sandbox's operation schedule: success, failed, timeout, 429, limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.catena.client import Accepted, CatenaClient, Failure
from target_catena_messages.dead_letters import DeadLetterWriter, read_dead_letters
from target_catena_messages.ledger import ConfirmedStatus
from target_catena_messages.ops.confirm import (
    Confirmation,
    Pending,
    confirm_operations,
    dead_letter_fields,
    ledger_updates,
    summary_counts,
)
from target_catena_messages.pipeline.report import confirmation_lines
from tests.harness import run_target, sandbox_client, sandbox_config, singer_lines

CONN_A = "11111111-1111-4111-8111-111111111111"
CONN_B = "22222222-2222-4222-8222-222222222222"
STREAM = "public-dispatch_messages"


class CountingClient(CatenaClient):
    """The real client, counting GETs in flight (instrumentation, not a mock: HTTP is real)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.calls = 0
        self.answers: list[tuple[str, object]] = []  # (operation id, status), in answer order
        self.on_call: Callable[[int], None] = lambda calls: None

    def get_operation(self, connection_id: str, operation_id: str) -> dict[str, Any] | Failure:
        with self._lock:
            self.in_flight += 1
            self.calls += 1
            self.peak = max(self.peak, self.in_flight)
            calls = self.calls
        self.on_call(calls)
        answer: dict[str, Any] | Failure | None = None
        try:
            answer = super().get_operation(connection_id, operation_id)
            return answer
        finally:
            with self._lock:
                self.in_flight -= 1
                status = answer.get("status") if isinstance(answer, dict) else None
                self.answers.append((operation_id, status))


def make_client(sandbox: Any) -> CountingClient:
    return sandbox_client(sandbox.url, CountingClient, pool=16)


def queue_messages(client: CatenaClient, n: int) -> list[Pending]:
    """POST n real messages (every other one to CONN_B) and return them as pending items."""
    items = []
    for i in range(n):
        conn = CONN_B if i % 2 else CONN_A
        body = {
            "connection_id": conn,
            "source_sender_id": "dispatcher-7",
            "source_recipient_ids": [f"driver-{i}"],
            "message_text": f"Load {i}",
        }
        result = client.create_message(body)
        assert isinstance(result, Accepted), result
        record = {**body, "id": i}
        items.append(Pending(STREAM, str(i), STREAM, conn, result.operation_id, record, 1))
    return items


@pytest.fixture
def scheduled(sandbox_factory: Any) -> Any:
    """Operations settle 0.4 s after creation; CONN_B's fail with a TSP error."""
    return sandbox_factory(
        {
            "operations": {
                "complete_after_seconds": 0.4,
                "fail": {"connection_id": CONN_B},
                "error_type": "tsp",
                "error_details": "Driver device unreachable at TSP",
            }
        }
    )


def by_op(sandbox: Any) -> dict[str, dict[str, Any]]:
    return {op["id"]: op for op in sandbox.operations()}


def test_success_and_failed_match_the_sandbox_and_failed_carry_catena_logs(
    scheduled: Any,
) -> None:
    client = make_client(scheduled)
    items = queue_messages(client, 6)
    results = confirm_operations(
        client, items, timeout_seconds=600, max_concurrency=4, poll_every=0.2
    )
    # Done when settled, not at the timeout: an operation is never asked again once final.
    for item in items:
        statuses = [status for op, status in client.answers if op == item.operation_id]
        assert statuses[-1] in ("success", "failed")
        assert all(status not in ("success", "failed") for status in statuses[:-1])
    assert [c.pending for c in results] == items  # input order
    truth = by_op(scheduled)
    for c in results:
        op = truth[c.pending.operation_id]
        assert c.status == op["status"]
        assert c.logs == op["logs"]
    failed = [c for c in results if c.status == "failed"]
    assert {c.pending.connection_id for c in failed} == {CONN_B}
    assert len(failed) == 3
    assert all(c.error_type == "tsp" for c in failed)
    assert all(c.error_details == "Driver device unreachable at TSP" for c in failed)
    assert all(c.error_type is None for c in results if c.status == "success")


def test_timeout_leaves_unsettled_operations_pending_and_stops_on_time(sandbox: Any) -> None:
    client = make_client(sandbox)  # default sandbox: operations stay pending until told
    items = queue_messages(client, 3)
    sandbox.complete_operations(status="success", ids=[items[0].operation_id])
    started = time.monotonic()
    results = confirm_operations(
        client, items, timeout_seconds=0.8, max_concurrency=2, poll_every=0.1
    )
    elapsed = time.monotonic() - started
    assert elapsed >= 0.7
    assert [c.status for c in results] == ["success", "pending", "pending"]
    assert results[1].error_details is None  # pending, not "could not be checked"
    assert client.calls > 3  # the pending ones were asked again, round after round
    # ...and polling stopped at the timeout: waits of 0.1, 0.15, 0.225 s then the rest of 0.8 s
    # leave room for at most five rounds (a slower machine only fits fewer).
    assert client.calls <= 3 + 2 * 4


def test_zero_timeout_asks_every_operation_exactly_once(sandbox: Any) -> None:
    client = make_client(sandbox)
    items = queue_messages(client, 4)
    results = confirm_operations(client, items, timeout_seconds=0, max_concurrency=8)
    assert [c.status for c in results] == ["pending"] * 4
    assert client.calls == 4


def test_operations_settling_during_polling_are_picked_up(sandbox: Any) -> None:
    client = make_client(sandbox)
    items = queue_messages(client, 4)
    ids = [p.operation_id for p in items]

    def settle_later() -> None:
        time.sleep(0.3)
        sandbox.complete_operations(status="success", ids=ids[:2])
        sandbox.complete_operations(status="failed", ids=ids[2:], error_details="TSP said no")

    worker = threading.Thread(target=settle_later)
    worker.start()
    results = confirm_operations(
        client, items, timeout_seconds=5, max_concurrency=2, poll_every=0.1
    )
    worker.join()
    assert [c.status for c in results] == ["success", "success", "failed", "failed"]
    assert results[2].error_details == "TSP said no"


def test_429_pauses_polling_for_retry_after_and_still_confirms(sandbox_factory: Any) -> None:
    box = sandbox_factory(
        {
            "operations": {"complete_after_seconds": 0},
            "faults": {
                "rules": [
                    {
                        "kind": "status",
                        "endpoint": "operations",
                        "status": 429,
                        "retry_after_seconds": 1,
                        "match": {"requests": [1]},
                    }
                ]
            },
        }
    )
    client = make_client(box)
    items = queue_messages(client, 4)
    started = time.monotonic()
    results = confirm_operations(
        client, items, timeout_seconds=10, max_concurrency=1, poll_every=0.05
    )
    elapsed = time.monotonic() - started
    assert [c.status for c in results] == ["success"] * 4
    assert box.stats()["status_counts"]["operations"]["429"] == 1
    assert elapsed >= 0.95  # everybody waited the announced second, not just the poll interval


def test_concurrency_is_bounded(sandbox_factory: Any) -> None:
    box = sandbox_factory(
        {
            "operations": {"complete_after_seconds": 0},
            "faults": {"rules": [{"kind": "latency", "endpoint": "operations", "ms": 60}]},
        }
    )
    client = make_client(box)
    items = queue_messages(client, 12)
    results = confirm_operations(client, items, timeout_seconds=10, max_concurrency=3)
    assert all(c.status == "success" for c in results)
    assert client.peak == 3


def test_unknown_operation_is_not_polled_again_and_says_why(sandbox: Any) -> None:
    client = make_client(sandbox)
    items = queue_messages(client, 1)
    ghost = Pending(STREAM, "ghost", STREAM, CONN_A, "3c90c3cc-0d44-4b50-8888-8dd25736052a", {})
    results = confirm_operations(
        client, [ghost, *items], timeout_seconds=0.5, max_concurrency=2, poll_every=0.1
    )
    assert results[0].status == "pending"
    assert results[0].error_details is not None
    assert "could not be checked" in results[0].error_details
    assert "404" in results[0].error_details
    assert client.calls >= 3  # the real one was asked again round after round
    assert sandbox.stats()["status_counts"]["operations"]["404"] == 1  # the ghost only once


def test_stop_ends_polling_early(sandbox: Any) -> None:
    client = make_client(sandbox)
    items = queue_messages(client, 2)
    stop = threading.Event()
    client.on_call = lambda calls: stop.set() if calls == 3 else None  # during the second round
    results = confirm_operations(
        client, items, timeout_seconds=600, max_concurrency=2, poll_every=0.1, stop=stop
    )
    assert client.calls <= 4  # the round in progress ends; no further round starts
    assert [c.status for c in results] == ["pending", "pending"]


def test_unreachable_api_leaves_pending_with_the_reason(tmp_path: Path, sandbox: Any) -> None:
    client = make_client(sandbox)
    items = queue_messages(client, 1)
    sandbox.stop()
    results = confirm_operations(
        client, items, timeout_seconds=0.3, max_concurrency=1, poll_every=0.1
    )
    assert results[0].status == "pending"
    assert results[0].error_details is not None
    assert results[0].error_details.startswith("could not be checked: ")


# -- the mappings the run uses ------------------------------------------------------------------


def _failed(**overrides: Any) -> Confirmation:
    pending = Pending("ns", "7", STREAM, CONN_A, "op-7", {"id": 7, "message_text": "hi"}, 2)
    logs = [{"status": "failed", "error_type": "tsp", "error_details": "no device"}]
    fields: dict[str, Any] = {
        "error_type": "tsp",
        "error_details": "no device",
        "logs": logs,
        **overrides,
    }
    return Confirmation(pending, "failed", **fields)


def test_dead_letter_fields_write_a_contract_dead_letter(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    with DeadLetterWriter(path, "run-1") as writer:
        writer.write(**dead_letter_fields(_failed()))
    [letter] = list(read_dead_letters(path))
    assert letter["stage"] == "confirmation"
    assert letter["stream"] == STREAM
    assert letter["key"] == "7"
    assert letter["status"] is None
    assert letter["operation_id"] == "op-7"
    assert letter["attempts"] == 2
    assert letter["errors"] == [{"field": None, "message": "tsp: no device"}]
    assert letter["api_error"] == {
        "logs": [{"status": "failed", "error_type": "tsp", "error_details": "no device"}]
    }
    assert letter["record"] == {"id": 7, "message_text": "hi"}
    assert letter["retryable"] is False


def test_network_failures_are_retryable_dead_letters() -> None:
    assert dead_letter_fields(_failed(error_type="network"))["retryable"] is True
    throttled = _failed(
        logs=[{"status": "failed", "error_type": "tsp", "response_status_code": 503}]
    )
    assert dead_letter_fields(throttled)["retryable"] is True


def test_only_failed_confirmations_are_dead_letters() -> None:
    pending = _failed()
    ok = Confirmation(pending.pending, "success")
    with pytest.raises(ValueError, match="only failed"):
        dead_letter_fields(ok)


def test_ledger_updates_and_summary_counts() -> None:
    p = _failed().pending
    other = Pending("ns", "8", "other", CONN_A, "op-8", {})
    results = [_failed(), Confirmation(other, "success"), Confirmation(other, "pending")]
    assert ledger_updates([*results[:2], _failed(error_type="network")]) == [
        ConfirmedStatus("ns", "7", "op-7", "failed"),
        ConfirmedStatus("ns", "8", "op-8", "success"),
        ConfirmedStatus("ns", "7", "op-7", "failed", retryable=True),
    ]
    counts = summary_counts(results)
    assert counts == {
        "confirmed": 1,
        "failed": 1,
        "pending": 1,
        "streams": {
            p.stream: {"confirmed": 0, "failed": 1, "pending": 0},
            "other": {"confirmed": 1, "failed": 0, "pending": 1},
        },
    }
    lines = confirmation_lines(counts)
    assert [line.split()[-1] for line in lines] == ["1", "1", "1"]
    assert len({len(line) for line in lines}) == 1  # numbers line up


# -- the run, once the lead has integrated it --------------------------------------------------


def test_confirm_end_to_end(tmp_path: Path, scheduled: Any) -> None:
    records = [
        {
            "id": i,
            "connection_id": CONN_B if i % 3 == 0 else CONN_A,
            "source_sender_id": "dispatcher-7",
            "source_recipient_ids": [f"driver-{i}"],
            "message_text": f"Load {i}",
        }
        for i in range(1, 10)
    ]
    result = run_target(
        tmp_path,
        sandbox_config(
            scheduled.url,
            confirm_operations=True,
            confirm_timeout_seconds=20,
            allow_dead_letters=True,
        ),
        singer_lines(STREAM, records, state_every=9),
    )
    assert result.returncode == 0, result.stderr
    truth = by_op(scheduled)
    failed_ops = {i for i, op in truth.items() if op["status"] == "failed"}
    assert len(failed_ops) == 3
    letters = [d for d in result.dead_letters if d["stage"] == "confirmation"]
    assert {d["operation_id"] for d in letters} == failed_ops
    assert {d["key"] for d in letters} == {"3", "6", "9"}
    assert all(d["errors"][0]["message"].startswith("tsp: ") for d in letters)
    assert all(d["api_error"]["logs"] for d in letters)
    assert result.summary is not None
    assert result.summary["confirmation"]["confirmed"] == 6
    assert result.summary["confirmation"]["failed"] == 3
    assert result.summary["confirmation"]["pending"] == 0
