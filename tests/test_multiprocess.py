"""Several target processes, one PostgreSQL ledger: every record once, even when one is killed.

Like a Meltano job per fleet on different machines that were given overlapping rows. Both
processes are the real CLI, started together against one sandbox process; the ledger is a fresh
schema in the test database. Ground truth is the sandbox's accepted bodies, counted per key.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.harness import singer_lines
from tests.pg import fresh_schema_url
from tests.test_crash import (
    STREAM,
    SandboxProcess,
    TargetProcess,
    copies_by_key,
    dispatch_record,
    position,
    read_dead_letters,
    reap_targets,  # noqa: F401 - autouse: kills leftover targets
    sandbox_process,
    start_target,
    write_config,
    write_input,
)

pytestmark = pytest.mark.postgres

FAULTS: list[dict[str, Any]] = [
    {"kind": "latency", "ms": 5, "jitter_ms": 25},
    {"kind": "drop", "match": {"probability": 0.02}},
    {"kind": "status", "status": 503, "match": {"probability": 0.03}},
]


def pg_ledger(url: str) -> dict[str, dict[str, Any]]:
    """The ledger rows by key, read with plain psycopg (not the target's code)."""
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT * FROM catena_message_ledger")
        return {row["key"]: row for row in cur.fetchall()}


def start(
    workdir: Path, sandbox: SandboxProcess, ledger_url: str, first: int, last: int, name: str
) -> TargetProcess:
    """One process on records ``first..last`` with its own dead letters and the shared ledger."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [dispatch_record(i) for i in range(first, last + 1)]
    lines = singer_lines(STREAM, rows, state_every=10)
    # bookmarks carry the record id, so a STATE line says which ids it covers
    lines = [_absolute_bookmark(line, first) for line in lines]
    config = write_config(
        workdir, sandbox.url, ledger_url=ledger_url, max_concurrency=8, batch_size_rows=50
    )
    config.write_text(
        json.dumps(json.loads(config.read_text()) | {"operation_lookup_lag_seconds": 1})
    )
    return start_target(workdir, config, write_input(workdir / "input.jsonl", lines), name)


def _absolute_bookmark(line: str, first: int) -> str:
    message = json.loads(line)
    if message["type"] == "STATE":
        bookmark = message["value"]["bookmarks"][STREAM]
        bookmark["replication_key_value"] += first - 1
    return json.dumps(message)


def assert_states_backed_by_ledger(
    states: list[dict[str, Any]], ledger: dict[str, dict[str, Any]], first: int
) -> None:
    for state in states:
        for i in range(first, position(state) + 1):
            assert ledger.get(str(i), {}).get("status") in ("accepted", "dead_lettered"), (
                f"STATE at {position(state)} covers {i}, unresolved in the ledger"
            )
        for _, key, op in state["target_catena_messages"]["operations"]:
            assert ledger[key]["operation_id"] == op


def assert_every_record_once(
    copies: Counter[str], ledger: dict[str, dict[str, Any]], dead: list[dict[str, Any]], n: int
) -> int:
    """Every key 1..n accepted exactly once; returns the number of ambiguous dead letters."""
    ambiguous = {d["key"] for d in dead if d["stage"] == "ambiguous"}
    assert {d["stage"] for d in dead} <= {"ambiguous"}, dead
    duplicated = sorted(k for k, c in copies.items() if c > 1)
    lost = sorted(
        str(i) for i in range(1, n + 1) if copies[str(i)] == 0 and str(i) not in ambiguous
    )
    assert duplicated == [], f"sent more than once: {duplicated}"
    assert lost == [], f"never sent: {lost}"
    for i in range(1, n + 1):
        row = ledger[str(i)]
        assert row["status"] == ("dead_lettered" if str(i) in ambiguous else "accepted"), row
    return len(ambiguous)


@pytest.mark.parametrize("seed", [5, 17])
def test_two_processes_one_killed_then_rerun_every_record_once(
    tmp_path: Path, pg_url: str, seed: int
) -> None:
    rng = random.Random(seed)
    ledger_url = fresh_schema_url(pg_url)
    config = {"list_lag_seconds": 0.5, "faults": {"seed": seed, "rules": FAULTS}}
    with sandbox_process(tmp_path / "sandbox", config) as sandbox:
        a = start(tmp_path / "a", sandbox, ledger_url, 1, 200, "a")
        b = start(tmp_path / "b", sandbox, ledger_url, 101, 300, "b")
        try:
            a.proc.wait(rng.uniform(0.8, 2.5))
        except subprocess.TimeoutExpired:
            a.proc.send_signal(signal.SIGKILL)
        killed = a.proc.wait() == -signal.SIGKILL
        assert b.proc.wait(120) in (0, 2), b.stderr()[-3000:]
        ledger = pg_ledger(ledger_url)
        assert_states_backed_by_ledger(a.states(), ledger, 1)
        assert_states_backed_by_ledger(b.states(), ledger, 101)
        assert position(b.states()[-1]) == 300

        rerun = start(tmp_path / "rerun", sandbox, ledger_url, 1, 300, "rerun")
        assert rerun.proc.wait(120) in (0, 2), rerun.stderr()[-3000:]
        copies = copies_by_key(sandbox.accepted_bodies())
    ledger = pg_ledger(ledger_url)
    dead = [
        d
        for w in ("a", "b", "rerun")
        for d in read_dead_letters(tmp_path / w / "dead-letters.jsonl")
    ]
    ambiguous = assert_every_record_once(copies, ledger, dead, 300)
    assert position(rerun.states()[-1]) == 300
    print(
        f"\n[two processes, seed {seed}] records=300 killed={killed} "
        f"lost=0 duplicated=0 ambiguous={ambiguous} bodies={sum(copies.values())}"
    )


def test_two_live_processes_on_the_same_rows_send_each_once(tmp_path: Path, pg_url: str) -> None:
    ledger_url = fresh_schema_url(pg_url)
    config = {"faults": {"seed": 3, "rules": FAULTS[:1]}}
    with sandbox_process(tmp_path / "sandbox", config) as sandbox:
        a = start(tmp_path / "a", sandbox, ledger_url, 1, 200, "a")
        b = start(tmp_path / "b", sandbox, ledger_url, 1, 200, "b")
        assert a.proc.wait(120) == 0, a.stderr()[-3000:]
        assert b.proc.wait(120) == 0, b.stderr()[-3000:]
        copies = copies_by_key(sandbox.accepted_bodies())
    assert copies == Counter({str(i): 1 for i in range(1, 201)})
    totals = [p.states()[-1]["target_catena_messages"]["totals"] for p in (a, b)]
    assert sum(t["accepted"] for t in totals) == 200
    assert sum(t["duplicates"] for t in totals) == 200
    # both report the one operation id of every key, whoever sent it
    ops_a = {
        key: op for s in a.states() for _, key, op in s["target_catena_messages"]["operations"]
    }
    ops_b = {
        key: op for s in b.states() for _, key, op in s["target_catena_messages"]["operations"]
    }
    assert ops_a == ops_b
    assert {k: r["operation_id"] for k, r in pg_ledger(ledger_url).items()} == ops_a
