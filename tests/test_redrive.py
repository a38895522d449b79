"""Re-drive end to end: dead letters, a fixed config, the real target, exactly once."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.body.record import KEY_FIELD, is_redrive_schema, record_key
from target_catena_messages.ledger import ClaimRequest, Decision, Ledger, LedgerOutcome
from target_catena_messages.ops import redrive
from target_catena_messages.ops.redrive import (
    Selection,
    newest_per_key,
    singer_messages,
)
from tests.harness import TargetResult, run_target, sandbox_config, singer_lines
from tests.pg import fresh_schema_url

STREAM = "public-dispatch_messages"
CONN_A = "11111111-1111-4111-8111-111111111111"
CONN_FLEET_A = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
CONN_FLEET_B = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
FLEET_MAP = {"fleet-a": CONN_FLEET_A, "fleet-b": CONN_FLEET_B}


def message(i: int, **fields: Any) -> dict[str, Any]:
    return {
        "id": i,
        "source_sender_id": "dispatcher-7",
        "source_recipient_ids": [f"driver-{i}"],
        "message_text": f"Load {i}: dock {i % 9}",
        **fields,
    }


RECORDS = [
    *(message(i, connection_id=CONN_A) for i in range(1, 7)),
    *(message(i, fleet_ref="fleet-a" if i % 2 else "fleet-b") for i in range(7, 11)),
    message(11, fleet_ref="fleet-unknown"),  # stays invalid after the fix
]
FIXABLE = {"7", "8", "9", "10"}


@pytest.fixture
def redrive_main(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[list[str], str]]:
    """The re-drive CLI's main() in this process: (stdout lines, stderr)."""

    def run(*args: str, expect: int = 0) -> tuple[list[str], str]:
        capsys.readouterr()
        code = redrive.main(list(args))
        out, err = capsys.readouterr()
        assert code == expect, err
        return out.splitlines(), err

    return run


def target(workdir: Path, sandbox: Any, lines: list[str], **settings: Any) -> TargetResult:
    return run_target(
        workdir, sandbox_config(sandbox.url, allow_dead_letters=True, **settings), lines
    )


