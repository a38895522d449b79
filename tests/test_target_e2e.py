"""The target end to end: the real CLI in a subprocess, real HTTP to the sandbox, real files."""

from __future__ import annotations

import json
import stat
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from target_catena_messages import jsonutil
from target_catena_messages.body.record import record_key
from target_catena_messages.pipeline.run import Run
from target_catena_messages.redact import Redactor
from target_catena_messages.settings import Settings
from tests.harness import TargetResult, run_target, sandbox_config, singer_lines, state_line

CONN_A = "11111111-1111-4111-8111-111111111111"
CONN_B = "22222222-2222-4222-8222-222222222222"
STREAM = "public-dispatch_messages"


def message(i: int, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": i,
        "connection_id": CONN_A if i % 2 else CONN_B,
        "source_sender_id": "dispatcher-7",
        "source_recipient_ids": [f"driver-{i % 5}"],
        "message_text": f"Load {1000 + i}: pick up at dock {i % 9}",
        "priority": "high" if i % 3 == 0 else None,
        "load_number": f"L{1000 + i}",  # a TMS column that is not a body field
    }
    record.update(overrides)
    return record


def run(tmp_path: Path, sandbox: Any, lines: list[str], **settings: Any) -> TargetResult:
    return run_target(tmp_path, sandbox_config(sandbox.url, **settings), lines)


def test_source_ids_bodies_reach_catena_once_with_operation_ids_in_state(
    tmp_path: Path, sandbox: Any
) -> None:
    records = [message(i) for i in range(1, 41)]
    result = run(tmp_path, sandbox, singer_lines(STREAM, records, state_every=10))

    assert result.returncode == 0, result.stderr
    received = sandbox.accepted_bodies()
    assert len(received) == 40
    expected = []
    for r in records:
        body = {k: v for k, v in r.items() if k not in ("id", "load_number") and v is not None}
        expected.append(body)
    assert sorted(received, key=json.dumps) == sorted(expected, key=json.dumps)
    # STATE: the tap's bookmarks unchanged, ids equal the sandbox's operations
    final = result.last_state
    assert final is not None
    assert final["bookmarks"] == {STREAM: {"replication_key_value": 40}}
    ops = {key: op for _, key, op in result.operations()}
    assert set(ops) == {str(i) for i in range(1, 41)}
    assert set(ops.values()) == {op["id"] for op in sandbox.operations()}
    assert final["target_catena_messages"]["totals"] == {
        "accepted": 40,
        "duplicates": 0,
        "dead_lettered": 0,
        "expired": 0,
    }
    assert result.summary is not None


def test_rerun_sends_nothing_and_reports_earlier_operation_ids(
    tmp_path: Path, sandbox: Any
) -> None:
    lines = singer_lines(STREAM, [message(i) for i in range(1, 21)], state_every=20)
    first = run(tmp_path, sandbox, lines)
    assert first.returncode == 0, first.stderr
    second = run(tmp_path, sandbox, lines)
    assert second.returncode == 0, second.stderr
    assert len(sandbox.accepted_bodies()) == 20
    assert second.last_state is not None
    totals = second.last_state["target_catena_messages"]["totals"]
    assert totals["duplicates"] == 20
    assert totals["accepted"] == 0
    assert sorted(second.operations()) == sorted(first.operations())


