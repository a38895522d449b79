"""The P1 baseline: a singer-sdk 0.54 target that does nothing with its records, SDK defaults on.

Everything singer-sdk does per record by default still happens (JSON reader, jsonschema validation
against the tap's schema, timestamp parsing, batching); only the sink's work is empty. Dividing our
target's records/s by this one's says how much of the SDK's cost our fast paths removed, on the same
machine, in the same run.

It also gives the SDK's *floor* (``--floor``): the same target with singer-sdk's own msgspec
reader and ``validate_records: false`` in its config, the least any singer-sdk target can spend per
record. Our target cannot be faster than that while it goes through the SDK's record path.

    .venv/bin/python bench/noop_target.py [--floor] --config CONFIG --input FILE
"""

from __future__ import annotations

import sys
from typing import Any

from singer_sdk import Target
from singer_sdk import typing as th
from singer_sdk.contrib.msgspec import MsgSpecReader
from singer_sdk.sinks import RecordSink


class NoopSink(RecordSink):
    """Drops every record after the SDK has read, validated and conformed it."""

    def process_record(self, record: dict[str, Any], context: dict[str, Any]) -> None:
        """Nothing: the baseline measures the SDK alone."""


class NoopTarget(Target):
    """A target with SDK defaults and a sink that does nothing."""

    name = "target-noop-bench"
    config_jsonschema = th.PropertiesList().to_dict()
    default_sink_class = NoopSink


class NoopFloorTarget(NoopTarget):
    """The no-op target with the SDK's fastest reader (pair it with ``validate_records: false``)."""

    message_reader_class = MsgSpecReader


if __name__ == "__main__":
    if "--floor" in sys.argv:
        sys.argv.remove("--floor")
        NoopFloorTarget.cli()
    else:
        NoopTarget.cli()
