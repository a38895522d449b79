"""Bad input: every kind gets one clear outcome, and nothing already delivered is lost or resent.

The outcome is either a dead letter (the run goes on) or exit 1 with ONE error line naming the
cause and the input line, no traceback, and a STATE that covers only records Catena accepted.
Fatal cases run with ``batch_size_rows: 1`` so records before the bad line really are sent
before it is read; a re-run of the repaired input must then send every record exactly once.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.harness import TargetResult, run_target, sandbox_config, singer_lines, state_line
from tests.test_crash import (
    STREAM,
    _key_of,
    copies_by_key,
    dispatch_record,
    position,
    reap_targets,  # noqa: F401 - autouse: kills leftover targets
    start_target,
    write_config,
)

BIG_STDERR = 64 * 1024  # logs are lines, not payloads: far below a 1 MB message


def schema_line(stream: str = STREAM, **extra: Any) -> str:
    props: dict[str, Any] = {name: {} for name in dispatch_record(1)}
    message = {
        "type": "SCHEMA",
        "stream": stream,
        "schema": {"type": "object", "properties": props},
    }
    return json.dumps({**message, "key_properties": ["id"], **extra})


def record_line(i: int, stream: str = STREAM, **fields: Any) -> str:
    record = dispatch_record(i) | fields
    return json.dumps({"type": "RECORD", "stream": stream, "record": record})


def good_lines(n: int) -> list[str]:
    """SCHEMA, then records 1..n each followed by a STATE at its position."""
    lines = [schema_line()]
    for i in range(1, n + 1):
        lines += [record_line(i), state_line(STREAM, i)]
    return lines


def run(tmp_path: Path, sandbox: Any, lines: list[str] | bytes, **settings: Any) -> TargetResult:
    return run_target(tmp_path, sandbox_config(sandbox.url, **settings), lines)


def error_lines(stderr: str) -> list[str]:
    """ERROR lines, without singer-sdk's generic one that names nothing.

    singer-sdk logs "Error initializing target sink" before re-raising a sink's setup error; the
    target's own line follows it.
    """
    return [
        line
        for line in stderr.splitlines()
        if ("| ERROR" in line or "| CRITICAL" in line)
        and "Error initializing target sink" not in line
    ]


def assert_one_clear_fatal(result: TargetResult, *needles: str) -> str:
    """Exit 1, one error line holding every needle, no traceback, a summary, small stderr."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1, errors
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert result.summary is not None
    assert len(result.stderr) < BIG_STDERR
    return errors[0]


def assert_safe_then_rerun_once(tmp_path: Path, sandbox: Any, result: TargetResult, n: int) -> None:
    """STATE covered only accepted records; the repaired input then sends each exactly once."""
    sent = copies_by_key(sandbox.accepted_bodies())
    for state in result.states:
        assert all(sent[str(i)] == 1 for i in range(1, position(state) + 1)), (state, sent)
    rerun = run(tmp_path, sandbox, good_lines(n), batch_size_rows=1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert copies_by_key(sandbox.accepted_bodies()) == Counter({str(i): 1 for i in range(1, n + 1)})
    assert rerun.last_state is not None
    assert position(rerun.last_state) == n


# -- fatal: the input itself is broken -----------------------------------------------------------


def test_malformed_json_line_is_fatal_naming_its_line(tmp_path: Path, sandbox: Any) -> None:
    lines = good_lines(3)
    lines.insert(5, '{"type": "RECORD", "stream": ')  # line 6
    result = run(tmp_path, sandbox, lines, batch_size_rows=1)
    assert_one_clear_fatal(result, "input line 6", "not valid JSON")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 3)


def test_truncated_last_line_is_fatal_naming_its_line(tmp_path: Path, sandbox: Any) -> None:
    lines = good_lines(3)
    data = ("\n".join(lines) + "\n").encode() + record_line(4).encode()[:37]  # line 8, no newline
    result = run(tmp_path, sandbox, data, batch_size_rows=1)
    assert_one_clear_fatal(result, "input line 8", "not valid JSON")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 3)


def _invalid_utf8_input() -> bytes:
    good = ("\n".join(good_lines(2)) + "\n").encode()
    return good + record_line(3, message_text="@@").encode().replace(b"@@", b"\xff\xfe") + b"\n"


def test_invalid_utf8_on_stdin_is_fatal_naming_its_line(tmp_path: Path, sandbox: Any) -> None:
    result = run(tmp_path, sandbox, _invalid_utf8_input(), batch_size_rows=1)
    assert_one_clear_fatal(result, "input line 6", "not valid UTF-8")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 2)


