"""The messages sink: records become Messages as they arrive; each batch goes to the run.

Thin on purpose. Everything shared across streams (ledger, delivery, STATE) lives in the Run; the
sink only knows its stream's key properties and when a batch is ready. A BatchSink, because the
ledger claims a whole batch in one transaction (ledger work per batch, not per record).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from singer_sdk.sinks import BatchSink

from target_catena_messages.body.record import check_stream_schema

if TYPE_CHECKING:
    from collections.abc import Sequence

    from target_catena_messages.outcome import Message
    from target_catena_messages.pipeline.run import Run
    from target_catena_messages.singer.target import TargetCatenaMessages

DEFAULT_BATCH_ROWS = 1000


class MessagesSink(BatchSink):
    """One Singer stream of driver messages."""

    def __init__(
        self,
        target: TargetCatenaMessages,
        stream_name: str,
        schema: dict[str, Any],
        key_properties: Sequence[str] | None,
    ) -> None:
        self.run: Run = target.run
        # Off the SDK's batch context: singer-sdk logs the whole context at debug per record.
        self._messages: list[Message] = []
        self._max_size = int(target.config.get("batch_size_rows") or DEFAULT_BATCH_ROWS)
        self._uncounted = 0  # records taken by the lean path, not yet in the record-count metric
        super().__init__(target, stream_name, schema, key_properties)
        self._prepare = self.run.prepare
        self.key_names: list[str] = list(self.key_properties or [])

    def setup(self) -> None:
        """SCHEMA time: refuse a stream that cannot produce messages."""
        check_stream_schema(
            self.stream_name,
            self.schema.get("properties", {}),
            self.key_properties or [],
            allow_body_hash_keys=bool(self.config.get("allow_body_hash_keys")),
        )

    @property
    def max_size(self) -> int:
        """``batch_size_rows`` or 1000: a claim transaction per 1000 rows keeps sends flowing early.

        A property, not a class attribute: a class attribute would shadow ``batch_size_rows``.
        """
        return self._max_size

    def get_validator(self) -> None:
        """No validation against the tap's schema: the body is validated against Catena's.

        The tap schema says nothing about what Catena accepts, and jsonschema validation is
        most of singer-sdk's per-record cost.
        """
        return

    def _parse_timestamps_in_record(self, *args: Any, **kwargs: Any) -> None:
        """Keep the tap's values as they are: only ``message_time_field`` is ever parsed."""

    def process_record(self, record: dict[str, Any], context: dict[str, Any]) -> None:
        """Prepare the record now (numbered in input order); send it with its batch."""
        self._messages.append(self._prepare(self.stream_name, self.key_names, record))

    def take(self, record: dict[str, Any]) -> bool:
        """The target's lean path: what the SDK does around ``process_record``, minus the rest.

        Tallies the record as ``tally_record_read`` would (``current_size`` drives the drain);
        the record-count metric is brought up to date once per batch instead of per record.
        Returns whether the batch is full.
        """
        self._messages.append(self._prepare(self.stream_name, self.key_names, record))
        self._total_records_read += 1
        self._batch_records_read += 1
        self._uncounted += 1
        return self._batch_records_read >= self._max_size

    def process_batch(self, context: dict[str, Any]) -> None:
        """Hand the batch to the run: one ledger claim, then concurrent delivery."""
        if self._uncounted:
            self.record_counter_metric.increment(self._uncounted)
            self._uncounted = 0
        messages, self._messages = self._messages, []
        if messages:
            self.run.dispatch(messages)
