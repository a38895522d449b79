"""A driver's later messages wait behind a key that another (or a dead) run still holds.

The other run is made through the ledger's own API: a claim under a run id of another host (so
this host cannot see whether it lives), then, while the target waits, either its outcome (the
holder finished) or a lease that ran out (it died). The target is the real CLI against the
in-process sandbox; the truth is the sandbox's log of the bodies it accepted, in arrival order.
Every record's text names its stream and key (``[A:3]``), so the log says who went out when.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from target_catena_messages.ledger import ClaimRequest, Ledger, LedgerOutcome
from target_catena_messages.sandbox import Sandbox
from tests.harness import state_line
from tests.test_crash import (  # noqa: F401 - reap_targets is autouse: kills leftover targets
    TargetProcess,
    reap_targets,
    sqlite_ledger,
    start_target,
    write_config,
    write_input,
)

CONN = "11111111-1111-4111-8111-111111111111"
A, B = "fleet_a-messages", "fleet_b-messages"
OTHER_RUN = "another-host.example/4242/0badc0de"  # another machine: only its lease says it lives
HELD_LANE = "driver-held"
TAG = re.compile(r"^\[([^\]]+)\]")
WAIT = 90.0


def record(stream: str, i: int, driver: str) -> dict[str, Any]:
    return {
        "id": i,
        "connection_id": CONN,
        "source_sender_id": "dispatcher-7",
        "source_recipient_ids": [driver],
        "message_text": f"[{stream[6].upper()}:{i}] go to dock {i} ({driver})",
    }


def tag(body: dict[str, Any]) -> str:
    """``A:3`` for the record with id 3 of stream A."""
    found = TAG.match(body["message_text"])
    assert found is not None, body
    return found.group(1)


def singer_input(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """SCHEMA of both streams, then the rows in the given order, a tap STATE after each."""
    props = {name: {} for name in record(A, 0, "x")}
    lines = [
        json.dumps(
            {
                "type": "SCHEMA",
                "stream": stream,
                "schema": {"type": "object", "properties": props},
                "key_properties": ["id"],
            }
        )
        for stream in (A, B)
    ]
    for n, (stream, row) in enumerate(rows, 1):
        lines.append(json.dumps({"type": "RECORD", "stream": stream, "record": row}))
        lines.append(state_line(A, n))  # position n: every row up to the n-th in input order
    return lines


def fingerprint(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


@contextmanager
def other_run(ledger_url: str, stream: str, key: str) -> Iterator[Ledger]:
    """Another host's run that claimed ``key`` (lease 10 minutes) and has not finished it."""
    other = Ledger.open(ledger_url, run_id=OTHER_RUN, lease_seconds=600)
    try:
        [result] = other.claim([ClaimRequest(stream, key, fingerprint(key), CONN)])
        assert result.decision.value == "send"
        yield other
    finally:
        other.close()