def test_invalid_utf8_in_input_file_is_fatal_naming_its_line(tmp_path: Path, sandbox: Any) -> None:
    """``--input FILE`` must name the same line as stdin does, not the start of a read buffer."""
    input_path = tmp_path / "input.jsonl"
    input_path.write_bytes(_invalid_utf8_input())
    config = write_config(tmp_path, sandbox.url, batch_size_rows=1)
    proc = start_target(tmp_path, config, input_path, "file")
    assert proc.proc.wait(60) == 1
    stderr = proc.stderr()
    assert "Traceback" not in stderr
    [error] = error_lines(stderr)
    assert "input line 6" in error, error
    assert "not valid UTF-8" in error, error


def _forty_then(bad: bytes) -> bytes:
    """SCHEMA, records 1..40, the tap's STATE after them, then ``bad`` (line 43)."""
    lines = [schema_line(), *(record_line(i) for i in range(1, 41)), state_line(STREAM, 40)]
    return ("\n".join(lines) + "\n").encode() + bad + b"\n"


def _next_input() -> list[str]:
    """What the tap sends next, resuming from the STATE after record 40."""
    return [schema_line(), *(record_line(i) for i in range(41, 61)), state_line(STREAM, 60)]


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (b'{"type": "RECORD", "stream": ', "not valid JSON"),
        (record_line(41, message_text="@@").encode().replace(b"@@", b"\xff\xfe"), "UTF-8"),
    ],
    ids=["malformed", "invalid-utf8"],
)
def test_bad_line_still_delivers_every_record_read_before_it(
    tmp_path: Path, sandbox: Any, bad: bytes, why: str
) -> None:
    """Records still waiting in the sink's batch when the bad line comes are sent, then covered.

    The default batch size keeps all 40 in the batch: nothing was dispatched before the bad line.
    """
    result = run(tmp_path, sandbox, _forty_then(bad))
    assert_one_clear_fatal(result, "input line 43", why)
    expected = Counter({str(i): 1 for i in range(1, 41)})
    assert copies_by_key(sandbox.accepted_bodies()) == expected
    assert result.last_state is not None
    assert result.last_state["bookmarks"] == {STREAM: {"replication_key_value": 40}}
    ours = result.last_state["target_catena_messages"]
    assert ours["totals"]["accepted"] == 40
    assert sorted(int(key) for _, key, _ in result.operations()) == list(range(1, 41))
    rerun = run(tmp_path, sandbox, _next_input())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert copies_by_key(sandbox.accepted_bodies()) == Counter({str(i): 1 for i in range(1, 61)})
    assert rerun.last_state is not None
    assert position(rerun.last_state) == 60


def test_a_failure_while_handing_over_still_ends_on_the_bad_line_with_safe_state(
    tmp_path: Path, sandbox: Any
) -> None:
    """The records before the bad line hold one that ``on_invalid_record: fail`` stops on.

    The bad line stays the one error; the invalid record is named in a warning; no STATE covers
    a record that was not accepted.
    """
    lines = [
        schema_line(),
        *(record_line(i) for i in range(1, 11)),
        state_line(STREAM, 10),
        record_line(11, priority="urgent"),
        record_line(12),
        state_line(STREAM, 12),
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"type": "RECORD", "str\n'  # line 16
    result = run(tmp_path, sandbox, data, on_invalid_record="fail")
    assert_one_clear_fatal(result, "input line 16", "not valid JSON")
    assert "(key 11)" in result.stderr
    assert "on_invalid_record: fail" in result.stderr
    sent = copies_by_key(sandbox.accepted_bodies())
    assert sent["11"] == 0
    for state in result.states:
        assert all(sent[str(i)] == 1 for i in range(1, position(state) + 1)), (state, sent)


def test_record_before_schema_is_fatal_naming_stream_and_line(tmp_path: Path, sandbox: Any) -> None:
    lines = [*good_lines(2), record_line(1, stream="other_stream")]
    result = run(tmp_path, sandbox, lines, batch_size_rows=1)
    assert_one_clear_fatal(result, "other_stream", "input line 6")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 2)


def test_unknown_message_type_is_fatal_naming_type_and_line(tmp_path: Path, sandbox: Any) -> None:
    lines = good_lines(2)
    lines.insert(3, json.dumps({"type": "RECORDS", "stream": STREAM}))  # line 4
    result = run(tmp_path, sandbox, lines, batch_size_rows=1)
    assert_one_clear_fatal(result, "RECORDS", "input line 4")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 2)


def test_batch_message_is_fatal_naming_batch_and_line(tmp_path: Path, sandbox: Any) -> None:
    batch = {
        "type": "BATCH",
        "stream": STREAM,
        "encoding": {"format": "jsonl", "compression": "gzip"},
        "manifest": [f"file://{tmp_path}/batch-0001.jsonl.gz"],
    }
    lines = good_lines(2)
    lines.insert(3, json.dumps(batch))  # line 4
    result = run(tmp_path, sandbox, lines, batch_size_rows=1)
    assert_one_clear_fatal(result, "BATCH", "input line 4")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 2)


