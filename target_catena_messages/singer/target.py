"""The singer-sdk Target: settings, sink wiring, and the only place that touches SDK internals.

singer-sdk writes STATE on its own every 5 minutes, none on failure, and exits 0 on SIGTERM. None of
that is safe for a loader whose every record is a message to a driver, so this class takes STATE,
signals and exit codes away from the SDK and gives them to the Run:

- ``_write_state_message`` is a no-op; the Run writes STATE once outcomes are durable;
- a tap STATE is tied to the records read before it (``_process_state_message``);
- ``invoke`` turns every ending into the README's exit codes, with one clear line and the safe
  STATE on a fatal error.

It also takes the per-record path: singer-sdk's ``_process_record_message`` copies, maps, cleans,
validates, contexts, counts and logs every record, which cost more than everything this target does
with it. Where a stream has no stream map and no record metadata, a RECORD goes straight from the
reader to its sink (``_process_record_message``), keeping what the SDK's path promises: RECORD
before SCHEMA is an error, a record missing a key property is an error, ``_sdc_*`` fields are
dropped, a full sink drains, old records drain, counts and the record-count metric stay right.
"""

from __future__ import annotations

import difflib
import io
import logging
import re
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import IO, Any, ClassVar

from singer_sdk import Target
from singer_sdk.exceptions import (
    MapExpressionError,
    MissingKeyPropertiesError,
    RecordsWithoutSchemaException,
)
from singer_sdk.helpers.capabilities import CapabilitiesEnum, PluginCapabilities
from singer_sdk.mapper import SameRecordTransform
from singer_sdk.plugin_base import _ConfigInput
from singer_sdk.singerlib.exceptions import InvalidInputLine

from target_catena_messages import jsonutil
from target_catena_messages.body.record import is_redrive_schema
from target_catena_messages.errors import FatalError, FatalKind, Interrupted
from target_catena_messages.pipeline.run import Run
from target_catena_messages.redact import Redactor
from target_catena_messages.settings import SETTINGS_SCHEMA, Settings
from target_catena_messages.singer.reader import MessageReader
from target_catena_messages.singer.sinks import DEFAULT_BATCH_ROWS, MessagesSink
from target_catena_messages.tuning import tune_gc, tune_malloc

logger = logging.getLogger("target_catena_messages")

# Input problems that end the run with one line naming the cause (and the input line).
_INPUT_ERRORS = (
    InvalidInputLine,
    RecordsWithoutSchemaException,
    MissingKeyPropertiesError,
    UnicodeError,
)


def _is_input_error(exc: BaseException) -> bool:
    """The input itself is broken (not a signal, a delivery failure or an admission decision).

    Only then are the records read before the cause delivered first: an ``on_invalid_record:
    fail`` or a refused credential must not send more.
    """
    return isinstance(exc, _INPUT_ERRORS) or (
        isinstance(exc, ValueError) and not isinstance(exc, FatalError)
    )


# What the SDK's ``_remove_sdc_metadata_from_record`` drops from every record (singer-sdk 0.54).
_SDC_FIELDS = frozenset(
    (
        "_sdc_extracted_at",
        "_sdc_received_at",
        "_sdc_batched_at",
        "_sdc_deleted_at",
        "_sdc_sequence",
        "_sdc_table_version",
        "_sdc_sync_started_at",
    )
)


_NOT_OFFERED = ("load_method", "faker_config")


def _write_stdout(value: dict[str, Any]) -> None:
    sys.stdout.write(jsonutil.dumps(value) + "\n")
    sys.stdout.flush()


