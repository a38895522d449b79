"""The golden runs: fixed scenarios whose every observable output is pinned in tests/golden/.

A refactor that claims to change no behaviour must leave these files unchanged. Each scenario
drives the real CLI against the real sandbox with a seeded fault plan.

``source_ids`` (tests/golden/source_ids/): two runs, one ledger, one dead-letter file, covering
what exactly-once rests on: several streams (one with a composite key), duplicate keys within the
input (in one batch and across batches, of valid, invalid and Catena-rejected records), keys
accepted by the first run and seen again by the second, validation dead letters, expired and
undatable records, retries that run out (a retryable dead letter the second run sends),
ambiguous sends settled by a lookup (dropped answers and 500s after processing adopted, a plain
500 and a reset resent), a 429, keys a dead run left claimed (one it had sent, one it had not) and
keys another live process holds (one it completes, one it releases).

``catena_ids`` (tests/golden/catena_ids/): one run of the other body version with ``is_sync``:
provider ids resolved through the users list, Catena ids given directly, ids that do not
resolve, and sync failures that are a rejection or ambiguous (adopted).

What is compared, per run (each file holds every run of its scenario):

- ``states.json``: every STATE line, in order;
- ``dead_letters.json``: the dead-letter file's entries the run wrote;
- ``ledger.json``: every ledger row after the run;
- ``summaries.json``: the summary's JSON line;
- ``requests.json``: every POST /messages the sandbox received: whose body, answer and fault.

Why it is deterministic:

- One request in flight (``max_concurrency: 1``), and each chunk of input sends on one lane
  (connection and recipient; the held keys aside, which can only be sent once the rest of their
  chunk is done), so the order of POSTs, retries included, follows from the input alone. The
  fault plan chooses by request number and a seeded generator drawn once per POST, so the same
  POSTs get the same faults. Latency is on POSTs only (other endpoints' request counts depend on
  timing and must not draw from the generator).
- The input is fed chunk by chunk: each chunk ends with a tap STATE, and the next chunk is written
  only once the target has written the STATE line for it. So the lines, and what each lists, do
  not depend on how fast records resolve. The second run's last chunk holds the keys another
  process has claimed; it ends the input (today the target looks at such keys again while it
  waits for room or at the end of input), after the holder finished with them.
- Sink batches of 2 rows and an even number of rows per stream in every chunk: a chunk's records
  never wait in a half-full batch.
- Other processes' work (the dead run's and the live holder's POSTs) happens between runs with no
  fault plan, and each run's plan starts its request numbers afresh.

What is masked (the rest is compared as is, fingerprints and request counters included):

- run ids: the target's become ``<run 1>``/``<run 2>`` (the dead and the live holder's are fixed);
- operation ids: ``<op TAG>`` after the message text of the operation Catena stored (every text
  carries its key's tag, ``<op TAG #2>`` for a second operation of the same text: a duplicate);
  other ids Catena makes up (its log entries) ``<id>``; the scenario's own ids stay;
- clock readings become ``<time>`` when set: the ledger's time columns, a dead letter's ``at``,
  the times of an operation Catena returned; the elapsed time ``<seconds>``; the fresh records'
  creation time ``<fresh>`` (records are otherwise compared as read);
- the work directory and the sandbox URL;
- order where none is promised: within a STATE line's lists, dead letters within a run (sorted
  by stream, key, stage), the summary's object keys.

Regenerate after an intended behaviour change with ``UPDATE_GOLDEN=1 pytest tests/test_golden.py``
(it refuses to write when a scenario no longer takes the paths it is there for) and review the
diff of tests/golden/ like code.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import queue
import re
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.ledger import ClaimRequest, Ledger, LedgerOutcome
from target_catena_messages.sandbox.config import DEFAULT_PARTNER_ID
from target_catena_messages.sandbox.server import Sandbox
from tests.harness import sandbox_config

GOLDEN_DIR = Path(__file__).with_name("golden")
ARTEFACTS = ("states", "dead_letters", "ledger", "summaries", "requests")
TOKEN_PATH = "/realms/catena/protocol/openid-connect/token"
WAIT = 120.0  # seconds: a guard against a hung run, never an expectation of speed

CONN_A = "0a0a0a0a-1111-4111-8111-111111111111"
CONN_B = "0b0b0b0b-2222-4222-8222-222222222222"
ORDERS, YARD, ALERTS = "tms-orders", "tms-yard_moves", "tms-alerts"
KEY_PROPERTIES = {ORDERS: ["id"], YARD: ["id"], ALERTS: ["fleet", "seq"]}
TAGS = {ORDERS: "ord", YARD: "yard", ALERTS: "alr"}
DEAD_RUN = "golden-host-b/31337/deadbeef"  # claimed two keys ten minutes ago, then died
OTHER_RUN = "golden-host-c/4242/cafef00d"  # alive: holds two keys while the second run starts
EXPIRED_AT = "2020-02-29T08:00:00Z"
TAG_IN_TEXT = re.compile(r"^\[([^\]]+)\]")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Keys whose values are clock readings: the ledger's columns, a dead letter's ``at``, and the
# times of an operation Catena returned (inside a dead letter's ``api_error``).
TIME_KEYS = frozenset(
    {"claimed_at", "lease_until", "ambiguous_since", "resolved_at", "updated_at"}
    | {"at", "created_at"}
)

DISPATCHER = "d15a7c00-0000-4000-8000-000000000007"
DRIVER_1 = "d1d1d1d1-0000-4000-8000-000000000001"
DRIVER_2 = "d2d2d2d2-0000-4000-8000-000000000002"
DRIVER_9 = "d9d9d9d9-0000-4000-8000-000000000009"  # a driver of the other connection
REPLIED_TO = "4e4e4e4e-0000-4000-8000-00000000004e"
FIXED_IDS = frozenset(
    {CONN_A, CONN_B, DISPATCHER, DRIVER_1, DRIVER_2, DRIVER_9, REPLIED_TO, DEFAULT_PARTNER_ID}
)
CATENA_IDS_SANDBOX: dict[str, Any] = {
    "message_schema": "catena_ids",
    "users": [
        {"id": uid, "source_id": source_id, "connection_id": conn, "is_driver": driver}
        for uid, source_id, conn, driver in (
            (DISPATCHER, "dispatcher-7", CONN_A, False),
            (DRIVER_1, "driver-1", CONN_A, True),
            (DRIVER_2, "driver-2", CONN_A, True),
            (DRIVER_9, "driver-9", CONN_B, True),
        )
    ],
}

SETTINGS: dict[str, Any] = {
    "max_concurrency": 1,
    "batch_size_rows": 2,
    "max_retries": 2,
    "operation_lookup_lag_seconds": 0,
    "message_time_field": "created_at",
    "max_message_age_hours": 24,
}

CATENA_IDS_SETTINGS: dict[str, Any] = {
    **SETTINGS,
    "message_schema": "catena_ids",
    "is_sync": True,
    "default_sender_id": DISPATCHER,
}

# Request numbers restart with every run's plan (``configure``). Explicit rules come first: the
# first matching action wins and later rules are not evaluated, so the seeded 503s draw only for
# POSTs no explicit rule took.
LATENCY: dict[str, Any] = {"kind": "latency", "ms": 1, "jitter_ms": 4}
RUN1_FAULTS: dict[str, Any] = {
    "seed": 1515,
    "rules": [
        LATENCY,
        # Which POST each hits is in requests.json; what they are there for:
        {"kind": "status", "status": 503, "match": {"requests": [2, 3, 4]}},  # yard:1 gives up
        {"kind": "status", "status": 503, "match": {"requests": [6]}},  # yard:2, so it retries
        {"kind": "drop", "match": {"requests": [7]}},  # yard:2's retry: adopted
        {"kind": "status", "status": 500, "match": {"requests": [10]}},  # alr:F1-2: resent
        {"kind": "status", "status": 422, "match": {"requests": [12]}},  # alr:F2-1, a copy behind
        # ord:R2, which the dead run never sent: adopted
        {"kind": "status", "status": 500, "after_processing": True, "match": {"requests": [14]}},
        {"kind": "reset", "match": {"requests": [15]}},  # yard:8: resent,
        {"kind": "status", "status": 503, "match": {"requests": [16, 17]}},  # then out of retries
        # ord:6: throttled, then sent
        {"kind": "status", "status": 429, "retry_after_seconds": 1, "match": {"requests": [21]}},
        {"kind": "status", "status": 503, "match": {"probability": 0.12}},
    ],
}
RUN2_FAULTS: dict[str, Any] = {
    "seed": 1622,
    "rules": [
        LATENCY,
        {"kind": "drop", "match": {"requests": [2]}},  # yard:3, fixed since run 1: adopted
        {"kind": "status", "status": 500, "match": {"requests": [4]}},  # alr:F4-1: resent
        {"kind": "status", "status": 503, "match": {"probability": 0.12}},
    ],
}
SYNC_FAULTS: dict[str, Any] = {
    "seed": 1717,
    "rules": [
        LATENCY,
        {"kind": "sync_fail", "match": {"requests": [3]}},  # the TSP refused: a rejection
        # the TSP was unreachable, or answered 503: ambiguous, the failed operation is adopted
        {"kind": "sync_fail", "error_type": "network", "match": {"requests": [6]}},
        {"kind": "sync_fail", "response_status_code": 503, "match": {"requests": [8]}},
        {"kind": "drop", "match": {"requests": [10]}},
        {"kind": "status", "status": 503, "match": {"requests": [11]}},
    ],
}


# -- the scenario's input ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One RECORD of the scenario: its stream and the record."""

    stream: str
    record: dict[str, Any]

    @property
    def key(self) -> str:
        """The record key as the target derives it (one property: its text; several: JSON)."""
        names = KEY_PROPERTIES[self.stream]
        if len(names) == 1:
            return str(self.record[names[0]])
        return json.dumps([self.record[n] for n in names], separators=(",", ":"))