def test_schema_without_properties_is_fatal_naming_stream_and_line(
    tmp_path: Path, sandbox: Any
) -> None:
    bare = {"type": "SCHEMA", "stream": "bare", "schema": {"type": "object"}, "key_properties": []}
    lines = [*good_lines(2), json.dumps(bare)]  # line 6
    result = run(tmp_path, sandbox, lines, batch_size_rows=1)
    assert_one_clear_fatal(result, "bare", "input line 6")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 2)


def test_schema_with_empty_properties_lists_what_is_missing(tmp_path: Path, sandbox: Any) -> None:
    empty = {"type": "SCHEMA", "stream": "empty", "schema": {"type": "object", "properties": {}}}
    lines = [*good_lines(2), json.dumps({**empty, "key_properties": ["id"]})]
    result = run(tmp_path, sandbox, lines, batch_size_rows=1)
    assert_one_clear_fatal(result, "empty", "message_text", "input line 6")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 2)


def test_nan_is_not_json_fatal_naming_its_line(tmp_path: Path, sandbox: Any) -> None:
    lines = good_lines(2)
    lines.insert(
        3, record_line(9, weight=0.5).replace("0.5", "NaN")
    )  # line 4, what json.dumps writes
    result = run(tmp_path, sandbox, lines, batch_size_rows=1)
    assert_one_clear_fatal(result, "input line 4", "not valid JSON")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 2)


def test_nesting_deeper_than_the_reader_can_go_is_fatal_naming_its_line(
    tmp_path: Path, sandbox: Any
) -> None:
    depth = 3000  # a Go or Rust tap can write this; a Python one cannot
    deep = '{"x":' * depth + "1" + "}" * depth
    lines = good_lines(2)
    lines.insert(3, record_line(9, extra="@@").replace('"@@"', deep))  # line 4
    result = run(tmp_path, sandbox, lines, batch_size_rows=1)
    assert_one_clear_fatal(result, "input line 4")
    assert_safe_then_rerun_once(tmp_path, sandbox, result, 2)


# -- handled: the run goes on -------------------------------------------------------------------


def test_activate_version_is_ignored_with_a_warning(tmp_path: Path, sandbox: Any) -> None:
    lines = good_lines(2)
    lines.insert(3, json.dumps({"type": "ACTIVATE_VERSION", "stream": STREAM, "version": 7}))
    result = run(tmp_path, sandbox, lines)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ACTIVATE_VERSION" in result.stderr
    assert copies_by_key(sandbox.accepted_bodies()) == Counter({"1": 1, "2": 1})


def test_one_megabyte_message_text_is_one_clear_outcome_and_never_logged(
    tmp_path: Path, sandbox: Any
) -> None:
    text = "[key=1] " + "manifest line; " * 70_000  # ~1 MB
    lines = [
        schema_line(),
        record_line(1, message_text=text),
        record_line(2),
        state_line(STREAM, 2),
    ]
    result = run(tmp_path, sandbox, lines)
    assert len(result.stderr) < BIG_STDERR
    assert "manifest line; manifest line;" not in result.stderr
    delivered = copies_by_key(sandbox.accepted_bodies())
    dead = {d["key"]: d for d in result.dead_letters}
    assert delivered["2"] == 1
    # Catena (here: the sandbox's 1 MiB body limit) may refuse it; then it is a dead letter
    # holding the whole record, and never both.
    assert (delivered["1"], "1" in dead) in ((1, False), (0, True))
    if "1" in dead:
        assert result.returncode == 2
        assert (dead["1"]["stage"], dead["1"]["status"]) == ("api", 413)
        assert dead["1"]["record"]["message_text"] == text
    else:
        assert result.returncode == 0
    assert result.last_state is not None
    assert position(result.last_state) == 2


def test_ten_thousand_recipients_are_sent_whole(tmp_path: Path, sandbox: Any) -> None:
    recipients = [f"driver-{n}" for n in range(10_000)]
    lines = [
        schema_line(),
        record_line(1, source_recipient_ids=recipients),
        state_line(STREAM, 1),
    ]
    result = run(tmp_path, sandbox, lines)
    assert result.returncode == 0, result.stderr[-3000:]
    [body] = sandbox.accepted_bodies()
    assert body["source_recipient_ids"] == recipients
    assert len(result.stderr) < BIG_STDERR


def _nested(depth: int) -> str:
    return '{"level":' * depth + '"bottom"' + "}" * depth


