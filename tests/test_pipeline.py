"""The run's parts on their own: the backlog bound, and follow-ups handed back to admission."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from target_catena_messages.pipeline.backlog import Backlog
from target_catena_messages.pipeline.run import Run
from target_catena_messages.redact import Redactor
from target_catena_messages.settings import Settings

STREAM = "public-dispatch_messages"
CONN = "11111111-1111-4111-8111-111111111111"


def test_backlog_has_room_up_to_its_limit_and_wakes_the_reader_when_records_settle() -> None:
    backlog = Backlog(threading.RLock(), limit=2)
    backlog.unresolved = 2
    assert backlog.wait_for_room(0.01)
    backlog.unresolved = 3
    assert not backlog.wait_for_room(0.01)
    assert not backlog.wait_until_empty(0.01)
    settler = threading.Timer(0.05, backlog.settled, args=(3,))
    settler.start()
    # settled() must wake the waiter: without the notify this waits out the whole 30 s.
    started = time.monotonic()
    assert not backlog.wait_until_empty(30.0)
    assert time.monotonic() - started < 30.0, "settled() did not wake the waiter"
    settler.join()
    assert backlog.wait_until_empty(0.0)
    assert backlog.unresolved == 0
    assert backlog.wait_for_room(0.0)


def dry_run(tmp_path: Path) -> tuple[Run, list[str]]:
    settings = Settings.from_config(
        {
            "dry_run": True,
            "ledger_url": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
            "dead_letter_path": str(tmp_path / "dead-letters.jsonl"),
        }
    )
    lines: list[str] = []
    return Run(
        settings, write_state=lambda _: None, redactor=Redactor(), stderr=lines.append
    ), lines


def record(i: int, text: str) -> dict[str, object]:
    return {
        "id": i,
        "connection_id": CONN,
        "source_sender_id": "dispatcher-7",
        "source_recipient_ids": ["driver-1"],
        "message_text": text,
    }


def test_a_later_copy_behind_a_would_send_key_is_decided_afresh_by_admission(
    tmp_path: Path,
) -> None:
    # Dry run: the first copy of key 1 would be sent; the recorder hands the second back, and
    # admission decides it afresh (would be sent too: a dry run writes no claim).
    run, lines = dry_run(tmp_path)
    prepared = [run.prepare(STREAM, ["id"], record(1, t)) for t in ("first", "second")]
    run.dispatch(prepared)
    assert run.finish() == 0
    assert run.report.totals().would_send == 2
    [line] = lines  # the summary's JSON line, and nothing else
    assert json.loads(line)["summary"]["totals"]["would_send"] == 2


def test_a_later_copy_behind_a_dead_lettered_key_is_dead_lettered_on_its_own(
    tmp_path: Path,
) -> None:
    run, _ = dry_run(tmp_path)
    messages = [
        run.prepare(STREAM, ["id"], record(1, "")),  # blank: dead-lettered at validation
        run.prepare(STREAM, ["id"], record(1, "fixed")),
        run.prepare(STREAM, ["id"], record(1, "")),
    ]
    run.dispatch(messages)
    assert run.finish() == 2
    totals = run.report.totals()
    assert (totals.would_send, totals.dead_lettered_by_stage["validation"]) == (1, 2)