@dataclass(frozen=True)
class Chunk:
    """Rows followed by one tap STATE; the next chunk is written once its line is out.

    The rows that reach Catena share one lane (connection and recipient), so their POSTs keep
    input order; each stream has a multiple of the batch size, so no row waits for the next chunk.
    """

    name: str
    rows: list[Row]


def row(
    stream: str,
    key: Any,
    driver: str,
    *,
    created: str | None,
    conn: str = CONN_A,
    **fields: Any,
) -> Row:
    """A dispatch message whose text starts with its tag (``[ord:3]``).

    So every POST, operation and payload names its key; ``created=None`` leaves the time out.
    """
    if stream == ALERTS:
        fleet, seq = key
        record: dict[str, Any] = {"fleet": fleet, "seq": seq}
        tag = f"{TAGS[stream]}:{fleet}-{seq}"
    else:
        record = {"id": key}
        tag = f"{TAGS[stream]}:{key}"
    record.update(
        {
            "connection_id": conn,
            "source_sender_id": "dispatcher-7",
            "source_recipient_ids": [driver],
            "message_text": f"[{tag}] Load {tag.upper()}: report to dock 4",
            "priority": "high",
            "created_at": created,
        }
    )
    if created is None:
        del record["created_at"]
    record.update(fields)
    return Row(stream, record)


