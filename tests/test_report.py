from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.outcome import Resolution
from target_catena_messages.pipeline.report import RunReport, emit_summary, plural
from tests.harness import run_target, sandbox_config, singer_lines

STREAM = "public-dispatch_messages"
HTTP = {
    "token_requests": 1,
    "requests": 312,
    "custom_b": 2,
    "throttle_wait_seconds": 7.5,
    "retries": 11,
    "rejections": 3,
    "throttled": 7,
    "ambiguous_sends": 1,
    "custom_a": 0.25,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def filled_report(clock: FakeClock | None = None) -> RunReport:
    report = RunReport("run-42", clock=clock or FakeClock())
    for _ in range(291):
        report.count(STREAM, Resolution.ACCEPTED)
    for _ in range(4):
        report.count(STREAM, Resolution.DUPLICATE)
    for _ in range(7):
        report.count(STREAM, Resolution.DEAD_LETTERED, "validation")
    report.count(STREAM, Resolution.DEAD_LETTERED, "ambiguous")
    for _ in range(2):
        report.count(STREAM, Resolution.EXPIRED)
    report.count(STREAM, Resolution.PREVIOUSLY_DEAD_LETTERED)
    report.count("public-loads", Resolution.DEAD_LETTERED, "api")
    report.count("public-loads", Resolution.DEAD_LETTERED, "confirmation")
    report.count("public-loads", Resolution.ACCEPTED)
    return report


def test_counts_per_stream_and_stage() -> None:
    report = filled_report()
    main = report.streams[STREAM]
    assert (main.accepted, main.duplicates, main.expired, main.previously_dead_lettered) == (
        291,
        4,
        2,
        1,
    )
    assert main.dead_lettered_by_stage == {
        "validation": 7,
        "api": 0,
        "ambiguous": 1,
        "confirmation": 0,
    }
    assert main.dead_lettered == 8
    assert main.done == 306
    loads = report.streams["public-loads"]
    assert loads.dead_lettered_by_stage == {
        "validation": 0,
        "api": 1,
        "ambiguous": 0,
        "confirmation": 1,
    }
    total = report.totals()
    assert (total.accepted, total.dead_lettered, total.done) == (292, 10, 309)


def test_bad_counts_are_loud() -> None:
    report = RunReport("run")
    with pytest.raises(ValueError, match="outcome"):
        report.count(STREAM, "sent")
    with pytest.raises(ValueError, match="stage"):
        report.count(STREAM, Resolution.DEAD_LETTERED)
    with pytest.raises(ValueError, match="stage"):
        report.count(STREAM, Resolution.DEAD_LETTERED, "expired")
    assert report.totals().done == 0


def test_progress_cadence_with_fake_clock() -> None:
    clock = FakeClock()
    report = RunReport("run", clock=clock, progress_every=10.0)
    for _ in range(50):
        report.count(STREAM, Resolution.ACCEPTED)
    assert report.progress_line(in_flight=3, queued=10, http=HTTP) is None
    clock.now += 9.9
    assert report.progress_line(in_flight=3, queued=10, http=HTTP) is None
    clock.now += 0.1
    line = report.progress_line(in_flight=3, queued=10, http=HTTP)
    assert line is not None
    assert "\n" not in line
    assert "50 records done (5.0/s)" in line
    assert "50 accepted" in line
    assert "0 dead-lettered" in line
    assert "3 in flight" in line
    assert "10 queued" in line
    assert "11 retries" in line
    assert "7 throttled (429)" in line
    # the next line waits a full period again, and its rate covers only that period
    clock.now += 5
    assert report.progress_line(in_flight=0, queued=0, http={}) is None
    for _ in range(1950):
        report.count(STREAM, Resolution.ACCEPTED)
    report.count(STREAM, Resolution.DEAD_LETTERED, "api")
    report.count(STREAM, Resolution.EXPIRED)
    clock.now += 5
    line = report.progress_line(in_flight=0, queued=0, http={})
    assert line is not None
    assert "2,002 records done (195.2/s)" in line
    assert "2 dead-lettered" in line
    assert "0 retries" in line
    assert report.progress_line(in_flight=0, queued=0, http={}) is None


def test_progress_line_says_it_waits_for_catena_during_an_outage() -> None:
    clock = FakeClock()
    report = RunReport("run", clock=clock, progress_every=10.0)
    clock.now += 10
    line = report.progress_line(in_flight=0, queued=5, http=HTTP, unavailable_for=42.4)
    assert line is not None
    assert line.endswith("; waiting for Catena (unavailable for 42 s)")
    clock.now += 10
    line = report.progress_line(in_flight=0, queued=5, http=HTTP)
    assert line is not None
    assert "waiting for Catena" not in line


def summary_of(report: RunReport) -> tuple[list[str], dict[str, object]]:
    return report.summary(
        dead_letter_path="output/dead-letters.jsonl",
        dead_letters_written=12,
        ledger_location="sqlite:////srv/output/ledger.sqlite",
        http=HTTP,
        exit_code=2,
        elapsed=23.456,
    )


def row(lines: list[str], label: str, occurrence: int = 0) -> str:
    matches = [line for line in lines if line.strip().startswith(label)]
    return matches[occurrence]


def test_summary_human_lines() -> None:
    lines, _ = summary_of(filled_report())
    text = "\n".join(lines)
    assert lines[0].startswith("Catena delivery summary, run run-42: 309 records in 23.5 s")
    assert "exit code 2" in lines[0]
    assert STREAM in text
    assert "public-loads" in text
    assert "all streams" in text  # several streams get a total block
    assert row(lines, "accepted").split()[-1] == "291"
    assert row(lines, "duplicates").split()[-1] == "4"
    # Expired rows are dead letters too, as in the dead-letter file and the ledger report.
    assert row(lines, "dead-lettered").split()[-1] == "10"
    assert row(lines, "dead-lettered, invalid record (validation)").split()[-1] == "7"
    assert row(lines, "dead-lettered, send outcome unknown (ambiguous)").split()[-1] == "1"
    assert row(lines, "dead-lettered, refused by Catena (api)").split()[-1] == "1"  # public-loads
    assert row(lines, "dead-lettered, too old, never sent (expired)").split()[-1] == "2"
    assert row(lines, "dead-lettered in an earlier run").split()[-1] == "1"
    assert row(lines, "accepted", 2).split()[-1] == "292"  # all streams
    assert "12  to output/dead-letters.jsonl" in row(lines, "dead letters written")
    assert row(lines, "ledger").endswith("sqlite:////srv/output/ledger.sqlite")
    http_labels = [
        "requests sent",
        "retries",
        "ambiguous sends",
        "throttled by Catena (429)",
        "seconds waited for throttling",
        "token requests",
        "rejected by Catena",
        "custom a",
        "custom b",
    ]
    positions = [next(i for i, line in enumerate(lines) if label in line) for label in http_labels]
    assert positions == sorted(positions)  # fixed order for known keys, then the rest sorted
    assert row(lines, "seconds waited").split()[-1] == "7.5"
    assert row(lines, "requests sent").split()[-1] == "312"
    # numbers right-aligned in one column
    number_rows = [line for line in lines[1:] if re.search(r"\d$", line) and "  to " not in line]
    assert len({len(line) for line in number_rows}) == 1
    assert all(not line.endswith(" ") for line in lines)


def test_single_stream_has_no_total_block_and_hides_empty_stages() -> None:
    report = RunReport("r")
    report.count(STREAM, Resolution.ACCEPTED)
    lines, data = report.summary(
        dead_letter_path="d.jsonl",
        dead_letters_written=0,
        ledger_location="l",
        http={},
        exit_code=0,
        elapsed=0.5,
    )
    text = "\n".join(lines)
    assert "all streams" not in text
    assert "(validation)" not in text
    assert "Catena API" in text
    assert data["http"] == {}
    assert "dry run" not in text


def test_dry_run_counts_shown() -> None:
    report = RunReport("r")
    report.count(STREAM, Resolution.WOULD_SEND)
    report.count(STREAM, Resolution.WOULD_SEND)
    report.count(STREAM, Resolution.DEAD_LETTERED, "validation")
    lines, data = report.summary(
        dead_letter_path="d.jsonl",
        dead_letters_written=1,
        ledger_location="l",
        http={},
        exit_code=2,
        elapsed=0.5,
    )
    assert row(lines, "would be sent (dry run").split()[-1] == "2"
    assert data["totals"]["would_send"] == 2
    assert data["records"] == 3


def test_has_failures_counts_this_run_only() -> None:
    report = RunReport("r")
    report.count(STREAM, Resolution.ACCEPTED)
    report.count(STREAM, Resolution.DUPLICATE)
    report.count(STREAM, Resolution.PREVIOUSLY_DEAD_LETTERED)
    assert not report.has_failures()  # reported by the run that had it
    report.count(STREAM, Resolution.EXPIRED)
    assert report.has_failures()
    other = RunReport("r")
    other.count(STREAM, Resolution.DEAD_LETTERED, "confirmation")
    assert other.has_failures()


def test_summary_json_round_trip() -> None:
    _, data = summary_of(filled_report())
    line = json.dumps({"summary": data})  # how the target writes the final line
    assert line.startswith('{"summary":')
    back = json.loads(line)
    assert back == {"summary": data}
    summary = back["summary"]
    assert summary["run_id"] == "run-42"
    assert summary["exit_code"] == 2
    assert summary["elapsed_seconds"] == 23.456
    assert summary["records"] == 309
    assert summary["streams"][STREAM] == {
        "accepted": 291,
        "duplicates": 4,
        "dead_lettered": 10,
        "dead_lettered_by_stage": {
            "validation": 7,
            "api": 0,
            "ambiguous": 1,
            "confirmation": 0,
            "expired": 2,
        },
        "expired": 2,
        "previously_dead_lettered": 1,
        "would_send": 0,
    }
    assert summary["totals"]["accepted"] == 292
    assert summary["totals"]["dead_lettered_by_stage"]["confirmation"] == 1
    assert summary["dead_letters"] == {"path": "output/dead-letters.jsonl", "written": 12}
    assert summary["ledger"] == "sqlite:////srv/output/ledger.sqlite"
    assert list(summary["http"]) == [
        "requests",
        "retries",
        "ambiguous_sends",
        "throttled",
        "throttle_wait_seconds",
        "token_requests",
        "rejections",
        "custom_a",
        "custom_b",
    ]
    assert summary["http"]["throttle_wait_seconds"] == 7.5


def test_every_summary_line_reads_without_its_indentation() -> None:
    # Meltano strips leading blanks: a stage row must still say what it counts.
    lines, _ = summary_of(filled_report())
    stripped = [line.strip() for line in lines]
    assert f"stream {STREAM}:" in stripped
    assert "all streams:" in stripped
    stage_rows = [line for line in stripped if "(validation)" in line or "(expired)" in line]
    assert stage_rows
    assert all(line.startswith("dead-lettered, ") for line in stage_rows)


def test_counts_read_in_the_singular_for_one() -> None:
    report = RunReport("r")
    report.count(STREAM, Resolution.ACCEPTED)
    lines, _ = report.summary(
        dead_letter_path="d",
        dead_letters_written=0,
        ledger_location="l",
        http={},
        exit_code=0,
        elapsed=0.5,
    )
    assert ": 1 record in 0.5 s" in lines[0]
    assert plural(1, "key") == "1 key"
    assert plural(0, "key") == "0 keys"
    assert plural(1234, "record") == "1,234 records"


def test_confirmation_dead_letters_are_in_the_totals() -> None:
    # 21 dead letters counted while reading, 39 failed at Catena after it had accepted them:
    # the summary must say 60, as many as the dead-letter file got.
    report = RunReport("r")
    for _ in range(60):
        report.count(STREAM, Resolution.ACCEPTED)
    for _ in range(20):
        report.count(STREAM, Resolution.DEAD_LETTERED, "validation")
    report.count(STREAM, Resolution.EXPIRED)
    confirmation = {
        "confirmed": 21,
        "failed": 39,
        "pending": 0,
        "streams": {STREAM: {"confirmed": 21, "failed": 39, "pending": 0}},
    }
    lines, data = report.summary(
        dead_letter_path="d",
        dead_letters_written=60,
        ledger_location="l",
        http={},
        exit_code=2,
        elapsed=1.0,
        confirmation=confirmation,
    )
    for figures in (data["totals"], data["streams"][STREAM]):
        assert figures["dead_lettered"] == 60 == data["dead_letters"]["written"]
        assert figures["dead_lettered_by_stage"]["confirmation"] == 39
        assert figures["dead_lettered_by_stage"]["expired"] == figures["expired"] == 1
    assert data["records"] == 81  # a record failed at Catena is still one record
    assert data["confirmation"] == confirmation
    assert row(lines, "dead-lettered, failed at Catena after queueing").split()[-1] == "39"


def test_emit_summary_logs_each_line_with_the_figures_then_writes_the_json_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    written: list[str] = []
    log = logging.getLogger("test.summary")
    confirmation = {
        "confirmed": 1,
        "failed": 1,
        "pending": 0,
        "streams": {STREAM: {"confirmed": 1, "failed": 1, "pending": 0}},
    }
    with caplog.at_level(logging.INFO, logger="test.summary"):
        lines, summary = filled_report().summary(
            dead_letter_path="output/dead-letters.jsonl",
            dead_letters_written=13,
            ledger_location="l",
            http=HTTP,
            exit_code=2,
            elapsed=23.456,
            confirmation=confirmation,
        )
        data = emit_summary(lines, summary, log=log, write_line=written.append)
    assert written == [json.dumps({"summary": data}, separators=(",", ":"))]
    records = [r for r in caplog.records if r.name == "test.summary"]
    assert records[0].getMessage().startswith("Catena delivery summary, run run-42")
    assert {r.levelno for r in records} == {logging.WARNING}  # exit code 2: worth a look
    first = records[0].__dict__
    assert first["catena_summary"] == data
    assert (first["accepted"], first["dead_lettered"], first["dead_letters_written"]) == (
        292,
        13,
        13,
    )
    assert first["exit_code"] == 2
    texts = [r.getMessage() for r in records]
    assert "confirmation: failed at Catena (dead-lettered)" in texts[-2]
    assert all("\n" not in text for text in texts)


CONN_OK = "11111111-1111-4111-8111-111111111111"
CONN_FAILING = "22222222-2222-4222-8222-222222222222"


def test_a_real_run_counts_confirmation_failures_as_dead_letters(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    box = sandbox_factory(
        {"operations": {"complete_after_seconds": 0, "fail": {"connection_id": CONN_FAILING}}}
    )
    records = [
        {"id": i, "connection_id": conn, "source_recipient_ids": [f"d{i}"], "message_text": "Go"}
        for i, conn in enumerate([CONN_OK, CONN_OK, CONN_FAILING, CONN_FAILING], 1)
    ]
    records.append({"id": 5, "connection_id": CONN_OK, "message_text": " "})  # invalid
    result = run_target(
        tmp_path,
        sandbox_config(box.url, confirm_operations=True, confirm_timeout_seconds=60),
        singer_lines(STREAM, records),
    )
    assert result.returncode == 2, result.stderr
    assert result.summary is not None
    assert len(result.dead_letters) == 3
    for figures in (result.summary["totals"], result.summary["streams"][STREAM]):
        assert figures["dead_lettered"] == 3 == result.summary["dead_letters"]["written"]
        assert figures["dead_lettered_by_stage"]["confirmation"] == 2
        assert figures["dead_lettered_by_stage"]["validation"] == 1
    assert result.summary["confirmation"]["failed"] == 2
