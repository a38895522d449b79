"""The ledger report: its ledger queries, and its CLI on a ledger the real target filled."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.ledger import (
    ClaimRequest,
    ConfirmedStatus,
    Decision,
    Ledger,
    LedgerOutcome,
    LedgerReadOnlyError,
)
from target_catena_messages.ops import ledger_report
from target_catena_messages.ops.report_query import (
    Filters,
    build_report,
    category,
    count_table,
    parse_time,
)
from target_catena_messages.ops.report_render import render_text
from tests.harness import run_target, sandbox_config, singer_lines
from tests.pg import fresh_schema_url

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
NS = "dispatch"
FP1 = hashlib.sha256(b"one").hexdigest()
FP2 = hashlib.sha256(b"two").hexdigest()
CONN_A = "11111111-1111-4111-8111-111111111111"
CONN_B = "22222222-2222-4222-8222-222222222222"
STREAM = "public-dispatch_messages"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/ledger.sqlite"
    else:
        url = fresh_schema_url(request.getfixturevalue("pg_url"))
    with Ledger.open(url, run_id="run-1", lease_seconds=60) as opened:
        yield opened


def accepted(key: str, op: str, ns: str = NS) -> LedgerOutcome:
    return LedgerOutcome(ns, key, "accepted", FP1, operation_id=op, attempts=1, connection_id="c")


def dead(key: str, stage: str, ns: str = NS) -> LedgerOutcome:
    return LedgerOutcome(ns, key, "dead_lettered", FP1, stage=stage, attempts=1)


# -- ledger additions ---------------------------------------------------------------------------


def test_record_confirmations_stores_status_and_dead_letters_failed_ones(ledger: Ledger) -> None:
    ledger.record([accepted(k, f"op-{k}") for k in "abcdf"] + [dead("e", "api")], now=at(0))
    changed = ledger.record_confirmations(
        [
            ConfirmedStatus(NS, "a", "op-a", "success"),
            ConfirmedStatus(NS, "b", "op-b", "pending"),
            ConfirmedStatus(NS, "c", "op-c", "failed"),
            ConfirmedStatus(NS, "d", "op-OTHER", "failed"),  # sent again meanwhile: left alone
            ConfirmedStatus(NS, "e", "op-e", "success"),  # not accepted: left alone
            ConfirmedStatus(NS, "zz", "op-zz", "success"),  # unknown key
            ConfirmedStatus(NS, "f", "op-f", "failed", retryable=True),
        ],
        now=at(5),
    )
    assert changed == 4
    rows = ledger.get_many([(NS, k) for k in "abcde"])
    assert rows[(NS, "a")]["confirmed_status"] == "success"
    assert rows[(NS, "a")]["status"] == "accepted"
    assert rows[(NS, "a")]["updated_at"] == at(5)
    assert rows[(NS, "b")]["confirmed_status"] == "pending"
    c = rows[(NS, "c")]
    assert (c["status"], c["stage"], c["confirmed_status"], c["operation_id"]) == (
        "dead_lettered",
        "confirmation",
        "failed",
        "op-c",
    )
    assert rows[(NS, "d")]["status"] == "accepted"
    assert rows[(NS, "d")]["confirmed_status"] is None
    assert rows[(NS, "e")]["confirmed_status"] is None
    # The failed key behaves like any dead letter: same body held back, a changed one sent.
    results = ledger.claim([ClaimRequest(NS, "c", FP1, "c")], now=at(6))
    assert results[0].decision is Decision.PREVIOUSLY_DEAD_LETTERED
    assert results[0].stage == "confirmation"
    assert ledger.claim([ClaimRequest(NS, "c", FP2, "c")], now=at(7))[0].decision is Decision.SEND
    # A retryable failure (network, provider 5xx) goes out again with the very same body.
    assert ledger.claim([ClaimRequest(NS, "f", FP1, "c")], now=at(8))[0].decision is Decision.SEND


def test_pending_can_become_success_later(ledger: Ledger) -> None:
    ledger.record([accepted("a", "op-a")], now=at(0))
    ledger.record_confirmations([ConfirmedStatus(NS, "a", "op-a", "pending")], now=at(1))
    ledger.record_confirmations([ConfirmedStatus(NS, "a", "op-a", "success")], now=at(2))
    row = ledger.get(NS, "a")
    assert row is not None
    assert row["confirmed_status"] == "success"


def test_confirmations_are_refused_on_a_read_only_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/l.sqlite"
    with Ledger.open(url, run_id="w") as writable:
        writable.record([accepted("a", "op-a")])
    with (
        Ledger.open(url, run_id="r", read_only=True) as read_only,
        pytest.raises(LedgerReadOnlyError),
    ):
        read_only.record_confirmations([ConfirmedStatus(NS, "a", "op-a", "success")])
    with pytest.raises(ValueError, match="unknown confirmed status"):
        ConfirmedStatus(NS, "a", "op-a", "delivered")  # type: ignore[arg-type]


def test_status_counts_group_by_story_and_filter_by_time(ledger: Ledger) -> None:
    ledger.record(
        [accepted("a", "op-a"), accepted("b", "op-b"), dead("c", "validation")], now=at(0)
    )
    ledger.record([dead("d", "ambiguous"), accepted("x", "op-x", ns="other")], now=at(100))
    ledger.claim([ClaimRequest(NS, "live", FP1, "c")], now=at(100))  # lease runs to at(160)
    ledger.claim([ClaimRequest(NS, "stale", FP1, "c")], now=at(0))  # lease ran out at(60)
    ledger.record_confirmations([ConfirmedStatus(NS, "b", "op-b", "success")], now=at(100))

    table = count_table(ledger.status_counts(now=at(110)))
    assert table[NS] == {
        "total": 6,
        "confirmed": 1,
        "accepted": 1,
        "pending": 0,
        "dead_lettered": 1,
        "ambiguous": 2,  # the dead-lettered ambiguous one and the claim whose lease ran out
        "in_progress": 1,
        "dead_lettered_by_stage": {"validation": 1},
    }
    assert table["other"]["accepted"] == 1
    later = count_table(ledger.status_counts(since=at(50), now=at(110)))
    assert later[NS]["total"] == 3  # d, live, b (updated at 100); not a, c, stale
    assert count_table(ledger.status_counts(until=at(50), now=at(110)))[NS]["total"] == 3
    assert list(count_table(ledger.status_counts(namespace="other", now=at(110)))) == ["other"]


def test_report_rows_leave_out_settled_keys_unless_asked_and_page(ledger: Ledger) -> None:
    ledger.record([accepted(f"k{i:04d}", f"op-{i}") for i in range(1100)], now=at(0))
    ledger.record([dead("zz", "api")], now=at(0))
    ledger.record_confirmations([ConfirmedStatus(NS, "k0001", "op-1", "pending")], now=at(1))
    assert [r["key"] for r in ledger.report_rows()] == ["k0001", "zz"]
    everything = [r["key"] for r in ledger.report_rows(settled=True)]
    assert len(everything) == 1101
    assert everything == sorted(everything)


def test_report_lists_every_status_with_reasons(ledger: Ledger) -> None:
    ledger.record(
        [accepted("a", "op-a"), dead("c", "validation"), dead("d", "ambiguous")], now=at(0)
    )
    ledger.claim([ClaimRequest(NS, "live", FP1, "c")], now=at(100))
    letters = {(NS, "c"): {"reason": "connection_id: is required", "stage": "validation"}}
    report = build_report(
        ledger, Filters(), letters=letters, redrives=[], namespace=None, now=at(110)
    )
    by_key = {m["key"]: m for m in report["messages"]}
    assert set(by_key) == {"c", "d", "live"}  # "a" is settled: not listed by default
    assert by_key["c"]["reason"] == "connection_id: is required"
    assert by_key["d"]["status"] == "ambiguous"
    assert by_key["live"]["status"] == "in_progress"
    assert "run-1" in by_key["live"]["reason"]
    everything = build_report(
        ledger,
        Filters(statuses=("accepted",)),
        letters={},
        redrives=[],
        namespace=None,
        now=at(110),
    )
    assert [m["key"] for m in everything["messages"]] == ["a"]


def test_a_claim_left_unsent_by_an_outage_exit_is_not_called_ambiguous(ledger: Ledger) -> None:
    """Never sent, lease ended: the next run sends it without a lookup."""
    ledger.claim([ClaimRequest(NS, "unsent", FP1, "c")], now=at(0))
    ledger.note_outage_exit([(NS, "unsent")])
    report = build_report(
        ledger, Filters(), letters={}, redrives=[], namespace=None, now=at(10_000)
    )
    (row,) = report["messages"]
    assert row["status"] == "in_progress"
    assert "Catena was unavailable" in row["reason"]
    counts = {g["namespace"]: g for g in ledger.status_counts(now=at(10_000))}
    assert counts[NS]["live"] == 1


def test_category_is_total_and_exclusive() -> None:
    assert category("accepted", None, None, False) == "accepted"
    assert category("accepted", None, "success", False) == "confirmed"
    assert category("accepted", None, "pending", False) == "pending"
    assert category("dead_lettered", "confirmation", "failed", False) == "dead_lettered"
    assert category("dead_lettered", "ambiguous", None, False) == "ambiguous"
    assert category("claimed", None, None, True) == "in_progress"
    assert category("claimed", None, None, False) == "ambiguous"


def test_parse_time_reads_dates_offsets_and_z() -> None:
    assert parse_time("2030-01-01") == T0
    assert parse_time("2030-01-01T00:00:00Z") == T0
    assert parse_time("2030-01-01T01:00:00+01:00") == T0
    assert parse_time("2030-01-01T00:00:00") == T0


# -- the CLI against a ledger the real target filled -------------------------------------------


def ledger_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "target_catena_messages.ops.ledger_report", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


@pytest.fixture
def report_json(capsys: pytest.CaptureFixture[str]) -> Callable[..., dict[str, Any]]:
    """The CLI's main() in this process (fast); ``ledger_cli`` covers the console entry."""

    def run(*args: str) -> dict[str, Any]:
        capsys.readouterr()
        code = ledger_report.main([*args, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        result: dict[str, Any] = json.loads(out)
        return result

    return run


def records(n: int, invalid: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {
            "id": i,
            "connection_id": CONN_B if i % 3 == 0 else CONN_A,
            "source_sender_id": "dispatcher-7",
            "source_recipient_ids": [f"driver-{i % 4}"],
            "message_text": f"Load {i}",
        }
        for i in range(1, n + 1)
    ]
    out += [
        {"id": 100 + i, "fleet_ref": "unknown-fleet", "message_text": f"Orphan {i}"}
        for i in range(invalid)
    ]
    return out


@pytest.fixture
def filled(tmp_path: Path, sandbox_factory: Any) -> Callable[..., tuple[Any, Path]]:
    """Run the real target once against a sandbox; return the sandbox and the config file."""

    def fill(operations: dict[str, Any], n: int = 9, invalid: int = 2) -> tuple[Any, Path]:
        box = sandbox_factory({"operations": operations})
        result = run_target(
            tmp_path,
            sandbox_config(box.url, allow_dead_letters=True),
            singer_lines(STREAM, records(n, invalid), state_every=5),
        )
        assert result.returncode == 0, result.stderr
        return box, tmp_path / "config.json"

    return fill


def test_report_counts_equal_the_sandbox_truth_after_refresh(
    filled: Callable[..., tuple[Any, Path]], report_json: Callable[..., dict[str, Any]]
) -> None:
    box, config = filled(
        {
            "complete_after_seconds": 0,
            "fail": {"connection_id": CONN_B},
            "error_details": "Driver device unreachable",
        }
    )
    before = report_json("--config", str(config))
    truth = Counter(op["status"] for op in box.operations())
    assert before["totals"]["accepted"] == len(box.operations()) == 9
    assert before["totals"]["confirmed"] == 0
    assert before["totals"]["dead_lettered_by_stage"] == {"validation": 2}

    after = report_json("--config", str(config), "--refresh")
    assert after["refresh"]["asked"] == 9
    totals = after["totals"]
    assert totals["total"] == 11
    assert totals["confirmed"] == truth["success"] == 6
    assert totals["dead_lettered_by_stage"] == {"validation": 2, "confirmation": truth["failed"]}
    assert totals["accepted"] == totals["pending"] == totals["ambiguous"] == 0
    failed_ops = {op["id"] for op in box.operations() if op["status"] == "failed"}
    listed = {m["operation_id"]: m for m in after["messages"] if m["stage"] == "confirmation"}
    assert set(listed) == failed_ops
    assert all(m["reason"] == "tsp: Driver device unreachable" for m in listed.values())
    invalid = [m for m in after["messages"] if m["stage"] == "validation"]
    assert len(invalid) == 2
    assert all("connection_id" in m["reason"] for m in invalid)  # joined from the dead letters
    # Recorded: a later report without --refresh tells the same, and asks nothing more.
    gets = box.stats()["requests"].get("operations", 0)
    again = report_json("--config", str(config), "--refresh")
    assert again["totals"] == totals
    assert again["refresh"]["asked"] == 0
    assert box.stats()["requests"].get("operations", 0) == gets


def test_pending_operations_are_listed_with_their_operation_ids(
    filled: Callable[..., tuple[Any, Path]], report_json: Callable[..., dict[str, Any]]
) -> None:
    box, config = filled({}, n=4, invalid=0)  # operations stay pending
    report = report_json("--config", str(config), "--refresh")
    assert report["totals"]["pending"] == 4
    assert {m["operation_id"] for m in report["messages"]} == {op["id"] for op in box.operations()}
    assert {m["status"] for m in report["messages"]} == {"pending"}
    box.complete_operations(status="success")
    report = report_json("--config", str(config), "--refresh")
    assert report["totals"]["confirmed"] == 4
    assert report["messages"] == []


def test_filters_by_stream_status_and_time(
    filled: Callable[..., tuple[Any, Path]], report_json: Callable[..., dict[str, Any]]
) -> None:
    _, config = filled({"complete_after_seconds": 0})
    cfg = ("--config", str(config))
    assert report_json(*cfg, "--stream", "nope")["counts"] == {}
    assert report_json(*cfg, "--stream", STREAM)["totals"]["total"] == 11
    only_accepted = report_json(*cfg, "--status", "accepted")
    assert {m["status"] for m in only_accepted["messages"]} == {"accepted"}
    assert only_accepted["messages_total"] == 9
    assert len(report_json(*cfg, "--status", "all")["messages"]) == 11
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    assert report_json(*cfg, "--since", future)["totals"]["total"] == 0
    assert report_json(*cfg, "--until", "2000-01-01")["totals"]["total"] == 0
    assert report_json(*cfg, "--since", "2000-01-01")["totals"]["total"] == 11


def test_text_report_is_aligned_and_names_the_ledger(
    tmp_path: Path, filled: Callable[..., tuple[Any, Path]]
) -> None:
    _, config = filled({"complete_after_seconds": 0})
    proc = ledger_cli("--config", str(config), "--refresh", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"Ledger {tmp_path / 'ledger.sqlite'}")
    header = next(i for i, line in enumerate(lines) if line.startswith("stream "))
    assert lines[header].split() == [
        "stream",
        "total",
        "confirmed",
        "accepted",
        "pending",
        "dead-lettered",
        "ambiguous",
        "in",
        "progress",
    ]
    row = lines[header + 1]
    assert row.split()[:3] == [STREAM, "11", "9"]
    assert len(row) == len(lines[header])  # numbers right-aligned under their headers
    assert "dead-lettered by stage: validation 2" in proc.stdout
    listing = next(i for i, line in enumerate(lines) if line.startswith("status "))
    assert lines[listing + 1].startswith("dead_lettered  ")
    assert "is required" in proc.stdout or "connection_id" in proc.stdout


def test_text_lists_what_the_json_holds(ledger: Ledger) -> None:
    ledger.record([dead("c", "validation")], now=at(0))
    report = build_report(ledger, Filters(), letters={}, redrives=[], namespace=None, now=at(1))
    lines = render_text(report)
    assert "1 message with status dead_lettered, ambiguous, pending, in_progress:" in lines
    row = lines[
        lines.index("1 message with status dead_lettered, ambiguous, pending, in_progress:") + 2
    ]
    assert row.split()[:5] == ["dead_lettered", "dispatch", "c", "validation", "-"]


def test_text_is_rendered_from_the_json_form_alone(ledger: Ledger) -> None:
    """The renderer reads only what --json prints: text cannot tell a different story."""
    ledger.record([accepted("a", "op-a"), dead("c", "validation")], now=at(0))
    ledger.claim([ClaimRequest(NS, "live", FP1, "c")], now=at(100))
    redrives = [{"stream": NS, "key": "c", "at": at(50).isoformat(), "redrive_id": "r1"}]
    report = build_report(
        ledger, Filters(), letters={}, redrives=redrives, namespace=None, now=at(110)
    )
    as_json = json.loads(json.dumps(report))
    assert render_text(as_json) == render_text(report)
    assert any("Re-driven keys (1)" in line for line in render_text(as_json))


def test_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    proc = ledger_cli("--ledger-url", "mysql://nope", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "not supported" in proc.stderr
    missing = ledger_cli("--config", str(tmp_path / "missing.json"), cwd=tmp_path)
    assert missing.returncode == 1
    assert "cannot be read" in missing.stderr
