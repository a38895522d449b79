"""The messages sink: records become Messages as they arrive; each batch goes to the run.

Thin on purpose. Everything shared across streams (ledger, delivery, STATE) lives in the Run; the
sink only knows its stream's key properties and when a batch is ready. A BatchSink, because the
ledger claims a whole batch in one transaction (ledger work per batch, not per record).

All sinks share one batch, the run's (:attr:`Run.buffered`), filled in input order: whichever
sink is full (or drained for age or at the end) dispatches every stream's waiting records. Per
stream batches would let a full stream send a driver's later message while an earlier one for
the same driver still waits in another stream's batch. The SDK's per-sink counters stay, so its
bookkeeping (records read and written, the record-count metric) is settled for every sink whose
records a dispatch took.
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
        self._buffered: list[Message] = self.run.buffered
        self._keep = self._buffered.append
        self._max_size = target.batch_size
        self._uncounted = 0  # records taken by the lean path, not yet in the record-count metric
        super().__init__(target, stream_name, schema, key_properties)
        self._prepare = self.run.prepare
        self.key_names: list[str] = list(self.key_properties or [])
        self._sharing: list[MessagesSink] = target.message_sinks
        self._sharing.append(self)

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

    @property
    def is_full(self) -> bool:
        """The shared batch is full (the SDK's record path asks after each record)."""
        return len(self._buffered) >= self._max_size

    def get_validator(self) -> None:
        """No validation against the tap's schema: the body is validated against Catena's.

        The tap schema says nothing about what Catena accepts, and jsonschema validation is
        most of singer-sdk's per-record cost.
        """
        return

    def _parse_timestamps_in_record(self, *args: Any, **kwargs: Any) -> None:
        """Keep the tap's values as they are: only ``message_time_field`` is ever parsed."""

    def process_record(self, record: dict[str, Any], context: dict[str, Any]) -> None:
        """Prepare the record now (numbered in input order); send it with the shared batch."""
        self._keep(self._prepare(self.stream_name, self.key_names, record))

    def take(self, record: dict[str, Any]) -> bool:
        """The target's lean path: what the SDK does around ``process_record``, minus the rest.

        Tallies the record as ``tally_record_read`` would (a sink with records read is drained
        by ``drain_all``); the record-count metric is brought up to date once per batch instead
        of per record. Returns whether the shared batch is full.
        """
        self._keep(self._prepare(self.stream_name, self.key_names, record))
        self._total_records_read += 1
        self._batch_records_read += 1
        self._uncounted += 1
        return len(self._buffered) >= self._max_size

    def process_batch(self, context: dict[str, Any]) -> None:
        """Hand the shared batch to the run: one ledger claim, then concurrent delivery.

        Every stream's waiting records go, in input order; the other sinks whose records they
        include are marked drained here (the SDK marks this one), so ``drain_all`` skips them
        and their counts stay right.
        """
        for sink in self._sharing:
            if sink._uncounted:
                sink.record_counter_metric.increment(sink._uncounted)
                sink._uncounted = 0
            if sink is not self and sink._batch_records_read:
                sink.tally_record_written(sink._batch_records_read)
                sink._batch_records_read = 0
        self.run.dispatch_buffered()