def post_directly(sandbox: Sandbox, body: dict[str, Any]) -> str:
    """The other run's POST of its key: an operation at Catena; returns its id."""
    form = "grant_type=client_credentials&client_id=other&client_secret=x&scope=organization"
    token_request = urllib.request.Request(
        sandbox.url + "/realms/catena/protocol/openid-connect/token",
        data=form.encode(),
        method="POST",
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


def sent(sandbox: Sandbox) -> list[str]:
    """Tags of the bodies the sandbox accepted, in arrival order."""
    return [tag(body) for body in sandbox.accepted_bodies()]


def wait_for(target: TargetProcess, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        assert target.proc.poll() is None, f"target ended early: {target.stderr()[-3000:]}"
        assert time.monotonic() < deadline, target.stderr()[-3000:]
        time.sleep(0.1)


def start(
    workdir: Path, sandbox: Sandbox, rows: Sequence[tuple[str, dict[str, Any]]], **settings: Any
) -> TargetProcess:
    config = write_config(
        workdir,
        sandbox.url,
        max_concurrency=2,
        operation_lookup_lag_seconds=0.2,
        **settings,
    )
    return start_target(workdir, config, write_input(workdir / "in.jsonl", singer_input(rows)), "t")


def positions(target: TargetProcess) -> list[int]:
    return [int(s["bookmarks"][A]["replication_key_value"]) for s in target.states()]


def lane_order(sandbox: Sandbox, rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    held = {tag(row) for _, row in rows if row["source_recipient_ids"] == [HELD_LANE]}
    return [t for t in sent(sandbox) if t in held]


# One stream: another lane before the held key K (A:2), then K's lane (A:3, A:5) among others.
ONE_STREAM = [
    (A, record(A, 1, "driver-1")),
    (A, record(A, 2, HELD_LANE)),  # K, held by the other run
    (A, record(A, 3, HELD_LANE)),
    (A, record(A, 4, "driver-1")),
    (A, record(A, 5, HELD_LANE)),
    *[(A, record(A, i, f"driver-{i % 2}")) for i in range(6, 12)],
]
OTHERS_ONE = {tag(r) for _, r in ONE_STREAM if r["source_recipient_ids"] != [HELD_LANE]}


def test_later_messages_of_a_lane_wait_until_the_holder_finishes(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    with other_run(ledger_url, A, "2") as other:
        # One batch: A:3 and A:5 are claimed in the same transaction that finds K held.
        target = start(tmp_path, sandbox, ONE_STREAM, batch_size_rows=100)
        wait_for(target, lambda: set(sent(sandbox)) >= OTHERS_ONE)
        assert not {"A:3", "A:5"} & set(sent(sandbox)), sent(sandbox)  # behind K, not sent
        assert max(positions(target), default=0) < 2  # STATE stops before K
        rows = sqlite_ledger(tmp_path / "ledger.sqlite")
        assert (rows["3"]["status"], rows["5"]["status"]) == ("claimed", "claimed")

        # The other run finishes K: its POST went through, its outcome is recorded.
        operation = post_directly(sandbox, record(A, 2, HELD_LANE))
        other.record(
            [LedgerOutcome(A, "2", "accepted", fingerprint("2"), operation, connection_id=CONN)]
        )
        assert target.proc.wait(WAIT) == 0, target.stderr()[-3000:]

    assert lane_order(sandbox, ONE_STREAM) == ["A:2", "A:3", "A:5"]  # K by the other run
    assert sorted(sent(sandbox)) == sorted(tag(r) for _, r in ONE_STREAM)  # each once
    summary = target.summary()
    assert summary is not None
    assert summary["totals"]["duplicates"] == 1, summary
    assert positions(target)[-1] == len(ONE_STREAM)


def test_a_held_key_whose_lease_runs_out_is_recovered_before_its_lane_moves(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    with other_run(ledger_url, A, "2") as other:
        target = start(tmp_path, sandbox, ONE_STREAM, batch_size_rows=100)
        wait_for(target, lambda: set(sent(sandbox)) >= OTHERS_ONE)
        assert not {"A:2", "A:3", "A:5"} & set(sent(sandbox)), sent(sandbox)
        # The other run died without a word: its lease runs out (it is as if renewed long ago).
        other.renew_leases([(A, "2")], now=datetime.now(timezone.utc) - timedelta(minutes=11))
        assert target.proc.wait(WAIT) == 0, target.stderr()[-3000:]

    # K was looked up (its send may have happened), found nowhere, sent; only then its lane.
    assert lane_order(sandbox, ONE_STREAM) == ["A:2", "A:3", "A:5"]
    assert sorted(sent(sandbox)) == sorted(tag(r) for _, r in ONE_STREAM)
    summary = target.summary()
    assert summary is not None
    assert summary["totals"]["accepted"] == len(ONE_STREAM), summary
    assert sandbox.stats()["requests"].get("operations", 0) >= 1  # K's lookup
    assert positions(target)[-1] == len(ONE_STREAM)


# Two streams interleaved; the lane crosses them: K is A:1, its lane goes on with B:1, A:2, B:2.
TWO_STREAMS = [
    (B, record(B, 10, "driver-1")),
    (A, record(A, 1, HELD_LANE)),  # K, held by the other run
    (B, record(B, 11, "driver-2")),
    (B, record(B, 1, HELD_LANE)),
    (A, record(A, 10, "driver-1")),
    (A, record(A, 2, HELD_LANE)),
    (A, record(A, 11, "driver-2")),
    (B, record(B, 12, "driver-1")),
    (B, record(B, 2, HELD_LANE)),
    (A, record(A, 12, "driver-2")),
    (B, record(B, 13, "driver-2")),
]
OTHERS_TWO = {tag(r) for _, r in TWO_STREAMS if r["source_recipient_ids"] != [HELD_LANE]}


def test_a_lane_waits_across_streams(tmp_path: Path, sandbox: Sandbox) -> None:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    with other_run(ledger_url, A, "1") as other:
        # Small batches: most of the lane arrives after K was found held (never claimed then).
        target = start(tmp_path, sandbox, TWO_STREAMS, batch_size_rows=2)
        wait_for(target, lambda: set(sent(sandbox)) >= OTHERS_TWO)
        assert not {"B:1", "A:2", "B:2"} & set(sent(sandbox)), sent(sandbox)
        assert max(positions(target), default=0) < 2  # STATE stops before K
        operation = post_directly(sandbox, record(A, 1, HELD_LANE))
        other.record(
            [LedgerOutcome(A, "1", "accepted", fingerprint("1"), operation, connection_id=CONN)]
        )
        assert target.proc.wait(WAIT) == 0, target.stderr()[-3000:]

    assert lane_order(sandbox, TWO_STREAMS) == ["A:1", "B:1", "A:2", "B:2"]
    assert sorted(sent(sandbox)) == sorted(tag(r) for _, r in TWO_STREAMS)
    assert positions(target)[-1] == len(TWO_STREAMS)


def test_a_signal_while_a_lane_waits_releases_the_claims_never_sent(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    with other_run(ledger_url, A, "2"):
        target = start(tmp_path, sandbox, ONE_STREAM, batch_size_rows=100)
        wait_for(target, lambda: set(sent(sandbox)) >= OTHERS_ONE)
        wait_for(target, lambda: len(target.states()) > 0)  # the STATE up to K is out
        target.proc.send_signal(signal.SIGTERM)
        assert target.proc.wait(WAIT) == 1, target.stderr()[-3000:]

    rows = sqlite_ledger(tmp_path / "ledger.sqlite")
    assert rows["2"]["run_id"] == OTHER_RUN  # still the other run's
    assert not {"3", "5"} & rows.keys()  # claimed behind K, never sent: released
    assert not {"A:2", "A:3", "A:5"} & set(sent(sandbox))
    assert positions(target)[-1] == 1  # the newest safe STATE: everything before K


def test_a_second_held_key_in_the_lane_holds_it_again(tmp_path: Path, sandbox: Sandbox) -> None:
    """K and A:5 both held: K finished frees A:3 only; A:5, released unsent, then goes with A:6."""
    rows = [
        *ONE_STREAM[:5],
        (A, record(A, 6, HELD_LANE)),
        *[(A, record(A, i, f"driver-{i % 2}")) for i in range(7, 12)],
    ]
    others = {tag(r) for _, r in rows if r["source_recipient_ids"] != [HELD_LANE]}
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    with other_run(ledger_url, A, "2") as other:
        [result] = other.claim([ClaimRequest(A, "5", fingerprint("5"), CONN)])
        assert result.decision.value == "send"
        target = start(tmp_path, sandbox, rows, batch_size_rows=100)
        wait_for(target, lambda: set(sent(sandbox)) >= others)
        assert not {"A:3", "A:5", "A:6"} & set(sent(sandbox)), sent(sandbox)

        operation = post_directly(sandbox, record(A, 2, HELD_LANE))
        other.record(
            [LedgerOutcome(A, "2", "accepted", fingerprint("2"), operation, connection_id=CONN)]
        )
        wait_for(target, lambda: "A:3" in sent(sandbox))
        assert not {"A:5", "A:6"} & set(sent(sandbox)), sent(sandbox)  # behind A:5 now
        other.release([(A, "5")])  # the other run gives A:5 up, never sent
        assert target.proc.wait(WAIT) == 0, target.stderr()[-3000:]

    assert lane_order(sandbox, rows) == ["A:2", "A:3", "A:5", "A:6"]
    assert sorted(sent(sandbox)) == sorted(tag(r) for _, r in rows)
    assert positions(target)[-1] == len(rows)
