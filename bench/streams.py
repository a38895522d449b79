"""Write benchmark inputs: a Singer stream of driver messages, and the bodies it should produce.

Generation must cost far less than what is measured (a 1M-record stream is ~300 MB), so lines come
from one string template per record rather than a JSON encoder, and the file is written in large
chunks. The records look like a tap-postgres extract of a TMS table: body fields, TMS-only columns
the target must drop, a ``date-time`` column, and a STATE bookmark every 1,000 records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STREAM = "public-dispatch_messages"
CONNECTIONS = ("11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222")
PRIORITIES = ('"low"', '"medium"', '"high"', "null")
STATE_EVERY = 1000
_CHUNK = 5000

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message_id": {"type": "integer"},
        "connection_id": {"type": "string", "format": "uuid"},
        "fleet_ref": {"type": ["string", "null"]},
        "source_sender_id": {"type": ["string", "null"]},
        "source_recipient_ids": {"type": ["array", "null"], "items": {"type": "string"}},
        "message_text": {"type": ["string", "null"]},
        "priority": {"type": ["string", "null"]},
        "load_number": {"type": ["string", "null"]},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}

# One record line; every value but the counters is fixed text, so formatting is all it costs.
_RECORD = (
    '{{"type":"RECORD","stream":"' + STREAM + '","record":{{"message_id":{i},'
    '"connection_id":"{conn}","fleet_ref":"PLF","source_sender_id":"dispatcher-7",'
    '"source_recipient_ids":["driver-{driver}"],'
    '"message_text":"Load {load}: pick up at dock {dock}, call dispatch on arrival",'
    '"priority":{priority},"load_number":"L{load}",'
    '"updated_at":"2025-01-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}.000000+00:00"}}}}\n'
)
_STATE = (
    '{{"type":"STATE","value":{{"bookmarks":{{"' + STREAM + '":'
    '{{"replication_key":"updated_at","replication_key_value":{i}}}}}}}}}\n'
)


def schema_line() -> str:
    """The SCHEMA message that opens every benchmark stream (key ``message_id``)."""
    message: dict[str, Any] = {"type": "SCHEMA", "stream": STREAM, "schema": SCHEMA}
    message["key_properties"] = ["message_id"]
    return json.dumps(message, separators=(",", ":")) + "\n"


def _record(i: int, drivers: int) -> str:
    load = 100_000 + i
    return _RECORD.format(
        i=i,
        conn=CONNECTIONS[i % 2],
        driver=i % drivers,
        load=load,
        dock=i % 9,
        priority=PRIORITIES[i % 4],
        day=1 + (i // 86_400) % 28,
        hour=(i // 3600) % 24,
        minute=(i // 60) % 60,
        second=i % 60,
    )


def _lines(records: int, drivers: int, first: int) -> Iterator[str]:
    yield schema_line()
    for i in range(first, first + records):
        yield _record(i, drivers)
        if (i - first + 1) % STATE_EVERY == 0:
            yield _STATE.format(i=i)
    if records % STATE_EVERY:
        yield _STATE.format(i=first + records - 1)


def write_stream(path: Path, records: int, *, drivers: int = 1000, first: int = 1) -> Path:
    """Write a Singer stream of ``records`` messages for ``drivers`` distinct recipients.

    Args:
        path: Where to write (overwritten).
        records: How many RECORD messages.
        drivers: Distinct recipients, assigned round-robin so consecutive records go to different
            lanes (the delivery engine runs one lane per recipient).
        first: The first ``message_id``; distinct ranges keep keys distinct across runs that share
            a sandbox.

    Returns:
        ``path``, for chaining.
    """
    with path.open("w", encoding="utf-8") as out:
        chunk: list[str] = []
        for line in _lines(records, drivers, first):
            chunk.append(line)
            if len(chunk) >= _CHUNK:
                out.write("".join(chunk))
                chunk.clear()
        out.write("".join(chunk))
    return path


def bodies(path: Path) -> list[dict[str, Any]]:
    """The Create Message bodies a stream file should produce, in order, for the bare client loop.

    Derived from the file itself (body fields, nulls left out, as the body rules say) so the bare
    loop posts exactly what the target posts without importing the target.
    """
    fields = (
        "connection_id",
        "fleet_ref",
        "source_sender_id",
        "source_recipient_ids",
        "message_text",
        "priority",
    )
    out: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            message = json.loads(line)
            if message["type"] == "RECORD":
                record = message["record"]
                out.append({k: record[k] for k in fields if record.get(k) is not None})
    return out