class TargetCatenaMessages(Target):
    """Delivers driver messages to Catena Telematics, exactly once, with proof."""

    name = "target-catena-messages"
    config_jsonschema = SETTINGS_SCHEMA
    default_sink_class = MessagesSink
    message_reader_class = MessageReader
    # No schema flattening (it would turn source_recipient_ids into a string), and no
    # validate-records: records are validated against Catena's body, not the tap's schema.
    capabilities: ClassVar[list[CapabilitiesEnum]] = [
        PluginCapabilities.ABOUT,
        PluginCapabilities.STREAM_MAPS,
        PluginCapabilities.STRUCTURED_LOGGING,
    ]
    # Drain every minute: records waiting in a sink buffer flow, and STATE stays fresh.
    _MAX_RECORD_AGE_IN_MINUTES = 1.0

    write_state: Callable[[dict[str, Any]], None] = staticmethod(_write_stdout)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_parallelism = 1  # delivery is concurrent already; batches go one at a time
        self.settings = Settings.from_config(self.config)
        self.redactor = Redactor(self.settings.secrets)
        self.redactor.install()
        self.batch_size = int(self.config.get("batch_size_rows") or DEFAULT_BATCH_ROWS)
        self.run = Run(
            self.settings,
            write_state=self.write_state,
            redactor=self.redactor,
            batch_size=self.batch_size,
        )
        self.exit_code: int | None = None
        self._input_done = False
        # Streams whose records take the lean path, to their sink (see _route_stream).
        self._direct: dict[str, MessagesSink] = {}
        self.message_sinks: list[MessagesSink] = []
        """Every sink made, replaced ones included: they share the run's batch (see sinks.py)."""
        self._max_age_seconds = 60 * self._MAX_RECORD_AGE_IN_MINUTES

    @classmethod
    def append_builtin_config(cls, config_jsonschema: dict[str, Any]) -> None:
        """The SDK's built-in settings, less those that mean nothing here.

        ``load_method``: a message is sent once, there is nothing to upsert or overwrite.
        ``faker_config``: needs singer-sdk's faker extra, which this target does not install.
        Left out, they are not offered in ``--about`` (so not in Meltano or the Hub either).
        """
        super().append_builtin_config(config_jsonschema)
        for name in _NOT_OFFERED:
            config_jsonschema.get("properties", {}).pop(name, None)

    # -- STATE: ours, not the SDK's ------------------------------------------------------------

    def _write_state_message(self, state: dict[str, Any]) -> None:
        """The SDK must never write STATE: a drain does not mean the messages were accepted."""

    def _process_state_message(self, message_dict: dict[str, Any]) -> None:
        super()._process_state_message(message_dict)
        self.run.add_tap_state(message_dict["value"])

    def _process_batch_message(self, message_dict: dict[str, Any]) -> None:
        """BATCH files cannot be claimed record by record before they are read: refuse them."""
        raise FatalError(
            f"BATCH messages (stream {message_dict.get('stream')!r}) are not supported: "
            "configure the tap to send RECORD messages",
            kind=FatalKind.INPUT,
        )

    def process_endofpipe(self) -> None:
        """End of input: drain the sinks, wait for every outcome, final STATE and summary."""
        self._input_done = True
        super().process_endofpipe()
        self.exit_code = self.run.finish()

    # -- signals and endings -----------------------------------------------------------------

    def _handle_termination(self, signum: int, frame: FrameType | None) -> None:
        """Stop taking records; the fatal path finishes in-flight sends and writes safe STATE."""
        name = signal.Signals(signum).name
        if self.run.stop_requested:  # a second signal while shutting down: keep shutting down
            logger.warning("%s received again; still finishing in-flight sends", name)
            return
        self.run.stop_requested = True
        if self.run.delivery is not None:
            self.run.delivery.stop()
        if not self.run.critical:
            raise Interrupted(f"interrupted by {name}")

    def run_to_end(self, file_input: IO[str] | None = None) -> int:
        """Read all input and return the exit code; a fatal error writes the safe STATE first.

        The preflight (token and a size-1 operation-list read) comes before the first line is
        read: wrong URLs or credentials end the run with nothing read and nothing claimed.
        """
        try:
            self.run.preflight()
            self.listen(file_input)
        except (FatalError, *_INPUT_ERRORS, ValueError) as exc:
            logger.error("%s", self._describe(exc))  # noqa: TRY400 - one line, no traceback
            logger.debug("details", exc_info=True)
            kind = None
            if _is_input_error(exc):
                kind = FatalKind.INPUT
                self._hand_over_what_was_read()
            return self.run.abort(exc, drain=not isinstance(exc, Interrupted), kind=kind)
        except Exception as exc:
            logger.error("unexpected error: %s: %s", type(exc).__name__, exc)  # noqa: TRY400
            logger.debug("details", exc_info=True)
            return self.run.abort(exc)
        return self.exit_code if self.exit_code is not None else 0

    def _hand_over_what_was_read(self) -> None:
        """Bad input: the records read before the bad line still go out, then the run ends.

        They are valid and the tap sent them; left in a sink's batch they would be neither sent
        nor covered by STATE, and the next run would need the tap to send them again. A failure
        here (a signal, a refused credential) must not hide the bad line: it is logged, and the
        run still ends on the fatal path with the newest safe STATE.
        """
        try:
            self.drain_all()
        except Exception as exc:  # the bad line stays the cause of the exit
            logger.warning(
                "the records read before it were not all handed over: %s",
                " ".join(str(exc).split()) or type(exc).__name__,
            )
            logger.debug("details", exc_info=True)

    def _describe(self, exc: BaseException) -> str:
        """One line naming the cause, and the input line when reading it caused the error."""
        text = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the source
        line = getattr(self.message_reader, "line_number", None)
        delivery = self.run.delivery
        from_input = not self._input_done and (delivery is None or delivery.fatal is None)
        if from_input and line and "input line" not in text:
            return f"fatal: {text} (input line {line})"
        return f"fatal: {text}"

    def _process_schema_message(self, message_dict: dict[str, Any]) -> None:
        """A SCHEMA without properties cannot describe a message: say which stream."""
        schema = message_dict.get("schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
            raise InvalidInputLine(
                f"SCHEMA for stream {message_dict.get('stream')!r} has no properties object"
            )
        if is_redrive_schema(message_dict):
            self._register_unmapped(message_dict)
        else:
            super()._process_schema_message(message_dict)
        self._route_stream(message_dict["stream"])

    def _register_unmapped(self, message_dict: dict[str, Any]) -> None:
        """A re-drive stream gets the identity map, whatever ``stream_maps`` says.

        Its records are dead letters, mapped already when they failed: mapping them again would
        change them (or drop them, with ``__else__: __NULL__``). Registered as the SDK would,
        so a repeated SCHEMA is a no-op and a changed one replaces the sink.
        """
        stream = message_dict["stream"]
        schema = message_dict["schema"]
        keys = message_dict.get("key_properties")
        current = self.mapper.stream_maps.get(stream)
        if (
            current
            and type(current[0]) is SameRecordTransform
            and current[0].raw_schema == schema
            and current[0].raw_key_properties == keys
        ):
            return
        self.mapper.stream_maps[stream] = [
            SameRecordTransform(
                stream, schema, keys, flattening_options=self.mapper.flattening_options
            )
        ]
        self.get_sink(stream, schema=schema, key_properties=keys)

    # -- records: the lean path ----------------------------------------------------------------

    def _route_stream(self, stream_name: str) -> None:
        """After a SCHEMA: may this stream's records skip the SDK's record path?

        Only when the SDK's path would hand the sink the record as read: the stream's one map is
        the identity (no ``stream_maps`` entry, no alias, no flattening) and no ``_sdc_*``
        metadata is to be added. Anything else keeps the SDK's path, unchanged.
        """
        self._direct.pop(stream_name, None)
        maps = self.mapper.stream_maps.get(stream_name) or []
        if len(maps) != 1:
            return
        only = maps[0]
        sink = self._sinks_active.get(stream_name)
        if (
            type(only) is SameRecordTransform
            and only.stream_alias == stream_name
            and not only.flattening_enabled
            and isinstance(sink, MessagesSink)
            and not sink.include_sdc_metadata_properties
        ):
            self._direct[stream_name] = sink

    def _process_record_message(self, message_dict: dict[str, Any]) -> None:
        """A RECORD straight to its sink; streams the lean path does not fit go the SDK's way.

        The SDK's steps this keeps, in its order: required keys, sink lookup (RECORD before
        SCHEMA raises there), ``_sdc_*`` fields dropped, key properties present, tally, the
        sink's ``process_record``, drain when full, drain when old. The ones it skips do
        nothing for this target: the shallow copy (nothing else reads the message), the
        identity map, the validator and timestamp parsing (both off in the sink), the batch
        context (a uuid4 per batch nobody reads) and a debug log line per record.
        """
        sink = self._direct.get(message_dict.get("stream"))  # type: ignore[arg-type]
        record = message_dict.get("record")
        if sink is None or type(record) is not dict:
            try:
                super()._process_record_message(message_dict)
            except MapExpressionError as exc:
                raise FatalError(self._map_expression_problem(message_dict, exc)) from exc
            return
        if not _SDC_FIELDS.isdisjoint(record):
            for name in _SDC_FIELDS.intersection(record):
                del record[name]
        for name in sink.key_names:
            if name not in record:
                sink._singer_validate_message(record)  # raises the SDK's own error
        if sink.take(record):
            self.logger.info(
                "Target sink for '%s' is full. Current size is '%s'. Draining...",
                sink.stream_name,
                len(self.run.buffered),
            )
            self.drain_one(sink)
        if time.time() - self._last_full_drain_at > self._max_age_seconds:
            self._handle_max_record_age()

    def _map_expression_problem(self, message_dict: dict[str, Any], exc: Exception) -> str:
        """What the SDK's "Failed to evaluate simpleeval expressions" leaves out.

        The stream, the setting and expression that failed, the name it does not know and the
        fields the record does have: a typo in a source column then reads as one.
        """
        stream = message_dict.get("stream")
        record = message_dict.get("record")
        fields = ", ".join(sorted(record)) if isinstance(record, dict) else "none"
        cause = exc.__cause__
        unknown = getattr(cause, "name", None)
        expression = str(getattr(cause, "expression", "") or "").strip()
        if not expression:  # e.g. a SyntaxError: the SDK's own message names it
            said = re.search(r"simpleeval expressions (.*)\.$", str(exc), flags=re.DOTALL)
            expression = said.group(1).strip() if said else ""
        maps = self.config.get("stream_maps") or {}
        stream_map = maps.get(stream) if isinstance(maps, dict) else None
        prop = next(
            (
                name
                for name, value in (stream_map.items() if isinstance(stream_map, dict) else ())
                if isinstance(value, str) and value.strip() == expression
            ),
            None,
        )
        where = f"stream_maps.{stream}.{prop}" if prop else f"a stream map of {stream}"
        if unknown:
            problem = f"uses {unknown!r}, which is not a field of the record"
            close = difflib.get_close_matches(str(unknown), list(record or ()), n=1)
            problem += f" (did you mean {close[0]!r}?)" if close else ""
            problem += f"; its fields: {fields}"
        else:
            problem = (
                f"failed: {' '.join(str(cause or exc).split())}; the record's fields: {fields}"
            )
        return (
            f"Stream {stream!r}: the map expression {where} = {expression!r} {problem}; "
            "fix the expression or the tap's column name"
        )

    @classmethod
    def invoke(  # type: ignore[override]
        cls,
        *,
        about: bool = False,
        about_format: str | None = None,
        config: _ConfigInput | None = None,
        file_input: IO[str] | None = None,
    ) -> None:
        """CLI entry: the README's exit codes instead of the SDK's."""
        if about:
            super().invoke(about=about, about_format=about_format)
        cls.print_version(print_fn=cls.logger.info)
        config = config or _ConfigInput()
        try:
            target = cls(
                config=config.config, validate_config=True, parse_env_config=config.parse_env
            )
        except FatalError as exc:
            logger.error("fatal: %s", exc)  # noqa: TRY400
            sys.exit(1)
        tune_gc()
        tune_malloc()
        if file_input is not None and hasattr(file_input, "buffer"):
            # As for stdin: undecodable bytes reach the reader, which names their line.
            file_input = io.TextIOWrapper(
                file_input.buffer, encoding="utf-8", errors="surrogateescape"
            )
        sys.exit(target.run_to_end(file_input))
