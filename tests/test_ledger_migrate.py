"""Older ledgers upgrade in place, a newer one is refused; a stopped run leaves no lease to wait.

The older ledger is the schema and rows that commit b24970d's own code wrote (level 0, before
the counters and before levels were recorded), checked in under tests/fixtures/ by
``make_b24970d_ledgers.py``: SQLite as its dump, PostgreSQL as the DDL that code executed plus
the rows it wrote.
"""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from target_catena_messages.ledger import (
    ClaimRequest,
    ClaimResult,
    Decision,
    Ledger,
    LedgerError,
)
from tests.harness import singer_lines
from tests.pg import _conninfo, fresh_schema_url
from tests.test_crash import (
    STREAM,
    _wait_for,
    ambiguous_settings,
    catena_ids_record,
    catena_ids_sandbox,
    copies_by_key,
    read_dead_letters,
    reap_targets,  # noqa: F401 - the fixture that kills targets a failed test left running
    sandbox_process,
    sqlite_ledger,
    start_target,
    write_input,
)

FIXTURES = Path(__file__).parent / "fixtures"
T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)  # the fixture's rows are dated around it
NOW = T0 + timedelta(seconds=100)  # the live claim's lease still runs, the others ran out
NS = "dispatch_messages"
FP = "ab" * 32
FP_OTHER = "cd" * 32
OLD_COLUMNS = [
    "namespace", "key", "status", "fingerprint", "operation_id", "stage", "attempts",
    "connection_id", "run_id", "claimed_at", "lease_until", "ambiguous_since", "resolved_at",
    "confirmed_status", "updated_at",
]  # fmt: skip
LEVEL_LOG = "upgraded from schema level 0 to 1"


def _t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# What b24970d decides for each fixture key (the fingerprint asked for, the result).
EXPECTED: dict[str, tuple[str, ClaimResult]] = {
    "accepted": (FP, ClaimResult(Decision.DUPLICATE, operation_id="op-1")),
    "dead": (FP, ClaimResult(Decision.PREVIOUSLY_DEAD_LETTERED, stage="api")),
    "dead-changed": (FP_OTHER, ClaimResult(Decision.SEND, stage="api")),
    "invalid": (FP, ClaimResult(Decision.PREVIOUSLY_DEAD_LETTERED, stage="validation")),
    "expired": (FP, ClaimResult(Decision.RECOVER, prior_claimed_at=_t(-1000))),
    "ambiguous": (FP, ClaimResult(Decision.RECOVER, prior_claimed_at=_t(-1000))),
    "live": (FP, ClaimResult(Decision.IN_PROGRESS_ELSEWHERE, prior_claimed_at=_t(0))),
}


def requests() -> list[ClaimRequest]:
    return [ClaimRequest(NS, key, fp, "conn-1") for key, (fp, _) in EXPECTED.items()]


# -- an older ledger, both dialects ---------------------------------------------------------------


class Old:
    """An older ledger at ``url``, and plain-SQL access to it that bypasses the target's code."""

    def __init__(self, url: str, dialect: str) -> None:
        self.url = url
        self.dialect = dialect

    def execute(self, sql: str) -> list[tuple[Any, ...]]:
        if self.dialect == "sqlite":
            conn = sqlite3.connect(sa.make_url(self.url).database or "")
            try:
                rows = conn.execute(sql).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        with psycopg.connect(_conninfo(self.url), autocommit=True) as pg:
            cur = pg.execute(sql.encode())
            return cur.fetchall() if cur.description else []

    def columns(self) -> list[str]:
        if self.dialect == "sqlite":
            return [r[1] for r in self.execute("PRAGMA table_info(catena_message_ledger)")]
        return [
            r[0]
            for r in self.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'catena_message_ledger' "
                "ORDER BY ordinal_position"
            )
        ]

    def rows(self, columns: list[str]) -> dict[str, tuple[Any, ...]]:
        quoted = ", ".join(f'"{c}"' for c in columns)
        found = self.execute(f"SELECT {quoted} FROM catena_message_ledger")
        return {r[columns.index("key")]: tuple(r) for r in found}

    def level(self) -> list[tuple[Any, ...]]:
        return self.execute("SELECT id, schema_level FROM catena_message_ledger_meta")

    def has_meta(self) -> bool:
        if self.dialect == "sqlite":
            found = self.execute(
                "SELECT name FROM sqlite_master WHERE name = 'catena_message_ledger_meta'"
            )
        else:
            found = self.execute("SELECT to_regclass('catena_message_ledger_meta')::text")
            found = [r for r in found if r[0] is not None]
        return bool(found)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def old(request: pytest.FixtureRequest, tmp_path: Path) -> Old:
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite"
        conn = sqlite3.connect(path)
        conn.executescript((FIXTURES / "ledger_b24970d_sqlite.sql").read_text())
        conn.close()
        return Old(f"sqlite:///{path}", "sqlite")
    url = fresh_schema_url(request.getfixturevalue("pg_url"))
    rows = json.loads((FIXTURES / "ledger_b24970d_rows.json").read_text())["rows"]
    with psycopg.connect(_conninfo(url), autocommit=True) as conn:
        conn.execute((FIXTURES / "ledger_b24970d_postgresql.sql").read_text().encode())
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO catena_message_ledger ({', '.join(OLD_COLUMNS)}) "
                f"VALUES ({', '.join(['%s'] * len(OLD_COLUMNS))})",
                [[r[c] for c in OLD_COLUMNS] for r in rows],
            )
    return Old(url, "postgresql")


