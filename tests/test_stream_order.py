"""Per-driver order across streams: a driver's messages go out in the order the tap emitted them.

Two streams interleaved in changing proportions share their recipients, with a batch size far
below the records of either stream, under 503s, 500s, 429s and latency. A record of the busier
stream fills its batch first; it must never go out before an earlier record of the other stream
for the same driver that is still waiting to be batched. The truth is the sandbox's own log of
the bodies that created an operation, in the order they did.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.harness import run_target, sandbox_config, state_line

CONNECTIONS = ("11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222")
STREAMS = ("fleet_a-messages", "fleet_b-messages")
RECIPIENTS = 40
RECORDS = 320


def _plan(n: int, seed: int = 11) -> list[tuple[str, int]]:
    """Each record's stream and driver, reproducible from ``seed``.

    Stream A emits about one record in seven at first, one in two in the middle, six in seven
    at the end: batches mix the streams differently as the run goes, and each stream in turn
    fills its batch while the other's records wait. Drivers are drawn at random, so a driver's
    next message often comes from the other stream a few records later.
    """
    draw = random.Random(seed)
    plan = []
    for i in range(n):
        share = 0.15 if i < 0.4 * n else 0.5 if i < 0.7 * n else 0.85
        plan.append(
            (STREAMS[0] if draw.random() < share else STREAMS[1], draw.randrange(RECIPIENTS))
        )
    return plan


def _record(i: int, driver: int) -> dict[str, Any]:
    return {
        "id": i,
        "connection_id": CONNECTIONS[driver % 2],
        "source_sender_id": "dispatcher-7",
        "source_recipient_ids": [f"driver-{driver}"],
        "message_text": f"[key={i}] msg {i:04d} for driver-{driver}",
    }


def _interleaved(n: int) -> tuple[list[str], list[dict[str, Any]]]:
    """SCHEMA of both streams, then ``n`` records interleaved, a tap STATE every 25 and last."""
    props = {name: {} for name in _record(0, 0)}
    lines = [
        json.dumps(
            {
                "type": "SCHEMA",
                "stream": stream,
                "schema": {"type": "object", "properties": props},
                "key_properties": ["id"],
            }
        )
        for stream in STREAMS
    ]
    records = []
    for i, (stream, driver) in enumerate(_plan(n)):
        record = _record(i, driver)
        records.append(record)
        lines.append(json.dumps({"type": "RECORD", "stream": stream, "record": record}))
        if i % 25 == 24 or i == n - 1:
            lines.append(state_line(STREAMS[0], i))
    return lines, records


def _recipient(body: dict[str, Any]) -> tuple[str, str]:
    return body["connection_id"], json.dumps(body["source_recipient_ids"])


# The lean record path, and singer-sdk's own (a stream map on each stream sends records there).
PATHS = {
    "lean": {},
    "sdk": {"stream_maps": {stream: {"note": "'mapped'"} for stream in STREAMS}},
}


@pytest.mark.parametrize("path", list(PATHS))
def test_each_driver_gets_its_messages_in_input_order_across_streams(
    tmp_path: Path, sandbox_factory: Any, path: str
) -> None:
    sandbox = sandbox_factory(
        {
            "faults": {
                "seed": 5,
                "rules": [
                    {"kind": "latency", "ms": 5, "jitter_ms": 20},
                    {
                        "kind": "status",
                        "status": 429,
                        "retry_after_seconds": 1,
                        "match": {"every": 23},
                    },
                    {"kind": "status", "status": 503, "match": {"probability": 0.06}},
                    {"kind": "status", "status": 500, "match": {"probability": 0.04}},
                    {
                        "kind": "status",
                        "status": 500,
                        "after_processing": True,
                        "match": {"probability": 0.03},
                    },
                ],
            }
        }
    )
    lines, records = _interleaved(RECORDS)
    config = sandbox_config(
        sandbox.url,
        batch_size_rows=5,
        max_concurrency=8,
        operation_lookup_lag_seconds=0.5,
        max_retry_seconds=60,
        max_ambiguous_resends=5,
        **PATHS[path],
    )
    result = run_target(tmp_path, config, lines, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    accepted = sandbox.accepted_bodies()
    copies = Counter(body["message_text"] for body in accepted)
    assert copies == Counter(r["message_text"] for r in records), "lost or duplicated"
    sent: dict[tuple[str, str], list[str]] = defaultdict(list)
    for body in accepted:
        sent[_recipient(body)].append(body["message_text"])
    emitted: dict[tuple[str, str], list[str]] = defaultdict(list)
    for record in records:
        emitted[_recipient(record)].append(record["message_text"])
    assert len(emitted) == RECIPIENTS
    drivers_of = {stream: {d for s, d in _plan(RECORDS) if s == stream} for stream in STREAMS}
    assert len(drivers_of[STREAMS[0]] & drivers_of[STREAMS[1]]) >= 30  # shared by the streams
    out_of_order = {lane: texts for lane, texts in sent.items() if texts != emitted[lane]}
    example = next(iter(out_of_order.items()), None)
    assert not out_of_order, f"{len(out_of_order)} drivers out of order, e.g. {example}"
    answers = sandbox.stats()["status_counts"]["messages"]
    assert all(answers.get(status) for status in ("429", "503", "500")), answers  # faults fired
    assert result.last_state is not None
    assert result.last_state["bookmarks"][STREAMS[0]]["replication_key_value"] == RECORDS - 1