def scenario(fresh: str) -> tuple[list[Chunk], list[Chunk]]:
    """The two runs' input. ``fresh`` is a creation time within the age limit."""
    o = functools.partial(row, ORDERS, created=fresh)
    y = functools.partial(row, YARD, created=fresh)
    a = functools.partial(row, ALERTS, created=fresh, conn=CONN_B)
    run1 = [
        Chunk(
            "run1/c1",  # lane A/driver-1; ord:2 twice in one batch, yard:3 invalid, yard:4 expired
            [
                o(1, "driver-1"),
                y(1, "driver-1"),
                o(2, "driver-1"),
                y(2, "driver-1"),
                o(3, "driver-1"),
                o(2, "driver-1"),
                y(3, "driver-1", priority="urgent"),
                row(YARD, 4, "driver-1", created=EXPIRED_AT),
            ],
        ),
        Chunk(
            "run1/c2",  # lane B/driver-2; the same key in two streams; invalid and undatable rows
            [
                a(("F1", 1), "driver-2"),
                y(5, "driver-2", message_text="   "),
                a(("F1", 2), "driver-2"),
                y(5, "driver-2", message_text="   "),
                a(("F2", 1), "driver-2"),
                a(("F2", 1), "driver-2"),
                row(YARD, 6, "driver-2", created="the day before yesterday"),
                row(YARD, 7, "driver-2", created=None),
                a(("F2", 2), "driver-2"),
                a(("F3", 1), "driver-2", connection_id=None),
            ],
        ),
        Chunk(
            "run1/c3",  # lane A/driver-3; the dead run's two keys, then fresh ones
            [
                o("R1", "driver-3"),
                o("R2", "driver-3"),
                y(8, "driver-3"),
                o(4, "driver-3"),
                o(5, "driver-3"),
                y(9, "driver-3"),
            ],
        ),
        Chunk(
            "run1/c4",  # lane B/driver-4; ord:3 again, accepted two chunks ago
            [
                o(6, "driver-4", conn=CONN_B),
                o(7, "driver-4", conn=CONN_B),
                y(10, "driver-4", conn=CONN_B),
                o(3, "driver-1"),
                y(11, "driver-4", conn=CONN_B, priority=None),
                o(8, "driver-4", conn=CONN_B),
            ],
        ),
    ]
    run2 = [
        Chunk("run2/c1", list(run1[0].rows)),  # all seen before: duplicates, earlier dead letters
        Chunk(
            "run2/c2",  # lane B/driver-2; yard:3 fixed (a new body), the rejected alert again, and
            # this run's own dead letters
            [
                y(3, "driver-2", conn=CONN_B, priority="low"),
                a(("F2", 1), "driver-2"),
                y(12, "driver-2", conn=CONN_B),
                a(("F4", 1), "driver-2"),
                a(("F5", 1), "driver-2", priority="urgent"),
                a(("F5", 2), "driver-2", created=EXPIRED_AT),
            ],
        ),
        Chunk(
            # lane A/driver-5; the live process's two keys lead the last chunk, on a lane of their
            # own (driver-6): H2 is sent only once the rest is done, whatever else may wait
            "run2/c3",
            [
                o("H1", "driver-6"),
                o("H2", "driver-6"),
                y(13, "driver-5"),
                o(9, "driver-5"),
                o(10, "driver-5"),
                y(14, "driver-5"),
            ],
        ),
    ]
    return run1, run2


