"""Every private singer-sdk API this target relies on, in one place, so an SDK upgrade is one check.

singer-sdk has no public hook for what this target must own (STATE, signals, exit codes, a lean
per-record path, line-numbered input errors, ``--config ENV`` outside the CLI), so the product
uses a few private names. Each is listed in :data:`HOOKS` with the SDK behaviour it relies on;
``tests/test_sdk_compat.py`` fails when the installed SDK is outside :data:`SDK_CHECKED` or any
hooked signature changed. Everything here was checked against singer-sdk 0.54.9 (read from its
source): on an upgrade, re-read each hook's SDK code, then widen :data:`SDK_CHECKED` and the pin
in pyproject.toml together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import IO, Any, NamedTuple

from singer_sdk.configuration._dict_config import parse_environment_config
from singer_sdk.contrib.msgspec import MsgSpecReader, decoder

SDK_CHECKED = ">=0.54.9,<0.55"
"""The singer-sdk versions whose code every hook below was checked against."""


class Hook(NamedTuple):
    """One private SDK name the product uses, and what it relies on."""

    owner: str  # dotted path of the module or class that defines it
    name: str
    parameters: tuple[str, ...] | None  # a callable's parameter names; None for an attribute
    relies_on: str


HOOKS: tuple[Hook, ...] = (
    # -- here ---------------------------------------------------------------------------------
    Hook(
        "singer_sdk.configuration._dict_config",
        "parse_environment_config",
        ("config_schema", "prefix", "dotenv_path"),
        "reads <PREFIX><SETTING> variables (and .env) typed by the schema, as --config ENV does",
    ),
    Hook(
        "singer_sdk.contrib.msgspec",
        "decoder",
        None,
        "the SDK's msgspec decoder: floats as Decimal, like the SDK's own readers",
    ),
    Hook(
        "singer_sdk.singerlib.encoding.base.GenericSingerReader",
        "process_lines",
        ("self", "file_input", "callbacks"),
        "the read loop LeanReader replaces: decode, require type, dispatch, count by type",
    ),
    Hook(
        "singer_sdk.singerlib.encoding.base.GenericSingerReader",
        "_process_unknown_message",
        ("self", "message_dict"),
        "raises ValueError for a message type without a callback",
    ),
    Hook(
        "singer_sdk.singerlib.encoding.base.GenericSingerReader",
        "_current_message",
        None,
        "the line being processed, set by the read loop before decoding it",
    ),
    # -- target.py ----------------------------------------------------------------------------
    Hook(
        "singer_sdk.Target",
        "_write_state_message",
        ("self", "state"),
        "drain_all writes STATE only through it: a no-op override silences the SDK's STATE",
    ),
    Hook(
        "singer_sdk.Target",
        "_process_state_message",
        ("self", "message_dict"),
        "called once per tap STATE, in input order",
    ),
    Hook(
        "singer_sdk.Target",
        "_process_record_message",
        ("self", "message_dict"),
        "called once per RECORD; the lean path replaces its steps for identity-mapped streams",
    ),
    Hook(
        "singer_sdk.Target",
        "_process_schema_message",
        ("self", "message_dict"),
        "creates or replaces the stream's sink in _sinks_active",
    ),
    Hook(
        "singer_sdk.Target",
        "_process_batch_message",
        ("self", "message_dict"),
        "called once per BATCH message",
    ),
    Hook(
        "singer_sdk.Target",
        "_handle_termination",
        ("self", "signum", "frame"),
        "the SIGTERM/SIGINT handler (the SDK's drains, writes STATE and exits 0)",
    ),
    Hook(
        "singer_sdk.Target",
        "_handle_max_record_age",
        ("self",),
        "drains every sink when the oldest record waited too long",
    ),
    Hook(
        "singer_sdk.Target",
        "_MAX_RECORD_AGE_IN_MINUTES",
        None,
        "the drain interval _handle_max_record_age compares against",
    ),
    Hook(
        "singer_sdk.Target",
        "_sinks_active",
        None,
        "stream name to its current sink",
    ),
    Hook(
        "singer_sdk.Target",
        "_last_full_drain_at",
        None,
        "time.time() of the last drain_all, what the record age is measured from",
    ),
    Hook(
        "singer_sdk.plugin_base",
        "_ConfigInput",
        ("config", "parse_env"),
        "what the CLI passes to invoke: merged --config files and whether ENV was given",
    ),
    # -- sinks.py -----------------------------------------------------------------------------
    Hook(
        "singer_sdk.sinks.Sink",
        "_parse_timestamps_in_record",
        ("self", "record", "schema", "treatment"),
        "turns top-level date-time strings into datetimes; a no-op override keeps tap values",
    ),
    Hook(
        "singer_sdk.sinks.Sink",
        "_singer_validate_message",
        ("self", "record"),
        "raises MissingKeyPropertiesError for a record without a key property",
    ),
    Hook(
        "singer_sdk.sinks.Sink",
        "_total_records_read",
        None,
        "what tally_record_read adds to, read by the SDK's summary",
    ),
    Hook(
        "singer_sdk.sinks.Sink",
        "_batch_records_read",
        None,
        "what tally_record_read adds to and mark_drained tallies and resets; current_size "
        "reads it, and drain_one skips a sink at 0 (a sink whose records a sibling dispatched)",
    ),
)


def environment_config(schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Settings from ``<prefix><SETTING>`` environment variables, typed as the target's CLI does.

    The operator commands accept ``--config ENV`` like the target, and must read the same
    variables the same way, so they use the SDK's own parser.
    """
    return parse_environment_config(schema, prefix)


decode_line: Callable[[str], Any] = decoder.decode
"""The SDK's msgspec decoder (floats as Decimal): the records the sinks get are typed alike."""


class LeanReader(MsgSpecReader):
    """singer-sdk's msgspec reader with its read loop made cheaper per line."""

    def process_lines(
        self,
        file_input: IO[str] | None,
        callbacks: dict[str, Callable[[dict[str, Any]], None]],
    ) -> Counter[str]:
        """singer-sdk's loop, with the per-line checks folded into one place.

        The same steps and errors as ``GenericSingerReader.process_lines`` (decode, require
        ``type``, call the callback or ``_process_unknown_message``, count by type), minus
        two calls and a set per line: this loop runs once per record.
        """
        stats: dict[Any, int] = {}
        deserialize = self.deserialize_json
        for line in file_input or self.default_input:
            self._current_message = line
            line_dict = deserialize(line)
            record_type: Any = line_dict.get("type")
            if record_type is None and "type" not in line_dict:
                self.assert_line_requires(line_dict, requires={"type"})  # raises, as the SDK
            if callback := callbacks.get(record_type):
                callback(line_dict)
            else:
                self._process_unknown_message(line_dict)
            stats[record_type] = stats.get(record_type, 0) + 1
        return Counter(stats)