def upgrade_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "upgraded from schema level" in r.message]


# -- upgrade in place ---------------------------------------------------------------------------


def test_an_older_ledger_is_upgraded_in_place_and_decides_as_before(
    old: Old, caplog: pytest.LogCaptureFixture
) -> None:
    assert old.columns() == OLD_COLUMNS
    assert not old.has_meta()
    before = old.rows(OLD_COLUMNS)
    assert len(before) == len(EXPECTED)

    caplog.set_level(logging.INFO, logger="target_catena_messages.ledger")
    with Ledger.open(old.url, run_id="new-host/1/dddddddd") as ledger:
        [line] = upgrade_logs(caplog)
        assert line == f"ledger at {ledger.location} {LEVEL_LOG}"
        assert old.columns() == [*OLD_COLUMNS, "ambiguous_resends", "outage_exits"]
        assert old.level() == [(1, 1)]
        assert old.rows(OLD_COLUMNS) == before  # every row intact
        counters = old.rows(["key", "ambiguous_resends", "outage_exits"])
        assert {k: c for k, *c in counters.values()} == {k: [0, 0] for k in EXPECTED}

        expected = [result for _, result in EXPECTED.values()]
        assert ledger.peek(requests(), now=NOW) == expected
        assert ledger.claim(requests(), now=NOW) == expected  # the write path too
        # and the API that needs the new columns works on an upgraded ledger
        assert ledger.note_resend(NS, "expired") == 1
        assert ledger.note_outage_exit([(NS, "ambiguous")]) == {(NS, "ambiguous"): 1}


def test_opening_an_upgraded_ledger_again_changes_nothing(
    old: Old, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="target_catena_messages.ledger")
    Ledger.open(old.url, run_id="r1").close()
    columns = [*OLD_COLUMNS, "ambiguous_resends", "outage_exits"]
    after_first = old.rows(columns)
    Ledger.open(old.url, run_id="r2").close()
    assert len(upgrade_logs(caplog)) == 1
    assert old.columns() == columns
    assert old.level() == [(1, 1)]
    assert old.rows(columns) == after_first