def catena_ids_scenario(fresh: str) -> list[Chunk]:
    """One run of catena_ids bodies with ``is_sync``: provider ids resolved through the users
    list (sender from ``default_sender_id`` or the record), Catena ids given directly, ids that
    cannot be resolved, and sync failures that are rejections or ambiguous."""

    def o(key: Any, **fields: Any) -> Row:
        return catena_row(ORDERS, key, created=fresh, **fields)

    def a(key: Any, **fields: Any) -> Row:
        return catena_row(ALERTS, key, created=fresh, **fields)

    return [
        Chunk(
            "sync/c1",  # lane A/driver-1
            [
                o(1, sender_source_id="dispatcher-7", recipient_source_id="driver-1"),
                a(("F1", 1), sender_id=DISPATCHER, recipient_id=DRIVER_1),
                o(2, recipient_source_id="driver-1"),
                a(("F1", 2), recipient_source_id="driver-9"),  # not a driver of this connection
                o(3, recipient_source_id=["driver-1", "driver-2"]),  # one message, two drivers
                o(4, recipient_source_id=["driver-1"], reply_to_message_id=REPLIED_TO),
                a(("F1", 3), recipient_source_id="driver-1", priority="urgent"),
                a(("F1", 4), recipient_source_id="driver-1", sender_source_id="nobody-0"),
            ],
        ),
        Chunk(
            "sync/c2",  # lane A/driver-2; the sync failures
            [
                o(5, recipient_source_id="driver-2"),
                o(6, recipient_source_id="driver-2"),
                a(("F2", 1), recipient_source_id="driver-2"),
                o(7, recipient_source_id="driver-2"),
                a(("F2", 2), recipient_id=DRIVER_2),
                o(8, recipient_source_id="driver-2"),
                o(9, recipient_source_id="driver-2"),
                o(10, recipient_source_id="driver-2"),
            ],
        ),
    ]


def catena_row(stream: str, key: Any, *, created: str | None, **fields: Any) -> Row:
    """A catena_ids record: Catena or provider ids for sender and recipient, its tag in the text."""
    base = row(stream, key, "unused", created=created)
    record = {
        k: v
        for k, v in base.record.items()
        if k not in ("source_sender_id", "source_recipient_ids")
    }
    record.update(fields)
    return Row(stream, record)


def schema_lines(chunks: Sequence[Chunk]) -> list[str]:
    """A SCHEMA per stream whose properties are every field the scenario's records carry."""
    names = sorted({name for c in chunks for r in c.rows for name in r.record})
    properties: dict[str, Any] = {name: {} for name in names}
    return [
        json.dumps(
            {
                "type": "SCHEMA",
                "stream": stream,
                "schema": {"type": "object", "properties": properties},
                "key_properties": keys,
            }
        )
        for stream, keys in KEY_PROPERTIES.items()
    ]


def chunk_lines(chunk: Chunk) -> list[str]:
    """The chunk's RECORDs and its tap STATE; refuses a chunk that would leave a batch half full."""
    per_stream = Counter(r.stream for r in chunk.rows)
    assert all(n % SETTINGS["batch_size_rows"] == 0 for n in per_stream.values()), per_stream
    lines = [
        json.dumps({"type": "RECORD", "stream": r.stream, "record": r.record}) for r in chunk.rows
    ]
    state = {"bookmarks": {"tms": {"chunk": chunk.name}}}
    lines.append(json.dumps({"type": "STATE", "value": state}))
    return lines


