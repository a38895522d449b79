"""singer-sdk's 16 standard target tests, against the real target and the sandbox over loopback.

The bundled test streams are generic tables, not driver messages: none has ``message_text``, so
unconfigured, every one would stop at SCHEMA time (the body rules: a stream that cannot produce a
message is a fatal configuration error). The suite is therefore configured as a user would
configure a stream that should notify drivers: a stream map per stream that says what the
message text is, ``default_connection_id`` for the Catena connection, and
``allow_body_hash_keys`` for the streams that have no key properties. The sandbox accepts every
well-formed body, so a test passes only if the target really built, validated and POSTed them.

Each of the 16, with its outcome (checked after every test) and why:

 1. array_data: 4 accepted; the text joins the ``fruits`` array.
 2. camelcase: 2 accepted; text from ``clientName``, keyed by ``Id``.
 3. camelcase_complex_schema: nothing sent; two SCHEMA messages and no record, and the mapped
    text passes the SCHEMA check.
 4. cli_prints: passes; version and about need no stream.
 5. duplicate_records: 2 accepted; a key seen again in one run is a duplicate, not a resend.
 6. encoded_string_data: 28 accepted; Greek, Chinese, escapes and control characters reach
    Catena unchanged.
 7. invalid_schema: raises InvalidInputLine, as expected; a SCHEMA without ``properties``
    cannot describe a message, and the input is refused before anything is sent.
 8. no_primary_keys: 3 accepted; no key properties, so keyed by body hash
    (``allow_body_hash_keys``).
 9. optional_attributes: 2 accepted, 2 dead letters; rows without ``optional`` have no text, so
    they are dead-lettered (stage validation), never sent.
10. pk_updates: 2 accepted; its ``key_properties`` sit inside the schema object, so the stream
    has none: body hash keys.
11. record_before_schema: raises RecordsWithoutSchemaException, as expected (singer-sdk).
12. record_missing_key_property: raises MissingKeyPropertiesError, as expected; its map gives it
    text, so its SCHEMA passes and the record without ``id`` is refused.
13. record_missing_fields: 1 accepted, 1 dead letter; as optional_attributes.
14. schema_no_properties: 4 accepted; text from the nested object, body hash keys.
15. schema_updates: 6 accepted; each changed SCHEMA retires the sink and every batch is still
    delivered.
16. special_chars_in_attributes: 1 accepted; a stream named with ``:!?`` maps like any other.

None is xfailed. Every bundled stream can be made a message stream by configuration; the three
that must fail do so for their own reason, before anything is sent. Without a stream map a stream
stops at its SCHEMA with a ConfigError naming the missing ``message_text`` (checked below). The
counts are checked against the sandbox and the dead-letter file after every test.

The standard tests call ``process_lines`` in-process: they see the exception, not what the CLI
does with it. ``test_cli_*`` run the real CLI on the three failing files: exit 1, a ``fatal:``
line naming the cause, no traceback, nothing sent, and the safe STATE when a tap STATE came
before the failure, with one line naming the input line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from singer_sdk.testing import get_target_test_class
from singer_sdk.testing.runners import TargetTestRunner

from target_catena_messages.sandbox.server import Sandbox
from target_catena_messages.singer.target import TargetCatenaMessages
from tests.harness import run_target, sandbox_config

CONNECTION_ID = "3b6f7f2e-5d0a-4c1b-9f8e-2a7c4d9e1b10"

# What a user would write for each stream: where the message text comes from.
STREAM_MAPS: dict[str, dict[str, Any]] = {
    "test_array_data": {"message_text": "'Fruit run: ' + ', '.join(fruits)"},
    "TestCamelcase": {"message_text": "clientName"},
    "ForecastingTypeToCategory": {"message_text": "'Forecast category ' + str(Id)"},
    "test_duplicate_records": {"message_text": "'Metric now ' + str(metric)"},
    "test_strings": {"message_text": "info"},
    "test_strings_in_objects": {"message_text": "info['name'] + ': ' + info['value']"},
    "test_strings_in_arrays": {"message_text": "' / '.join(strings)"},
    "test_no_pk": {"message_text": "'Metric now ' + str(metric)"},
    "test_optional_attributes": {"message_text": "record.get('optional')"},
    "example_stream": {"message_text": "'Hello ' + name"},
    "test_record_missing_key_property": {"message_text": "'Metric now ' + str(metric)"},
    "record_missing_fields": {"message_text": "record.get('optional')"},
    "test_object_schema_with_properties": {
        "message_text": "'Store metric ' + str(object_store['metric'])"
    },
    "test_object_schema_no_properties": {
        "message_text": "'Store metric ' + str(object_store['metric'])"
    },
    "test_schema_updates": {"message_text": "a2"},
    "test:SpecialChars!in?attributes": {"message_text": "'Agent env ' + d['env']"},
}

BASE_CONFIG: dict[str, Any] = {
    "client_id": "standard-tests",
    "client_secret": "standard-tests-secret-0123456789",
    "default_connection_id": CONNECTION_ID,
    "allow_body_hash_keys": True,
    "stream_maps": STREAM_MAPS,
}

# test name -> (bodies Catena accepted, dead letters written): the table in the docstring.
EXPECTED: dict[str, tuple[int, int]] = {
    "array_data": (4, 0),
    "camelcase": (2, 0),
    "camelcase_complex_schema": (0, 0),
    "cli_prints": (0, 0),
    "duplicate_records": (2, 0),
    "encoded_string_data": (28, 0),
    "invalid_schema": (0, 0),
    "no_primary_keys": (3, 0),
    "optional_attributes": (2, 2),
    "pk_updates": (2, 0),
    "record_before_schema": (0, 0),
    "record_missing_key_property": (0, 0),
    "record_missing_fields": (1, 1),
    "schema_no_properties": (4, 0),
    "schema_updates": (6, 0),
    "special_chars_in_attributes": (1, 0),
}

StandardTargetTests = get_target_test_class(TargetCatenaMessages, config=BASE_CONFIG)


def _bundled(name: str) -> list[str]:
    streams = resources.files("singer_sdk.testing") / "target_test_streams"
    return (streams / f"{name}.singer").read_text(encoding="utf-8").splitlines()


def _records(name: str, stream: str) -> list[dict[str, Any]]:
    messages = [json.loads(line) for line in _bundled(name) if line.strip()]
    return [m["record"] for m in messages if m["type"] == "RECORD" and m["stream"] == stream]


class TestTargetCatenaMessagesStandard(StandardTargetTests):  # type: ignore[misc,valid-type]
    """The standard suite with one sandbox per class and a fresh ledger per test."""

    @pytest.fixture(scope="class")
    @classmethod
    def resource(cls) -> Iterator[Sandbox]:
        with Sandbox() as sandbox:
            yield sandbox

    @pytest.fixture
    def runner(self, resource: Sandbox, tmp_path: Path) -> TargetTestRunner:
        config = {
            **sandbox_config(resource.url),
            **BASE_CONFIG,
            "ledger_url": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
            "dead_letter_path": str(tmp_path / "dead-letters.jsonl"),
        }
        # parse_env_config off: a developer's TARGET_CATENA_MESSAGES_* must not leak in.
        return TargetTestRunner(TargetCatenaMessages, config=config, parse_env_config=False)

    @pytest.fixture(autouse=True)
    def _outcomes(
        self, request: pytest.FixtureRequest, resource: Sandbox, tmp_path: Path
    ) -> Iterator[None]:
        """After each standard test: what Catena got and what was dead-lettered, as documented."""
        before = len(resource.accepted_bodies())
        yield
        name = request.node.name.removeprefix("test_target_")
        accepted, dead = EXPECTED[name]
        bodies = resource.accepted_bodies()[before:]
        assert len(bodies) == accepted, (name, bodies)
        assert {b["connection_id"] for b in bodies} <= {CONNECTION_ID}
        dead_file = tmp_path / "dead-letters.jsonl"
        letters = dead_file.read_text().splitlines() if dead_file.exists() else []
        assert len(letters) == dead, (name, letters)
        for letter in map(json.loads, letters):
            assert letter["stage"] == "validation"
            assert letter["errors"][0]["field"] == "message_text"
        if name == "encoded_string_data":
            texts = {b["message_text"] for b in bodies}
            assert {r["info"] for r in _records(name, "test_strings")} <= texts


def test_a_stream_without_message_text_stops_at_its_schema_naming_the_fix(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    config = {**sandbox_config(sandbox.url), **BASE_CONFIG, "stream_maps": {}}
    result = run_target(tmp_path, config, _bundled("camelcase"))
    assert result.returncode == 1, result.stderr
    fatal = [line for line in result.stderr.splitlines() if "fatal:" in line]
    assert len(fatal) == 1, result.stderr
    assert "'TestCamelcase' cannot be loaded" in fatal[0]
    assert "no 'message_text' property (its fields: Id, clientName)" in fatal[0]
    assert sandbox.accepted_bodies() == []


FAILING = [
    ("invalid_schema", "properties", 1),
    ("record_before_schema", "'test_record_before_schema' was encountered before", 1),
    ("record_missing_key_property", "missing one or more key_properties", 2),
]


@pytest.mark.parametrize(("name", "cause", "line"), FAILING)
def test_cli_standard_streams_that_must_fail_exit_1_and_send_nothing(
    tmp_path: Path, sandbox: Sandbox, name: str, cause: str, line: int
) -> None:
    config = {**sandbox_config(sandbox.url), **BASE_CONFIG}
    result = run_target(tmp_path, config, _bundled(name))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    fatal = [text for text in result.stderr.splitlines() if "fatal:" in text]
    assert len(fatal) == 1, result.stderr
    assert cause in fatal[0]
    assert result.states == []
    assert result.summary is not None
    assert result.summary["exit_code"] == 1
    assert sandbox.accepted_bodies() == []
    assert config["client_secret"] not in result.stderr


def test_cli_fatal_mid_stream_writes_only_a_safe_state_and_a_rerun_sends_each_once(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """A fatal error after some batches went out: STATE never covers an unsent record.

    How many of the first batches were sent before the failure depends on timing (a fatal error
    stops queued sends), so the checks are the invariants: every STATE line's bookmark is
    covered by accepted records, and a rerun without the bad stream sends each record once.
    """
    good = _bundled("array_data")
    schema, records = good[0], good[1:5]
    state = '{{"type": "STATE", "value": {{"test_array_data": {}}}}}'
    lines = [schema, *records[:2], state.format(2), *records[2:], state.format(4)]
    # Batches of 2: the first records go out while the bad stream is still ahead.
    config = {**sandbox_config(sandbox.url), **BASE_CONFIG, "batch_size_rows": 2}
    failed = run_target(tmp_path, config, lines + _bundled("record_missing_key_property"))
    assert failed.returncode == 1, failed.stderr
    assert failed.summary is not None
    sent = len(sandbox.accepted_bodies())
    assert failed.summary["totals"]["accepted"] == sent
    by_text: dict[str, int] = {}
    for raw in records:
        fields = json.loads(raw)["record"]
        by_text["Fruit run: " + ", ".join(fields["fruits"])] = fields["id"]
    sent_ids = {by_text[body["message_text"]] for body in sandbox.accepted_bodies()}
    for line in failed.states:
        assert set(range(1, line["test_array_data"] + 1)) <= sent_ids, (line, sent_ids)

    rerun = run_target(tmp_path, config, lines)
    assert rerun.returncode == 0, rerun.stderr
    texts = sorted(body["message_text"] for body in sandbox.accepted_bodies())
    assert len(texts) == 4
    assert len(set(texts)) == 4
    assert rerun.last_state is not None
    assert rerun.last_state["test_array_data"] == 4
    assert rerun.last_state["target_catena_messages"]["totals"]["duplicates"] == sent


@pytest.mark.parametrize(
    ("name", "cause", "line"),
    [
        FAILING[0],
        FAILING[1],
        FAILING[2],
    ],
)
def test_cli_fatal_line_is_one_line_with_the_input_line_number(
    tmp_path: Path, sandbox: Sandbox, name: str, cause: str, line: int
) -> None:
    """Contract §7: one clear line naming the cause and the input line number."""
    config = {**sandbox_config(sandbox.url), **BASE_CONFIG}
    result = run_target(tmp_path, config, _bundled(name))
    lines = result.stderr.splitlines()
    at = next(i for i, text in enumerate(lines) if "fatal:" in text)
    assert lines[at].rstrip().endswith(f"(input line {line})"), lines[at : at + 2]