def test_two_processes_opening_an_older_ledger_at_once_both_succeed(
    old: Old, caplog: pytest.LogCaptureFixture
) -> None:
    """Each thread has its own engine and connection: what two processes starting at once do."""
    caplog.set_level(logging.INFO, logger="target_catena_messages.ledger")
    starts = threading.Barrier(4)
    outcomes: list[object] = []

    def open_one(n: int) -> None:
        starts.wait()
        try:
            with Ledger.open(old.url, run_id=f"racer-{n}") as ledger:
                outcomes.append(ledger.peek(requests(), now=NOW))
        except Exception as exc:  # reported by the assertion below
            outcomes.append(exc)

    threads = [threading.Thread(target=open_one, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    expected = [result for _, result in EXPECTED.values()]
    assert outcomes == [expected] * 4
    assert len(upgrade_logs(caplog)) == 1
    assert old.columns() == [*OLD_COLUMNS, "ambiguous_resends", "outage_exits"]
    assert old.level() == [(1, 1)]


def test_a_step_half_there_is_completed(old: Old) -> None:
    """A column added by hand (or by anything else) before the level was recorded is kept."""
    old.execute(
        "ALTER TABLE catena_message_ledger ADD COLUMN outage_exits INTEGER DEFAULT 0 NOT NULL"
    )
    old.execute("UPDATE catena_message_ledger SET outage_exits = 2 WHERE key = 'expired'")
    with Ledger.open(old.url, run_id="r") as ledger:
        [expired] = ledger.peek([ClaimRequest(NS, "expired", FP, None)], now=NOW)
    assert expired == ClaimResult(Decision.RECOVER, prior_claimed_at=_t(-1000), outage_exits=2)
    assert old.columns() == [*OLD_COLUMNS, "outage_exits", "ambiguous_resends"]
    assert old.level() == [(1, 1)]


def test_an_older_ledger_opened_read_only_is_read_as_upgraded_and_left_alone(old: Old) -> None:
    before = old.rows(OLD_COLUMNS)
    with Ledger.open(old.url, run_id="dry", read_only=True) as ro:
        assert ro.peek(requests(), now=NOW) == [result for _, result in EXPECTED.values()]
        row = ro.get(NS, "ambiguous")
        assert row is not None
        assert (row["ambiguous_since"], row["ambiguous_resends"], row["outage_exits"]) == (
            _t(-1000),
            0,
            0,
        )
        assert len(list(ro.rows())) == len(EXPECTED)
        assert len(list(ro.report_rows(settled=True))) == len(EXPECTED)
    assert old.columns() == OLD_COLUMNS
    assert not old.has_meta()
    assert old.rows(OLD_COLUMNS) == before


# -- a newer ledger -----------------------------------------------------------------------------


@pytest.mark.parametrize("read_only", [False, True])
def test_a_ledger_from_a_newer_target_is_refused_with_one_line(old: Old, read_only: bool) -> None:
    Ledger.open(old.url, run_id="r").close()
    old.execute("UPDATE catena_message_ledger_meta SET schema_level = 2")
    columns = [*OLD_COLUMNS, "ambiguous_resends", "outage_exits"]
    before = old.rows(columns)
    with pytest.raises(LedgerError) as refused:
        Ledger.open(old.url, run_id="r", read_only=read_only)
    message = str(refused.value)
    assert "\n" not in message
    assert "has schema level 2, newer than this target's 1" in message
    location = sa.make_url(old.url).database if old.dialect == "sqlite" else "postgresql://"
    assert f"ledger at {location}" in message
    assert old.rows(columns) == before
    assert old.level() == [(1, 2)]


def test_a_new_ledger_is_made_at_the_current_level(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.sqlite'}"
    Ledger.open(url, run_id="r").close()
    fresh = Old(url, "sqlite")
    assert fresh.level() == [(1, 1)]
    assert fresh.columns() == [*OLD_COLUMNS, "ambiguous_resends", "outage_exits"]


# -- the recorder: a stopped run's maybe-sent claims are left for lookup, lease ended ------------


def test_an_interrupted_ambiguous_send_is_left_for_lookup_without_a_lease(tmp_path: Path) -> None:
    """The next run, even on another machine, looks the key up at once instead of waiting.

    Request 2's answer is dropped, and the run is stopped while it waits for the operation
    list to catch up. The claim must end its lease and stay ambiguous since the first attempt.
    The first run is then made to look like another machine's (its pid no longer tells that
    it is dead), so only the ended lease lets the re-run take the key over at once.
    """
    with sandbox_process(tmp_path / "sandbox", catena_ids_sandbox([2])) as sandbox:
        records = [catena_ids_record(i) for i in range(1, 5)]
        settings = ambiguous_settings(sandbox.url, tmp_path) | {"operation_lookup_lag_seconds": 20}
        config = tmp_path / "config.json"
        config.write_text(json.dumps(settings))
        input_path = write_input(
            tmp_path / "input.jsonl", singer_lines(STREAM, records, state_every=1)
        )
        run = start_target(tmp_path, config, input_path, "interrupted")
        _wait_for(lambda: len(sandbox.get("/_sandbox/received")) >= 2)
        time.sleep(1.0)  # the lane now waits for the list to catch up with request 2
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(60) == 1, run.stderr()[-3000:]

        ledger_path = tmp_path / "ledger.sqlite"
        row = sqlite_ledger(ledger_path)["2"]
        assert row["status"] == "claimed"
        assert row["lease_until"] is None
        assert row["ambiguous_since"] is not None
        assert row["ambiguous_since"] >= row["claimed_at"]  # the first attempt, after the claim

        conn = sqlite3.connect(ledger_path)
        conn.execute("UPDATE catena_message_ledger SET run_id = 'elsewhere/1/0' WHERE key = '2'")
        conn.commit()
        conn.close()
        config.write_text(json.dumps(settings | {"operation_lookup_lag_seconds": 1}))
        rerun = start_target(tmp_path, config, input_path, "rerun")
        # With the lease still running (300 s) the re-run would wait it out: far beyond this.
        assert rerun.proc.wait(120) == 0, rerun.stderr()[-3000:]
        copies = copies_by_key(sandbox.accepted_bodies())
        received = sandbox.get("/_sandbox/received")
    assert copies == Counter({"1": 1, "2": 1, "3": 1, "4": 1})
    assert read_dead_letters(tmp_path / "dead-letters.jsonl") == []
    assert sqlite_ledger(ledger_path)["2"]["operation_id"] == received[1]["operation_id"]