def body_of(r: Row) -> dict[str, Any]:
    """The source_ids body the target builds for a valid row (what a dead or live run sent)."""
    fields = (
        "connection_id",
        "source_sender_id",
        "source_recipient_ids",
        "message_text",
        "priority",
    )
    return {f: r.record[f] for f in fields if r.record.get(f) is not None}


# -- the target, fed chunk by chunk --------------------------------------------------------------


class LiveTarget:
    """The real CLI with input on a pipe, STATE lines collected as they come."""

    def __init__(self, workdir: Path, config_path: Path, name: str) -> None:
        self.stderr_path = workdir / f"{name}.stderr"
        self.states: list[dict[str, Any]] = []
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "target_catena_messages", "--config", str(config_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=workdir,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode())
        self._lines.put(None)

    def send(self, lines: Sequence[str]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(("\n".join(lines) + "\n").encode())
        self.proc.stdin.flush()

    def wait_for_state(self, chunk: str) -> None:
        """Block until the STATE line for ``chunk`` is out (it covers every row of the chunk)."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                text = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no STATE for {chunk}; stderr:\n{self.stderr()[-3000:]}")
            if text is None:
                pytest.fail(f"the target ended before {chunk}; stderr:\n{self.stderr()[-3000:]}")
            state = json.loads(text)
            self.states.append(state)
            if state["bookmarks"]["tms"]["chunk"] == chunk:
                return

    def finish(self) -> int:
        """End of input: wait for the exit and collect the lines written at the end."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(WAIT)
        self._reader.join(WAIT)
        while True:
            text = self._lines.get_nowait()
            if text is None:
                return code
            self.states.append(json.loads(text))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def summary(self) -> dict[str, Any]:
        for line in self.stderr().splitlines():
            if line.startswith('{"summary":'):
                return dict(json.loads(line)["summary"])
        pytest.fail(f"no summary line; stderr:\n{self.stderr()[-3000:]}")


# -- the other processes: a dead run and a live one, through the ledger's own API ----------------


def fingerprint(label: str) -> str:
    """A stand-in body fingerprint for a claim another process made (any hex digest will do)."""
    return hashlib.sha256(label.encode()).hexdigest()


def claim_for(ledger: Ledger, rows: Sequence[Row], *, now: datetime) -> None:
    results = ledger.claim(
        [
            ClaimRequest(
                r.stream, r.key, fingerprint(f"{ledger.run_id}:{r.key}"), r.record["connection_id"]
            )
            for r in rows
        ],
        now=now,
    )
    assert [res.decision.value for res in results] == ["send"] * len(rows)


def post_directly(sandbox: Sandbox, body: Mapping[str, Any]) -> str:
    """What another process's POST left at Catena: an operation; returns its id."""
    form = (
        "grant_type=client_credentials&client_id=other&client_secret=other-secret"
        "&scope=organization"
    )
    token_request = urllib.request.Request(
        sandbox.url + TOKEN_PATH, data=form.encode(), method="POST"
    )
    with urllib.request.urlopen(token_request, timeout=10) as response:
        token = json.loads(response.read())["access_token"]
    request = urllib.request.Request(
        sandbox.url + "/v2/telematics/messages",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["id"])


def ledger_rows(path: Path) -> list[dict[str, Any]]:
    """Every ledger row, read with plain sqlite3 (not the target's code), in key order."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT * FROM catena_message_ledger ORDER BY namespace, key"
        ).fetchall()
    finally:
        conn.close()
    return [dict(r) for r in rows]


def wait_until_resolved(path: Path, rows: Sequence[Row]) -> None:
    """Until every row's key has an outcome in the ledger (accepted or dead-lettered)."""
    wanted = {(r.stream, r.key) for r in rows}
    deadline = time.monotonic() + WAIT
    while True:
        done = {
            (r["namespace"], r["key"])
            for r in ledger_rows(path)
            if r["status"] in ("accepted", "dead_lettered")
        }
        if wanted <= done:
            return
        assert time.monotonic() < deadline, f"never resolved: {sorted(wanted - done)}"
        time.sleep(0.05)


# -- masking -------------------------------------------------------------------------------------


@dataclass
class Masks:
    """What varies from one golden run to the next, and what each becomes."""

    replacements: dict[str, str] = field(default_factory=dict)  # exact substrings
    operations: dict[str, str] = field(default_factory=dict)  # operation id -> label

    def operation_labels(self, operations: Sequence[Mapping[str, Any]]) -> None:
        """Label each operation by the tag of the text Catena stored (in creation order)."""
        seen: dict[str, int] = {}
        for op in operations:
            found = TAG_IN_TEXT.match(str(op["payload"].get("message_text", "")))
            tag = found.group(1) if found else "?"
            seen[tag] = seen.get(tag, 0) + 1
            self.operations[op["id"]] = (
                f"<op {tag}>" if seen[tag] == 1 else f"<op {tag} #{seen[tag]}>"
            )

    def text(self, value: str) -> str:
        for old, new in self.replacements.items():
            value = value.replace(old, new)
        return UUID.sub(self._uuid, value)

    def _uuid(self, found: re.Match[str]) -> str:
        """An operation's label; the scenario's own ids as they are; any other id (Catena's log
        entries) ``<id>``."""
        value = found.group(0)
        label = self.operations.get(value)
        if label is not None:
            return label
        return value if value in FIXED_IDS else "<id>"

    def apply(self, value: Any, key: str | None = None) -> Any:
        """Mask ``value`` (found under ``key``) and everything in it."""
        if key == "record":  # the input as read: its times are the input's, not the clock's
            return self.literal(value)
        if isinstance(value, dict):
            return {k: self.apply(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.apply(v) for v in value]
        if isinstance(value, str):
            return "<time>" if key in TIME_KEYS else self.text(value)
        if key == "elapsed_seconds":
            return "<seconds>"
        return value

    def literal(self, value: Any) -> Any:
        """Only the text replacements (paths, the fresh time), nowhere a masked key."""
        if isinstance(value, dict):
            return {k: self.literal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.literal(v) for v in value]
        return self.text(value) if isinstance(value, str) else value


def normalised_states(states: list[dict[str, Any]], masks: Masks) -> list[Any]:
    lines = []
    for state in states:
        ours = state["target_catena_messages"]
        ours["operations"] = sorted(ours["operations"])
        ours["dead_letters"] = sorted(ours["dead_letters"])
        lines.append(masks.apply(state))
    return lines


def normalised_dead_letters(path: Path, run_id: str, masks: Masks) -> list[Any]:
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    mine = [e for e in entries if e["run_id"] == run_id]
    mine.sort(key=lambda e: (e["stream"], e["key"], e["stage"]))
    return [masks.apply(e) for e in mine]


def normalised_requests(received: Sequence[Mapping[str, Any]], masks: Masks) -> list[Any]:
    """Each POST /messages: whose body, the answer, the faults that fired, the operation made."""
    out = []
    for entry in received:
        body = entry["body"]
        text = body.get("message_text", "") if isinstance(body, dict) else ""
        found = TAG_IN_TEXT.match(str(text))
        out.append(
            {
                "n": entry["n"],
                "tag": found.group(1) if found else None,
                "status": entry["status"],
                "fault": entry["fault"],
                "operation": masks.operations.get(
                    entry["operation_id"] or "", entry["operation_id"]
                ),
            }
        )
    return out


# -- comparing -----------------------------------------------------------------------------------


def dump(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def write_golden(actual: Mapping[str, Any], golden_dir: Path) -> None:
    golden_dir.mkdir(parents=True, exist_ok=True)
    for name in ARTEFACTS:
        (golden_dir / f"{name}.json").write_text(dump(actual[name]))


def compare_with_golden(actual: Mapping[str, Any], golden_dir: Path, out_dir: Path) -> None:
    """Each artefact against its golden file; every mismatch shown as a unified diff.

    This run's artefacts are written to ``out_dir`` (named in the diff) for a closer look.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    diffs = []
    for name in ARTEFACTS:
        text = dump(actual[name])
        (out_dir / f"{name}.json").write_text(text)
        golden_path = golden_dir / f"{name}.json"
        if not golden_path.exists():
            diffs.append(f"{golden_path} is missing (UPDATE_GOLDEN=1 writes it)")
            continue
        expected = golden_path.read_text()
        if text != expected:
            diffs.append(
                "".join(
                    difflib.unified_diff(
                        expected.splitlines(keepends=True),
                        text.splitlines(keepends=True),
                        str(golden_path.relative_to(Path(__file__).parent.parent)),
                        f"{out_dir / name}.json (this run)",
                    )
                )
            )
    if diffs:
        pytest.fail(
            "the golden run differs (intended? regenerate with UPDATE_GOLDEN=1 and review):\n"
            + "\n".join(diffs),
            pytrace=False,
        )


class GoldenRun:
    """One sandbox, one work directory and ledger, and what each run left behind."""

    def __init__(
        self,
        workdir: Path,
        sandbox: Sandbox,
        *,
        fresh: str,
        catena: Mapping[str, Any],
        settings: Mapping[str, Any],
    ) -> None:
        self.workdir = workdir
        self.sandbox = sandbox
        self.fresh = fresh
        self.catena = dict(catena)  # the sandbox's config, less the fault plan
        self.ledger_path = workdir / "ledger.sqlite"
        self.ledger_url = f"sqlite:///{self.ledger_path}"
        self.config_path = workdir / "config.json"
        self.config_path.write_text(
            json.dumps(
                sandbox_config(
                    sandbox.url,
                    **settings,
                    dead_letter_path=str(workdir / "dead-letters.jsonl"),
                    ledger_url=self.ledger_url,
                )
            )
        )
        self.targets: list[LiveTarget] = []
        self.summaries: list[dict[str, Any]] = []
        self.results: dict[str, dict[str, Any]] = {name: {} for name in ARTEFACTS}
        self._received = 0

    def quiet(self) -> None:
        """No fault plan: what other processes do between runs meets no fault meant for a run."""
        self.sandbox.configure(self.catena)

    def run(
        self,
        name: str,
        chunks: Sequence[Chunk],
        faults: Mapping[str, Any],
        before_end: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """One run of the CLI, chunk by chunk; ``before_end`` runs after the last chunk is sent.

        Without ``before_end`` the last chunk's STATE is awaited too; with it, the input ends
        right after it (the last chunk then resolves at the end of input, see the docstring).
        """
        self.sandbox.configure({**self.catena, "faults": faults})
        target = LiveTarget(self.workdir, self.config_path, name)
        self.targets.append(target)
        target.send(schema_lines(chunks))
        for chunk in chunks:
            target.send(chunk_lines(chunk))
            if chunk is not chunks[-1] or before_end is None:
                target.wait_for_state(chunk.name)
        if before_end is not None:
            before_end()
        code = target.finish()
        summary = target.summary()
        assert code == summary["exit_code"], target.stderr()[-3000:]
        self.summaries.append(summary)
        self._collect(name, target, summary["run_id"])
        return summary

    def _collect(self, name: str, target: LiveTarget, run_id: str) -> None:
        masks = Masks()
        masks.operation_labels(self.sandbox.operations())
        masks.replacements.update(
            {str(self.workdir): "<workdir>", self.sandbox.url: "<sandbox>", self.fresh: "<fresh>"}
        )
        for i, summary in enumerate(self.summaries, 1):
            masks.replacements[summary["run_id"]] = f"<run {i}>"
        received = self.sandbox.received()
        results = self.results
        results["states"][name] = normalised_states(target.states, masks)
        results["dead_letters"][name] = normalised_dead_letters(
            self.workdir / "dead-letters.jsonl", run_id, masks
        )
        results["ledger"][name] = [masks.apply(r) for r in ledger_rows(self.ledger_path)]
        results["summaries"][name] = masks.apply(self.summaries[-1])
        results["requests"][name] = normalised_requests(received[self._received :], masks)
        self._received = len(received)

    def check(self, golden_dir: Path, covered: Callable[[], None], out_dir: Path) -> None:
        """Compare with (or, with UPDATE_GOLDEN=1, write) the golden files; check coverage."""
        if os.environ.get("UPDATE_GOLDEN") == "1":
            covered()  # never pin a scenario that no longer takes the paths it is there for
            write_golden(self.results, golden_dir)
            pytest.skip("golden files rewritten: review the diff, then run without UPDATE_GOLDEN")
        else:  # the diff first: it says what changed, the coverage checks only that something did
            compare_with_golden(self.results, golden_dir, out_dir)
            covered()


GoldenFactory = Callable[..., GoldenRun]


@pytest.fixture
def golden_run(tmp_path: Path, sandbox_factory: Callable[..., Sandbox]) -> Iterator[GoldenFactory]:
    """``golden_run(catena=..., settings=...)``: a started sandbox and a fresh work directory."""
    made: list[GoldenRun] = []
    fresh = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=10)

    def make(*, catena: Mapping[str, Any], settings: Mapping[str, Any]) -> GoldenRun:
        workdir = tmp_path / f"work{len(made)}"
        workdir.mkdir()
        run = GoldenRun(
            workdir,
            sandbox_factory(dict(catena)),
            fresh=fresh.isoformat().replace("+00:00", "Z"),
            catena=catena,
            settings=settings,
        )
        made.append(run)
        return run

    yield make
    for run in made:
        for target in run.targets:
            target.kill()


def test_golden_run_is_unchanged(tmp_path: Path, golden_run: GoldenFactory) -> None:
    """Two runs of the fixed scenario; STATE, dead letters, ledger, summary and POSTs as pinned."""
    golden = golden_run(catena={"message_schema": "source_ids"}, settings=SETTINGS)
    run1, run2 = scenario(golden.fresh)
    rows = {(r.stream, r.key): r for c in run1 + run2 for r in c.rows}
    recovered = [rows[ORDERS, "R1"], rows[ORDERS, "R2"]]
    held = [rows[ORDERS, "H1"], rows[ORDERS, "H2"]]
    ten_minutes_ago = datetime.now(timezone.utc) - timedelta(minutes=10)

    # A run that died ten minutes ago left two claims: it had sent R1 (Catena has it), not R2.
    with Ledger.open(golden.ledger_url, run_id=DEAD_RUN, lease_seconds=60) as dead:
        claim_for(dead, recovered, now=ten_minutes_ago)
    post_directly(golden.sandbox, body_of(recovered[0]))

    first = golden.run("run1", run1, RUN1_FAULTS)
    fired = [golden.sandbox.stats()["faults_fired"]]

    # Between the runs another process claims H1 and H2 and sends H1; it is still alive.
    golden.quiet()
    other = Ledger.open(golden.ledger_url, run_id=OTHER_RUN, lease_seconds=300)
    claim_for(other, held, now=datetime.now(timezone.utc))
    h1_operation = post_directly(golden.sandbox, body_of(held[0]))

    def holder_finishes() -> None:
        # The rest of the last chunk resolves while the holder keeps its claims: the target met
        # both keys held (they come first in the chunk) and sent the others past them. Then the
        # holder records H1 accepted and drops its claim on H2, which it never sent.
        wait_until_resolved(golden.ledger_path, [r for r in run2[-1].rows if r not in held])
        h1 = held[0]
        outcome = LedgerOutcome(
            h1.stream,
            h1.key,
            "accepted",
            fingerprint(f"{OTHER_RUN}:{h1.key}"),
            h1_operation,
            attempts=1,
            connection_id=h1.record["connection_id"],
        )
        other.record([outcome])
        other.release([(held[1].stream, held[1].key)])

    try:
        second = golden.run("run2", run2, RUN2_FAULTS, holder_finishes)
    finally:
        other.close()
    fired.append(golden.sandbox.stats()["faults_fired"])

    golden.check(
        GOLDEN_DIR / "source_ids",
        lambda: assert_scenario_covered(golden, first, second, fired),
        tmp_path / "actual",
    )


def assert_scenario_covered(
    golden: GoldenRun, first: Mapping[str, Any], second: Mapping[str, Any], fired: list[Any]
) -> None:
    """The scenario proves what it claims only if every fault fired and every path was taken."""
    assert all(n >= 1 for plan in fired for n in plan), fired
    assert (first["exit_code"], second["exit_code"]) == (2, 2), (first, second)
    totals1, totals2 = first["totals"], second["totals"]
    assert totals1["duplicates"] >= 2, totals1  # copies behind an accepted key, in run 1
    assert totals1["expired"] >= 1, totals1
    assert totals1["dead_lettered_by_stage"]["api"] >= 2, totals1  # retries ran out; a 422
    assert totals1["previously_dead_lettered"] >= 2, totals1  # copies behind dead letters
    assert first["http"]["operations_adopted"] >= 3, first["http"]  # R1, a drop, a 500 after
    assert totals2["duplicates"] >= 5, totals2
    assert totals2["previously_dead_lettered"] >= 3, totals2
    ledger = {(r["namespace"], r["key"]): r for r in ledger_rows(golden.ledger_path)}
    assert ledger[ORDERS, "H1"]["run_id"] == OTHER_RUN  # the holder's outcome stands
    assert ledger[ORDERS, "H2"]["status"] == "accepted"  # released, then sent by run 2


def test_golden_catena_ids_run_is_unchanged(tmp_path: Path, golden_run: GoldenFactory) -> None:
    """The catena_ids body with ``is_sync``, users resolved from provider ids, as pinned."""
    golden = golden_run(catena=CATENA_IDS_SANDBOX, settings=CATENA_IDS_SETTINGS)
    summary = golden.run("sync", catena_ids_scenario(golden.fresh), SYNC_FAULTS)
    fired = golden.sandbox.stats()["faults_fired"]

    def covered() -> None:
        assert all(n >= 1 for n in fired), fired
        assert summary["exit_code"] == 2, summary
        stages = summary["totals"]["dead_lettered_by_stage"]
        assert stages["validation"] >= 4, stages  # unknown ids, two drivers, a bad priority
        assert stages["api"] >= 1, stages  # the TSP refused a sync message
        assert summary["http"]["operations_adopted"] >= 2, summary["http"]

    golden.check(GOLDEN_DIR / "catena_ids", covered, tmp_path / "actual")