def test_catena_ids_body_with_default_sender(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory({"message_schema": "catena_ids"})
    sender = str(uuid.uuid4())
    recipient = str(uuid.uuid4())
    records = [
        {
            "id": 1,
            "connection_id": CONN_A,
            "recipient_id": recipient,
            "message_text": "Delivery confirmed at warehouse B",
            "priority": "low",
            "source_recipient_ids": ["ignored: not a catena_ids field"],
        }
    ]
    result = run(
        tmp_path,
        sandbox,
        singer_lines(STREAM, records, state_every=1),
        message_schema="catena_ids",
        default_sender_id=sender,
    )
    assert result.returncode == 0, result.stderr
    assert sandbox.accepted_bodies() == [
        {
            "connection_id": CONN_A,
            "sender_id": sender,
            "recipient_id": recipient,
            "message_text": "Delivery confirmed at warehouse B",
            "priority": "low",
        }
    ]


def test_invalid_records_are_dead_lettered_naming_fields_and_the_rest_flow(
    tmp_path: Path, sandbox: Any
) -> None:
    records = [
        message(1),
        message(2, priority="urgent"),
        message(3, connection_id=None),
        message(4, message_text="   "),
        message(5, connection_id="not-a-uuid"),
        message(6, source_recipient_ids=[42]),
        message(7),
    ]
    result = run(tmp_path, sandbox, singer_lines(STREAM, records, state_every=7))
    assert result.returncode == 2, result.stderr
    assert len(sandbox.accepted_bodies()) == 2
    by_key = {d["key"]: d for d in result.dead_letters}
    assert set(by_key) == {"2", "3", "4", "5", "6"}
    fields = {k: {e["field"] for e in d["errors"]} for k, d in by_key.items()}
    assert fields["2"] == {"priority"}
    assert fields["3"] == {"connection_id"}
    assert fields["4"] == {"message_text"}
    assert fields["5"] == {"connection_id"}
    assert "source_recipient_ids" in fields["6"]
    for d in result.dead_letters:
        assert d["stage"] == "validation"
        assert d["retryable"] is False
        assert d["attempts"] == 0
        assert list(d) == [
            "at", "run_id", "stream", "key", "stage", "errors", "status", "api_error",
            "operation_id", "attempts", "retryable", "record",
        ]  # fmt: skip
    mode = stat.S_IMODE((tmp_path / "dead-letters.jsonl").stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE((tmp_path / "ledger.sqlite").stat().st_mode) == 0o600
    final = result.last_state
    assert final is not None
    assert sorted(final["target_catena_messages"]["dead_letters"]) == sorted(
        [STREAM, k, "validation"] for k in by_key
    )


def test_rerun_does_not_retry_unchanged_dead_letters_but_retries_fixed_ones(
    tmp_path: Path, sandbox: Any
) -> None:
    bad = [message(1, priority="urgent"), message(2, message_text="")]
    first = run(tmp_path, sandbox, singer_lines(STREAM, bad, state_every=2))
    assert first.returncode == 2
    again = run(tmp_path, sandbox, singer_lines(STREAM, bad, state_every=2))
    # Known failures are reported once, when they happen; a re-run repeats no dead letter.
    assert again.returncode == 0, again.stderr
    assert len(again.dead_letters) == 2
    assert again.summary is not None
    assert again.summary["totals"]["previously_dead_lettered"] == 2
    fixed = [message(1, priority="high"), message(2, message_text="")]
    third = run(tmp_path, sandbox, singer_lines(STREAM, fixed, state_every=2))
    assert third.returncode == 0, third.stderr
    assert [b["priority"] for b in sandbox.accepted_bodies()] == ["high"]
    assert len(third.dead_letters) == 2


def test_allow_dead_letters_exits_zero(tmp_path: Path, sandbox: Any) -> None:
    result = run(
        tmp_path,
        sandbox,
        singer_lines(STREAM, [message(1, priority="urgent")], state_every=1),
        allow_dead_letters=True,
    )
    assert result.returncode == 0


def test_on_invalid_record_fail_stops_with_safe_state(tmp_path: Path, sandbox: Any) -> None:
    records = [message(1), message(2, priority="urgent"), message(3)]
    lines = (
        singer_lines(STREAM, records[:1], state_every=1)
        + singer_lines(STREAM, records[1:], state_every=2)[1:]
    )
    result = run(tmp_path, sandbox, lines, on_invalid_record="fail", batch_size_rows=1)
    assert result.returncode == 1
    assert "priority" in result.stderr
    assert "Traceback" not in result.stderr
    # the safe state covers record 1 only
    assert result.last_state is not None
    assert result.last_state["bookmarks"] == {STREAM: {"replication_key_value": 1}}
    assert len(sandbox.accepted_bodies()) == 1


def test_connection_id_fallbacks(tmp_path: Path, sandbox: Any) -> None:
    records = [
        message(1, connection_id=None, fleet_ref="FLEET-NORTH"),
        message(2, connection_id=None, fleet_ref="FLEET-UNKNOWN"),
        message(3, connection_id=None),
    ]
    result = run(
        tmp_path,
        sandbox,
        singer_lines(STREAM, records, state_every=3),
        connection_id_by_fleet_ref={"FLEET-NORTH": CONN_B},
        default_connection_id=CONN_A,
    )
    assert result.returncode == 0, result.stderr
    by_text = {b["message_text"]: b["connection_id"] for b in sandbox.accepted_bodies()}
    assert by_text[message(1)["message_text"]] == CONN_B
    assert by_text[message(2)["message_text"]] == CONN_A
    assert by_text[message(3)["message_text"]] == CONN_A


def test_expired_messages_are_never_sent(tmp_path: Path, sandbox: Any) -> None:
    records = [
        message(1, created_at="2020-01-01T00:00:00Z"),
        message(2, created_at="2999-01-01T00:00:00Z"),
    ]
    result = run(
        tmp_path,
        sandbox,
        singer_lines(STREAM, records, state_every=2),
        message_time_field="created_at",
    )
    assert result.returncode == 2
    assert len(sandbox.accepted_bodies()) == 1
    [dead] = result.dead_letters
    assert dead["stage"] == "expired"
    assert dead["key"] == "1"
    assert result.last_state is not None
    assert result.last_state["target_catena_messages"]["totals"]["expired"] == 1


def test_schema_without_message_text_is_fatal_and_lists_fields(
    tmp_path: Path, sandbox: Any
) -> None:
    lines = singer_lines(STREAM, [{"id": 1, "body": "typo", "connection_id": CONN_A}])
    result = run(tmp_path, sandbox, lines)
    assert result.returncode == 1
    assert "message_text" in result.stderr
    assert "body" in result.stderr
    assert "Traceback" not in result.stderr
    assert sandbox.accepted_bodies() == []


def test_stream_without_keys_is_fatal_unless_body_hash_keys(tmp_path: Path, sandbox: Any) -> None:
    lines = singer_lines(STREAM, [message(1)], key_properties=[], state_every=1)
    result = run(tmp_path / "a", sandbox, lines)
    assert result.returncode == 1
    assert "__key_properties__" in result.stderr
    ok = run(tmp_path / "b", sandbox, lines, allow_body_hash_keys=True)
    assert ok.returncode == 0, ok.stderr
    [(_, key, _)] = ok.operations()
    assert len(key) == 64


def test_same_key_twice_in_one_run_is_sent_once(tmp_path: Path, sandbox: Any) -> None:
    records = [message(1), message(1, message_text="edited"), message(2)]
    result = run(tmp_path, sandbox, singer_lines(STREAM, records, state_every=3))
    assert result.returncode == 0, result.stderr
    assert len(sandbox.accepted_bodies()) == 2
    assert result.last_state is not None
    assert result.last_state["target_catena_messages"]["totals"]["duplicates"] == 1


def test_no_state_line_without_tap_state(tmp_path: Path, sandbox: Any) -> None:
    result = run(tmp_path, sandbox, singer_lines(STREAM, [message(1), message(2)]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.summary is not None
    assert len(sandbox.accepted_bodies()) == 2


def test_state_lists_are_capped_at_1000(tmp_path: Path, sandbox: Any) -> None:
    records = [message(i) for i in range(1, 1501)]
    result = run(
        tmp_path, sandbox, singer_lines(STREAM, records, state_every=1500), max_concurrency=16
    )
    assert result.returncode == 0, result.stderr
    for state in result.states:
        assert len(state["target_catena_messages"]["operations"]) <= 1000
    assert result.last_state is not None
    assert result.last_state["target_catena_messages"]["totals"]["accepted"] == 1500


def test_dry_run_sends_nothing_asks_no_token_writes_no_state(tmp_path: Path, sandbox: Any) -> None:
    records = [message(1), message(2, priority="urgent")]
    result = run_target(
        tmp_path,
        {"dry_run": True, "api_url": sandbox.url},
        singer_lines(STREAM, records, state_every=2),
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert sandbox.stats()["token_requests"] == 0
    assert sandbox.accepted_bodies() == []
    assert [d["key"] for d in result.dead_letters] == ["2"]
    assert not (tmp_path / "ledger.sqlite").exists()


def test_bad_settings_are_one_clear_line(tmp_path: Path) -> None:
    result = run_target(
        tmp_path,
        {"api_url": "http://catena.example.com", "client_id": "x", "client_secret": "y" * 12},
        singer_lines(STREAM, [message(1)]),
    )
    assert result.returncode == 1
    assert "http://" in result.stderr
    assert "loopback" in result.stderr
    assert "Traceback" not in result.stderr


def test_fingerprint_and_key_keep_their_formulas_on_the_fast_path(tmp_path: Path) -> None:
    # Ledgers from earlier runs compare stored fingerprints, so the per-record shortcuts must
    # produce exactly sha256_hex([body, shape]) and record_key's text, and a dry run's batch
    # must still resolve every record (as would_send) through the recorder.
    settings = Settings.from_config(
        {
            "dry_run": True,
            "ledger_url": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
            "dead_letter_path": str(tmp_path / "dead-letters.jsonl"),
        }
    )
    lines: list[str] = []
    run = Run(settings, write_state=lambda _: None, redactor=Redactor(), stderr=lines.append)
    records = [message(7), message(8, id="k-8"), message(9, id=Decimal("9.5"))]
    prepared = [run.prepare(STREAM, ["id"], r) for r in records]
    for m, r in zip(prepared, records, strict=True):
        assert m.fingerprint == jsonutil.sha256_hex([m.body, settings.shape_fingerprint()])
        assert m.key == record_key(r, ["id"])
    run.dispatch(prepared)
    assert run.finish() == 0
    summary = json.loads(lines[-1])["summary"]
    assert summary["totals"]["would_send"] == 3


def test_fatal_invalid_copy_held_behind_a_rejected_key_still_writes_the_safe_state(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    # Catena refuses the first copy of key 1 (422); the second copy, held behind it, is blank.
    # Deciding that copy afresh is fatal (on_invalid_record: fail): the run must still end
    # with one clear line and the STATE after record 1 (resolved: dead-lettered at "api").
    sandbox = sandbox_factory(
        {"faults": {"seed": 1, "rules": [{"kind": "status", "status": 422, "match": {"to": 1}}]}}
    )
    lines = [
        *singer_lines(STREAM, [message(1)], state_every=1),
        singer_lines(STREAM, [message(1, message_text="")])[1],
        state_line(STREAM, 2),
    ]
    result = run(tmp_path, sandbox, lines, on_invalid_record="fail", batch_size_rows=1)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "message_text" in result.stderr
    assert "on_invalid_record: fail" in result.stderr
    assert result.last_state is not None
    assert result.last_state["bookmarks"] == {STREAM: {"replication_key_value": 1}}
    assert result.last_state["target_catena_messages"]["totals"]["dead_lettered"] == 1
    assert [(d["key"], d["stage"]) for d in result.dead_letters] == [("1", "api")]
    assert sandbox.accepted_bodies() == []


def test_a_failure_while_recording_is_one_line_and_ends_with_a_safe_state(
    tmp_path: Path, sandbox: Any
) -> None:
    # The dead-letter file cannot be created (its folder is a file): the recorder fails at the
    # first dead letter. The run stops with one line naming it, and STATE never covers it.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    records = [message(i) for i in range(1, 301)] + [message(301, priority="urgent")]
    result = run(
        tmp_path,
        sandbox,
        singer_lines(STREAM, records, state_every=10),
        batch_size_rows=50,
        dead_letter_path=str(blocker / "dead-letters.jsonl"),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    fatal = [line for line in result.stderr.splitlines() if "recording outcomes failed" in line]
    assert len(fatal) == 1, result.stderr
    assert result.last_state is not None
    position = result.last_state["bookmarks"][STREAM]["replication_key_value"]
    assert 10 <= position <= 300
    assert result.summary is not None
    assert result.summary["exit_code"] == 1