def test_redrive_after_a_config_fix_delivers_the_fixed_records_exactly_once(
    tmp_path: Path, sandbox: Any, redrive_main: Callable[..., tuple[list[str], str]]
) -> None:
    first = target(tmp_path, sandbox, singer_lines(STREAM, RECORDS, state_every=11))
    assert first.returncode == 0, first.stderr
    assert len(sandbox.accepted_bodies()) == 6
    assert {d["key"] for d in first.dead_letters} == {*FIXABLE, "11"}
    assert {d["stage"] for d in first.dead_letters} == {"validation"}
    dead_letters = tmp_path / "dead-letters.jsonl"

    # The re-drive of the dead-letter file, through the console entry (a real pipe's producer).
    proc = subprocess.run(
        [sys.executable, "-m", "target_catena_messages.ops.redrive", str(dead_letters)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert "5 records from" in proc.stderr
    second = target(tmp_path, sandbox, lines, connection_id_by_fleet_ref=FLEET_MAP)
    assert second.returncode == 0, second.stderr
    assert second.summary is not None
    totals = second.summary["totals"]
    assert (totals["accepted"], totals["previously_dead_lettered"], totals["duplicates"]) == (
        4,
        1,
        0,
    )
    bodies = sandbox.accepted_bodies()
    assert len(bodies) == 10  # 6 + exactly the 4 fixed ones
    fixed = {b["message_text"]: b["connection_id"] for b in bodies[6:]}
    assert fixed == {
        f"Load {i}: dock {i % 9}": FLEET_MAP[r["fleet_ref"]]
        for i, r in ((r["id"], r) for r in RECORDS if str(r["id"]) in FIXABLE)
    }
    assert all(KEY_FIELD not in b for b in bodies)  # the key field is never sent
    assert second.states == []  # no tap STATE in a re-drive: none written

    # The ledger knows the fixed keys under their ORIGINAL keys, accepted by the re-drive run.
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite'}", run_id="r", read_only=True) as led:
        rows = led.get_many([(STREAM, k) for k in [*FIXABLE, "11"]])
    assert {k for (_, k), r in rows.items() if r["status"] == "accepted"} == FIXABLE
    assert {rows[(STREAM, k)]["run_id"] for k in FIXABLE} == {second.summary["run_id"]}

    # Re-driving again sends nothing.
    third = target(tmp_path, sandbox, lines, connection_id_by_fleet_ref=FLEET_MAP)
    assert third.summary is not None
    assert third.summary["totals"]["duplicates"] == 4
    assert third.summary["totals"]["accepted"] == 0
    assert len(sandbox.accepted_bodies()) == 10

    # With the fixed config, the re-drive itself leaves out what was accepted since.
    fixed_config = tmp_path / "fixed.json"
    fixed_config.write_text((tmp_path / "config.json").read_text())
    out, err = redrive_main("--config", str(fixed_config))
    assert [json.loads(x)["record"][KEY_FIELD] for x in out[1:]] == ["11"]
    assert "4 accepted since and left out" in err


def test_redrive_log_and_ledger_report_show_what_was_redriven(
    tmp_path: Path, sandbox: Any, redrive_main: Callable[..., tuple[list[str], str]]
) -> None:
    first = target(tmp_path, sandbox, singer_lines(STREAM, RECORDS))
    assert first.returncode == 0, first.stderr
    lines, _ = redrive_main(str(tmp_path / "dead-letters.jsonl"))
    log = tmp_path / "redrive-log.jsonl"
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert {e["key"] for e in entries} == {*FIXABLE, "11"}
    assert len({e["redrive_id"] for e in entries}) == 1
    assert {e["source"] for e in entries} == {str(tmp_path / "dead-letters.jsonl")}
    assert {e["dead_letter_run_id"] for e in entries} == {first.dead_letters[0]["run_id"]}
    assert all(e["stage"] == "validation" and e["at"] for e in entries)

    second = target(tmp_path, sandbox, lines, connection_id_by_fleet_ref=FLEET_MAP)
    assert second.summary is not None
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "target_catena_messages.ops.ledger_report",
            "--config",
            str(tmp_path / "config.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(proc.stdout)
    by_key = {r["key"]: r for r in report["redriven"]}
    assert set(by_key) == {*FIXABLE, "11"}
    for key in FIXABLE:
        assert by_key[key]["status"] == "accepted"
        assert by_key[key]["run_id"] == second.summary["run_id"]
        assert by_key[key]["outcome_after_redrive"] is True
        assert by_key[key]["operation_id"]
    assert by_key["11"]["status"] == "dead_lettered"
    assert by_key["11"]["outcome_after_redrive"] is False  # the re-drive changed nothing for it
    assert report["sources"]["redrive_log"] == str(log)


def fail_then_recover(
    tmp_path: Path, sandbox_factory: Any, status: int, **settings: Any
) -> tuple[Any, TargetResult]:
    """Every POST answers ``status``: three records dead-letter; then Catena is well again."""
    box = sandbox_factory(
        {"faults": {"rules": [{"kind": "status", "status": status, "match": {"times": 100}}]}}
    )
    records = [message(i, connection_id=CONN_A) for i in range(1, 4)]
    first = target(tmp_path, box, singer_lines(STREAM, records), **settings)
    assert len(first.dead_letters) == 3
    box.configure({})
    return box, first


def test_retryable_dead_letters_are_resent_by_a_redrive_once(
    tmp_path: Path, sandbox_factory: Any, redrive_main: Callable[..., tuple[list[str], str]]
) -> None:
    box, first = fail_then_recover(
        tmp_path, sandbox_factory, 503, max_retries=0, max_retry_seconds=1
    )
    assert {(d["stage"], d["retryable"]) for d in first.dead_letters} == {("api", True)}
    lines, _ = redrive_main(str(tmp_path / "dead-letters.jsonl"), "--retryable-only")
    delivered = target(tmp_path, box, lines)
    assert delivered.summary is not None
    assert delivered.summary["totals"]["accepted"] == 3
    again = target(tmp_path, box, lines)
    assert again.summary is not None
    assert again.summary["totals"]["duplicates"] == 3
    assert len(box.accepted_bodies()) == 3


def test_rearm_sends_unchanged_rejected_dead_letters_once(
    tmp_path: Path, sandbox_factory: Any, redrive_main: Callable[..., tuple[list[str], str]]
) -> None:
    box, first = fail_then_recover(tmp_path, sandbox_factory, 409)
    assert {(d["stage"], d["retryable"]) for d in first.dead_letters} == {("api", False)}
    config = str(tmp_path / "config.json")
    dead_letters = str(tmp_path / "dead-letters.jsonl")

    plain, _ = redrive_main(dead_letters)
    unchanged = target(tmp_path, box, plain)
    assert unchanged.summary is not None
    assert unchanged.summary["totals"]["previously_dead_lettered"] == 3  # same body: held back
    assert box.accepted_bodies() == []

    rearmed, err = redrive_main(dead_letters, "--rearm", "--config", config)
    assert "3 re-armed" in err
    delivered = target(tmp_path, box, rearmed)
    assert delivered.summary is not None
    assert delivered.summary["totals"]["accepted"] == 3
    assert len(box.accepted_bodies()) == 3

    again, err = redrive_main(dead_letters, "--rearm", "--config", config)
    assert again == []  # all accepted since: nothing left to re-drive
    assert "nothing to re-drive" in err
    assert len(box.accepted_bodies()) == 3


def test_rearmed_ambiguous_message_adopts_the_operation_catena_already_has(
    tmp_path: Path, sandbox_factory: Any, redrive_main: Callable[..., tuple[list[str], str]]
) -> None:
    # Catena processes the POST but answers 500, and its operation list lags: the lookup finds
    # nothing, no resend is allowed, so the message is dead-lettered as ambiguous.
    box = sandbox_factory(
        {
            "list_lag_seconds": 3600,
            "faults": {"rules": [{"kind": "status", "status": 500, "after_processing": True}]},
        }
    )
    first = target(
        tmp_path,
        box,
        singer_lines(STREAM, [message(1, connection_id=CONN_A)]),
        max_ambiguous_resends=0,
        operation_lookup_lag_seconds=0,
    )
    assert [d["stage"] for d in first.dead_letters] == ["ambiguous"]
    [operation] = box.operations()
    box.configure({})  # the list has caught up
    dead_letters = str(tmp_path / "dead-letters.jsonl")
    config = str(tmp_path / "config.json")
    assert redrive_main(dead_letters)[0] == []  # ambiguous ones only when asked for

    lines, err = redrive_main(dead_letters, "--stage", "ambiguous", "--rearm", "--config", config)
    assert "1 re-armed" in err
    second = target(tmp_path, box, lines, operation_lookup_lag_seconds=0)
    assert second.summary is not None
    assert second.summary["totals"]["accepted"] == 1
    assert len(box.accepted_bodies()) == 1  # found and adopted, not sent again
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite'}", run_id="r", read_only=True) as led:
        row = led.get(STREAM, "1")
    assert row is not None
    assert (row["status"], row["operation_id"]) == ("accepted", operation["id"])


def test_rearm_needs_the_ledger_and_errors_are_one_line(
    tmp_path: Path, redrive_main: Callable[..., tuple[list[str], str]]
) -> None:
    path = tmp_path / "dl.jsonl"
    path.write_text(json.dumps({"stream": STREAM, "key": "1", "stage": "api", "record": {}}) + "\n")
    _, err = redrive_main(str(path), "--rearm", expect=1)
    assert "--rearm changes the ledger" in err
    _, err = redrive_main(str(tmp_path / "missing.jsonl"), expect=1)
    assert (
        err.strip()
        == f"target-catena-messages-redrive: no dead-letter file at {tmp_path}/missing.jsonl"
    )
    path.write_text("not json\n")
    _, err = redrive_main(str(path), expect=1)
    assert "dl.jsonl:1: not a JSON line" in err


# Maps a re-drive must not apply again: the dead letters hold their output. The first is not
# idempotent (a prefix added twice); the second reads source columns its own output drops; both
# drop every other stream (``__else__: __NULL__``), a re-drive stream under any name included.
PREFIXING_MAPS = {
    STREAM: {"message_text": "'Dispatch: ' + message_text"},
    "__else__": "__NULL__",
}
RENAMING_MAPS = {
    STREAM: {
        "id": "id",
        "message_text": "'Dispatch: ' + body",
        "source_sender_id": "sender",
        "source_recipient_ids": "[driver]",
        "fleet_ref": "fleet",
        "__else__": "__NULL__",
    },
    "__else__": "__NULL__",
}


def _source_row(i: int, fleet: str) -> dict[str, Any]:
    return {
        "id": i,
        "body": f"Load {i}: dock {i % 9}",
        "sender": "dispatcher-7",
        "driver": f"driver-{i}",
        "fleet": fleet,
    }


@pytest.mark.parametrize("maps", [PREFIXING_MAPS, RENAMING_MAPS], ids=["prefixing", "renaming"])
def test_redrive_sends_records_as_they_failed_whatever_the_stream_maps(
    tmp_path: Path,
    sandbox: Any,
    redrive_main: Callable[..., tuple[list[str], str]],
    maps: dict[str, Any],
) -> None:
    if maps is PREFIXING_MAPS:
        records = [message(i, fleet_ref="fleet-a") for i in (1, 2)]
    else:
        records = [_source_row(i, "fleet-a") for i in (1, 2)]
    first = target(tmp_path, sandbox, singer_lines(STREAM, records), stream_maps=maps)
    assert sorted(d["key"] for d in first.dead_letters) == ["1", "2"]  # no connection for fleet-a
    expected = {"Dispatch: Load 1: dock 1", "Dispatch: Load 2: dock 2"}
    assert {d["record"]["message_text"] for d in first.dead_letters} == expected

    # The fixed config keeps the maps, as Meltano does: it merges an override into them.
    lines, _ = redrive_main(str(tmp_path / "dead-letters.jsonl"))
    second = target(
        tmp_path, sandbox, lines, stream_maps=maps, connection_id_by_fleet_ref=FLEET_MAP
    )
    assert second.returncode == 0, second.stderr
    assert second.summary is not None
    assert second.summary["streams"][STREAM]["accepted"] == 2, second.stderr
    bodies = sandbox.accepted_bodies()
    assert {b["message_text"] for b in bodies} == expected  # mapped once, when first read
    assert {b["connection_id"] for b in bodies} == {CONN_FLEET_A}
    assert all(KEY_FIELD not in b for b in bodies)

    # The original stream is still mapped: the same rows from the tap are duplicates now.
    third = target(
        tmp_path,
        sandbox,
        singer_lines(STREAM, records),
        stream_maps=maps,
        connection_id_by_fleet_ref=FLEET_MAP,
    )
    assert third.summary is not None
    assert third.summary["streams"][STREAM]["duplicates"] == 2, third.stderr
    assert len(sandbox.accepted_bodies()) == 2


def test_one_redriven_record_is_one_record(
    tmp_path: Path, redrive_main: Callable[..., tuple[list[str], str]]
) -> None:
    path = tmp_path / "dl.jsonl"
    path.write_text(json.dumps(letter("7")) + "\n")
    _, err = redrive_main(str(path))
    assert ": 1 record from " in err


def test_redrive_schema_is_told_apart_by_its_reserved_key() -> None:
    letters = [letter("7")]
    schema = next(singer_messages(letters))
    assert is_redrive_schema(schema)
    assert not is_redrive_schema({**schema, "key_properties": ["id"]})
    assert not is_redrive_schema({**schema, "key_properties": [KEY_FIELD, "id"]})


# -- selection and the stream (pure) -----------------------------------------------------------


def letter(key: str, stage: str = "validation", **fields: Any) -> dict[str, Any]:
    return {
        "stream": STREAM,
        "key": key,
        "stage": stage,
        "retryable": False,
        "record": {},
        **fields,
    }


def test_selection_defaults_leave_out_ambiguous_and_expired() -> None:
    picked = [
        x["key"]
        for x in (
            letter("v"),
            letter("a", "api"),
            letter("c", "confirmation"),
            letter("amb", "ambiguous"),
            letter("e", "expired"),
        )
        if Selection().wants(x)
    ]
    assert picked == ["v", "a", "c"]
    assert Selection(stages=frozenset({"ambiguous"})).wants(letter("amb", "ambiguous"))
    assert not Selection(retryable_only=True).wants(letter("a", "api"))
    assert Selection(retryable_only=True).wants(letter("a", "api", retryable=True))
    assert not Selection(keys=frozenset({"x"})).wants(letter("a"))
    assert not Selection(streams=frozenset({"other"})).wants(letter("a"))


def test_newest_dead_letter_per_key_wins_in_its_own_order() -> None:
    letters = [letter("1", "api"), letter("2"), letter("1", "validation"), letter("3")]
    assert [(x["key"], x["stage"]) for x in newest_per_key(letters)] == [
        ("2", "validation"),
        ("1", "validation"),
        ("3", "validation"),
    ]


def test_the_stream_keeps_composite_keys_and_always_declares_message_text() -> None:
    original = {"fleet": "f-1", "id": 7, "text": "x"}
    key = record_key(original, ["fleet", "id"])  # a JSON array string
    messages = list(
        singer_messages(
            [
                {"stream": "a", "key": key, "record": original},
                {"stream": "b", "key": "9", "record": {"id": 9}},
                {"stream": "a", "key": "8", "record": {"other": 1}},
            ]
        )
    )
    assert [(m["type"], m["stream"]) for m in messages] == [
        ("SCHEMA", "a"),
        ("RECORD", "a"),
        ("SCHEMA", "b"),
        ("RECORD", "b"),
        ("RECORD", "a"),
    ]
    schema_a = messages[0]
    assert schema_a["key_properties"] == [KEY_FIELD]
    assert set(schema_a["schema"]["properties"]) == {
        "message_text",
        "fleet",
        "id",
        "text",
        "other",
        KEY_FIELD,
    }
    assert "message_text" in messages[2]["schema"]["properties"]
    record = messages[1]["record"]
    assert record_key(record, [KEY_FIELD]) == key  # the target computes the original key
    assert {k: v for k, v in record.items() if k != KEY_FIELD} == original


def test_decimals_survive_the_round_trip(
    tmp_path: Path, redrive_main: Callable[..., tuple[list[str], str]]
) -> None:
    path = tmp_path / "dl.jsonl"
    record = {"id": 1, "weight": 12.50, "big": 12345678901234567890}
    path.write_text(
        '{"stream":"s","key":"1","stage":"api","record":{"id":1,"weight":12.50,"big":12345678901234567890}}\n'
    )
    out, _ = redrive_main(str(path))
    emitted = json.loads(out[1])["record"]
    assert emitted["big"] == record["big"]
    assert '"weight":12.50' in out[1]  # not 12.5: the same bytes as the tap's record


# -- the ledger side of --rearm -----------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.sqlite"
    return fresh_schema_url(request.getfixturevalue("pg_url"))


def test_rearmed_ambiguous_dead_letter_is_recovered_not_blindly_resent(ledger_url: str) -> None:
    fp = hashlib.sha256(b"body").hexdigest()
    with Ledger.open(ledger_url, run_id="run-1") as ledger:
        ledger.claim([ClaimRequest("ns", "amb", fp, "c"), ClaimRequest("ns", "api", fp, "c")])
        ledger.record(
            [
                LedgerOutcome("ns", "amb", "dead_lettered", fp, stage="ambiguous", attempts=2),
                LedgerOutcome("ns", "api", "dead_lettered", fp, stage="api", attempts=1),
                LedgerOutcome("ns", "ok", "accepted", fp, operation_id="op", attempts=1),
            ]
        )
        claimed_at = ledger.get("ns", "amb")
        assert claimed_at is not None
        keys = [("ns", "amb"), ("ns", "api"), ("ns", "ok"), ("ns", "missing")]
        assert ledger.rearm_dead_letters(keys) == {"removed": 1, "ambiguous": 1}
        assert ledger.get("ns", "api") is None
        assert ledger.get("ns", "ok") is not None
    with Ledger.open(ledger_url, run_id="run-2") as ledger:
        results = ledger.claim([ClaimRequest("ns", k, fp, "c") for k in ("amb", "api", "ok")])
    assert [r.decision for r in results] == [Decision.RECOVER, Decision.SEND, Decision.DUPLICATE]
    assert results[0].prior_claimed_at == claimed_at["claimed_at"]