@pytest.mark.parametrize("depth", [50, 900])
def test_deeply_nested_extra_field_is_never_sent(tmp_path: Path, sandbox: Any, depth: int) -> None:
    lines = [
        schema_line(),
        record_line(1, extra="@@").replace('"@@"', _nested(depth)),
        record_line(2),
    ]
    result = run(tmp_path, sandbox, [*lines, state_line(STREAM, 2)])
    assert result.returncode == 0, result.stderr[-3000:]
    bodies = sandbox.accepted_bodies()
    assert len(bodies) == 2
    assert all("extra" not in body for body in bodies)


@pytest.mark.parametrize(
    "depth",
    [
        50,
        900,
    ],
)
def test_deeply_nested_invalid_record_is_a_dead_letter(
    tmp_path: Path, sandbox: Any, depth: int
) -> None:
    """Python taps write up to ~990 levels; the dead letter must hold such a record whole."""
    bad = record_line(1, extra="@@", priority="urgent").replace('"@@"', _nested(depth))
    lines = [schema_line(), bad, record_line(2), state_line(STREAM, 2)]
    result = run(tmp_path, sandbox, lines)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(result.stderr) < BIG_STDERR
    [dead] = result.dead_letters
    assert (dead["key"], dead["stage"]) == ("1", "validation")
    assert dead["record"]["extra"]["level"]["level"] is not None
    assert copies_by_key(sandbox.accepted_bodies()) == Counter({"2": 1})
    assert result.last_state is not None
    assert position(result.last_state) == 2


def test_huge_numbers_keep_their_digits_in_keys_and_fail_only_where_they_matter(
    tmp_path: Path, sandbox: Any
) -> None:
    huge = 10**40
    lines = [
        schema_line(),
        record_line(huge, message_text=f"[key={huge}] long id"),
        record_line(2).replace('"id": 2', '"id": 2, "temperature": 1e400'),
        record_line(3, message_text=huge),  # not a string: the body is invalid
        state_line(STREAM, 3),
    ]
    result = run(tmp_path, sandbox, lines)
    assert result.returncode == 2, result.stderr[-3000:]
    assert copies_by_key(sandbox.accepted_bodies()) == Counter({str(huge): 1, "2": 1})
    assert "temperature" not in sandbox.accepted_bodies()[1]
    assert sorted(key for _, key, _ in result.operations()) == sorted([str(huge), "2"])
    [dead] = result.dead_letters
    assert dead["key"] == "3"
    assert {e["field"] for e in dead["errors"]} == {"message_text"}


def test_empty_input_exits_0_with_no_state_and_only_the_preflight(
    tmp_path: Path, sandbox: Any
) -> None:
    result = run(tmp_path, sandbox, b"")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    assert result.summary is not None
    assert result.summary["records"] == 0
    # The preflight comes before input is read, so it cannot know the input is empty.
    assert sandbox.stats()["requests"] == {"token": 1, "operations": 1}


def test_input_with_only_state_passes_it_through(tmp_path: Path, sandbox: Any) -> None:
    tap_state = {"bookmarks": {STREAM: {"replication_key_value": 41}}, "currently_syncing": None}
    result = run(tmp_path, sandbox, [json.dumps({"type": "STATE", "value": tap_state})])
    assert result.returncode == 0, result.stderr[-3000:]
    [state] = result.states
    ours = state.pop("target_catena_messages")
    assert state == tap_state
    assert (ours["operations"], ours["dead_letters"]) == ([], [])
    assert sandbox.accepted_bodies() == []


def test_hundreds_of_streams_each_record_once(tmp_path: Path, sandbox: Any) -> None:
    streams = [f"fleet_{n:03d}-messages" for n in range(300)]
    lines: list[str] = []
    bookmarks: dict[str, Any] = {}
    for n, stream in enumerate(streams):
        rows = [dispatch_record(i) | {"message_text": f"[key={n}.{i}] hi"} for i in (1, 2)]
        lines += singer_lines(stream, rows)
        bookmarks[stream] = {"replication_key_value": 2}
        lines.append(json.dumps({"type": "STATE", "value": {"bookmarks": dict(bookmarks)}}))
    result = run(tmp_path, sandbox, lines, max_concurrency=16)
    assert result.returncode == 0, result.stderr[-3000:]
    copies = copies_by_key(sandbox.accepted_bodies())
    assert copies == Counter({f"{n}.{i}": 1 for n in range(300) for i in (1, 2)})
    assert result.last_state is not None
    assert result.last_state["bookmarks"] == bookmarks
    assert result.summary is not None
    assert set(result.summary["streams"]) == set(streams)
    assert result.last_state["target_catena_messages"]["totals"]["accepted"] == 600
    assert all(re.fullmatch(r"\d+\.[12]", _key_of(b)) for b in sandbox.accepted_bodies())
