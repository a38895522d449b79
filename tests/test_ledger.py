"""The ledger against real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import stat
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from target_catena_messages.errors import ConfigError
from target_catena_messages.ledger import (
    TABLE,
    ClaimRequest,
    ClaimResult,
    Decision,
    Ledger,
    LedgerError,
    LedgerOutcome,
    LedgerReadOnlyError,
)
from tests.pg import fresh_schema_url

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
LEASE = 300.0
NS = "dispatch_messages"
FP1 = hashlib.sha256(b"body one").hexdigest()
FP2 = hashlib.sha256(b"body two").hexdigest()
SEND, DUP, PREV = Decision.SEND, Decision.DUPLICATE, Decision.PREVIOUSLY_DEAD_LETTERED
ELSEWHERE, RECOVER = Decision.IN_PROGRESS_ELSEWHERE, Decision.RECOVER


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def req(key: str, fp: str = FP1, ns: str = NS) -> ClaimRequest:
    return ClaimRequest(namespace=ns, key=key, fingerprint=fp, connection_id="conn-1")


def accepted(key: str, op: str, fp: str = FP1, ns: str = NS) -> LedgerOutcome:
    return LedgerOutcome(ns, key, "accepted", fp, operation_id=op, attempts=1)


def dead(key: str, stage: str = "api", fp: str = FP1, ns: str = NS) -> LedgerOutcome:
    return LedgerOutcome(ns, key, "dead_lettered", fp, stage=stage, attempts=1)


def decisions(results: list[ClaimResult]) -> list[Decision]:
    return [r.decision for r in results]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nested/dir/ledger.sqlite"
    return fresh_schema_url(request.getfixturevalue("pg_url"))


@pytest.fixture
def open_ledger(url: str) -> Iterator[Callable[..., Ledger]]:
    opened: list[Ledger] = []

    def factory(run_id: str, **kwargs: Any) -> Ledger:
        ledger = Ledger.open(url, run_id=run_id, lease_seconds=LEASE, **kwargs)
        opened.append(ledger)
        return ledger

    yield factory
    for ledger in opened:
        ledger.close()


# -- decisions ----------------------------------------------------------------------------------


def test_new_key_is_claimed_and_held_against_other_runs(open_ledger: Callable[..., Ledger]) -> None:
    a, b = open_ledger("run-a"), open_ledger("run-b")
    assert decisions(a.claim([req("k1")], now=T0)) == [SEND]
    row = a.get(NS, "k1")
    assert row is not None
    assert (row["status"], row["run_id"], row["fingerprint"]) == ("claimed", "run-a", FP1)
    assert (row["claimed_at"], row["lease_until"]) == (T0, at(LEASE))
    assert row["connection_id"] == "conn-1"

    [held] = b.claim([req("k1")], now=at(LEASE - 1))
    assert held == ClaimResult(ELSEWHERE, prior_claimed_at=T0)
    assert a.get(NS, "k1") == row  # the losing claim wrote nothing


def test_accepted_key_is_duplicate_even_with_another_body(
    open_ledger: Callable[..., Ledger],
) -> None:
    a, b = open_ledger("run-a"), open_ledger("run-b")
    a.claim([req("k1")], now=T0)
    a.record([accepted("k1", "op-1")], now=at(5))
    row = a.get(NS, "k1")
    assert row is not None
    assert (row["status"], row["operation_id"], row["lease_until"]) == ("accepted", "op-1", None)
    assert (row["claimed_at"], row["resolved_at"]) == (T0, at(5))

    assert b.claim([req("k1", FP2)], now=at(10)) == [ClaimResult(DUP, operation_id="op-1")]
    assert b.get(NS, "k1") == row


def test_dead_letter_blocks_the_same_body_and_retries_a_changed_one(
    open_ledger: Callable[..., Ledger],
) -> None:
    a, b = open_ledger("run-a"), open_ledger("run-b")
    a.claim([req("k1")], now=T0)
    a.record([dead("k1", stage="api")], now=at(1))

    assert b.claim([req("k1")], now=at(2)) == [ClaimResult(PREV, stage="api")]
    [again] = b.claim([req("k1", FP2)], now=at(3))
    assert again.decision is SEND
    row = b.get(NS, "k1")
    assert row is not None
    assert (row["status"], row["run_id"], row["fingerprint"]) == ("claimed", "run-b", FP2)
    assert (row["stage"], row["lease_until"]) == (None, at(3 + LEASE))


def test_ambiguous_dead_letter_is_not_resent_even_with_a_changed_body(
    open_ledger: Callable[..., Ledger],
) -> None:
    """It may have reached the driver: an edited body must not make a second message."""
    a, b = open_ledger("run-a"), open_ledger("run-b")
    a.claim([req("k1")], now=T0)
    a.record([dead("k1", stage="ambiguous")], now=at(1))
    [again] = b.claim([req("k1", FP2)], now=at(2))
    assert (again.decision, again.stage) == (PREV, "ambiguous")


def test_validation_dead_letter_is_recorded_without_a_claim(
    open_ledger: Callable[..., Ledger],
) -> None:
    a = open_ledger("run-a")
    a.record([dead("never-claimed", stage="validation")], now=T0)
    row = a.get(NS, "never-claimed")
    assert row is not None
    assert (row["status"], row["stage"], row["claimed_at"]) == ("dead_lettered", "validation", None)
    assert a.count() == 1


def test_expired_lease_is_recovered_with_the_earliest_claim_time(
    open_ledger: Callable[..., Ledger],
) -> None:
    a, b, c = open_ledger("run-a"), open_ledger("run-b"), open_ledger("run-c")
    a.claim([req("k1")], now=T0)
    assert b.claim([req("k1")], now=at(LEASE)) == [ClaimResult(RECOVER, prior_claimed_at=T0)]
    row = b.get(NS, "k1")
    assert row is not None
    assert (row["run_id"], row["claimed_at"], row["ambiguous_since"]) == ("run-b", at(LEASE), T0)
    assert c.claim([req("k1")], now=at(LEASE + 1)) == [
        ClaimResult(ELSEWHERE, prior_claimed_at=at(LEASE))
    ]
    # run-b died too: the window for the operation lookup still starts at run-a's claim.
    assert c.claim([req("k1")], now=at(3 * LEASE)) == [ClaimResult(RECOVER, prior_claimed_at=T0)]
    c.record([accepted("k1", "op-9")], now=at(3 * LEASE + 1))
    row = c.get(NS, "k1")
    assert row is not None
    assert row["ambiguous_since"] is None


def test_claiming_a_key_this_run_already_holds_is_treated_as_ambiguous(
    open_ledger: Callable[..., Ledger],
) -> None:
    a = open_ledger("run-a")
    a.claim([req("k1")], now=T0)
    assert a.claim([req("k1")], now=at(1)) == [ClaimResult(RECOVER, prior_claimed_at=T0)]


def test_one_batch_mixes_every_decision_in_request_order(
    open_ledger: Callable[..., Ledger],
) -> None:
    a, b = open_ledger("run-a"), open_ledger("run-b")
    a.claim([req("acc"), req("dl-same"), req("dl-new"), req("stale")], now=T0)
    a.record([accepted("acc", "op-1"), dead("dl-same"), dead("dl-new")], now=at(1))
    b.claim([req("live")], now=at(LEASE))
    batch = [req("stale"), req("new"), req("dl-new", FP2), req("live"), req("dl-same"), req("acc")]
    results = a.claim(batch, now=at(LEASE + 1))
    assert decisions(results) == [RECOVER, SEND, SEND, ELSEWHERE, PREV, DUP]
    assert results[0].prior_claimed_at == T0
    assert results[5].operation_id == "op-1"


def test_a_key_twice_in_one_call_is_refused(open_ledger: Callable[..., Ledger]) -> None:
    a = open_ledger("run-a")
    with pytest.raises(ValueError, match="twice"):
        a.claim([req("k1"), req("k1", FP2)], now=T0)
    with pytest.raises(ValueError, match="twice"):
        a.record([accepted("k1", "op-1"), dead("k1")], now=T0)
    assert a.count() == 0


def test_namespaces_are_separate(open_ledger: Callable[..., Ledger]) -> None:
    a = open_ledger("run-a")
    a.claim([req("k1", ns="one")], now=T0)
    a.record([accepted("k1", "op-1", ns="one")], now=T0)
    assert decisions(a.claim([req("k1", ns="two"), req("k2", ns="one")], now=T0)) == [SEND, SEND]
    assert a.count() == 3
    assert [r["key"] for r in a.rows(namespace="one")] == ["k1", "k2"]
    assert [r["namespace"] for r in a.rows(status="accepted")] == ["one"]


# -- leases, release, operation ids ----------------------------------------------------------


def test_renewed_lease_keeps_other_runs_out(open_ledger: Callable[..., Ledger]) -> None:
    a, b = open_ledger("run-a"), open_ledger("run-b")
    a.claim([req("k1"), req("k2")], now=T0)
    a.renew_leases([(NS, "k1")], now=at(200))
    b.renew_leases([(NS, "k2")], now=at(200))  # not b's claim: no effect
    results = b.claim([req("k1"), req("k2")], now=at(LEASE + 100))
    assert decisions(results) == [ELSEWHERE, RECOVER]
    assert decisions(b.claim([req("k1")], now=at(200 + LEASE))) == [RECOVER]


def test_release_lets_a_later_run_send_normally(open_ledger: Callable[..., Ledger]) -> None:
    a, b = open_ledger("run-a"), open_ledger("run-b")
    a.claim([req("k1"), req("k2"), req("done")], now=T0)
    a.record([accepted("done", "op-1")], now=T0)
    b.release([(NS, "k2")])  # someone else's claim: untouched
    a.release([(NS, "k1"), (NS, "done"), (NS, "unknown")])
    assert a.get(NS, "k1") is None
    assert decisions(b.claim([req("k1"), req("k2"), req("done")], now=at(1))) == [
        SEND,
        ELSEWHERE,
        DUP,
    ]


def test_release_of_a_recovered_claim_keeps_it_ambiguous(
    open_ledger: Callable[..., Ledger],
) -> None:
    a, b, c = open_ledger("run-a"), open_ledger("run-b"), open_ledger("run-c")
    a.claim([req("k1")], now=T0)
    assert decisions(b.claim([req("k1")], now=at(LEASE))) == [RECOVER]
    b.release([(NS, "k1")])  # b never sent, but run-a may have
    assert c.claim([req("k1")], now=at(LEASE + 1)) == [ClaimResult(RECOVER, prior_claimed_at=T0)]


# -- counters across runs: resends after ambiguous attempts, outage exits ----------------------


def test_resends_are_counted_across_runs_and_a_claim_left_for_lookup_is_recovered_at_once(
    open_ledger: Callable[..., Ledger],
) -> None:
    a, b, c = open_ledger("run-a"), open_ledger("run-b"), open_ledger("run-c")
    a.claim([req("k1"), req("k2")], now=T0)
    assert a.note_resend(NS, "k1") == 1
    assert a.note_resend(NS, "k1") == 2
    a.leave_for_lookup([((NS, "k1"), at(3)), ((NS, "k2"), at(4))])
    row = a.get(NS, "k1")
    assert row is not None
    assert (row["status"], row["lease_until"], row["ambiguous_since"]) == ("claimed", None, at(3))
    assert row["ambiguous_resends"] == 2
    # Long before the lease would have run out, another run recovers it, counters carried.
    [k1, k2] = b.claim([req("k1"), req("k2")], now=at(10))
    assert k1 == ClaimResult(RECOVER, prior_claimed_at=at(3), ambiguous_resends=2)
    assert k2 == ClaimResult(RECOVER, prior_claimed_at=at(4))
    assert b.note_resend(NS, "k1") == 3
    # b stops again: the earliest ambiguous time is kept, not replaced by b's attempt.
    b.leave_for_lookup([((NS, "k1"), at(20))])
    assert c.claim([req("k1")], now=at(30)) == [
        ClaimResult(RECOVER, prior_claimed_at=at(3), ambiguous_resends=3)
    ]
    c.record([accepted("k1", "op-1")], now=at(31))
    assert b.claim([req("k1")], now=at(32)) == [
        ClaimResult(DUP, operation_id="op-1", ambiguous_resends=3)
    ]


def test_note_resend_refuses_a_claim_this_run_no_longer_holds(
    open_ledger: Callable[..., Ledger],
) -> None:
    a, b = open_ledger("run-a"), open_ledger("run-b")
    a.claim([req("k1")], now=T0)
    b.claim([req("k1")], now=at(LEASE))  # a's lease ran out: b took the key over
    with pytest.raises(LedgerError, match="no longer claimed by this run"):
        a.note_resend(NS, "k1")
    with pytest.raises(LedgerError, match="no longer claimed"):
        a.note_resend(NS, "never-claimed")
    a.leave_for_lookup([((NS, "k1"), T0)])  # not a's: untouched
    row = b.get(NS, "k1")
    assert row is not None
    assert (row["run_id"], row["lease_until"], row["ambiguous_resends"]) == (
        "run-b",
        at(2 * LEASE),
        0,
    )


def test_outage_exits_keep_the_row_and_count_across_runs(
    open_ledger: Callable[..., Ledger],
) -> None:
    a, b, c = open_ledger("run-a"), open_ledger("run-b"), open_ledger("run-c")
    a.claim([req("k1"), req("k2")], now=T0)
    assert a.note_outage_exit([(NS, "k1"), (NS, "k2"), (NS, "unknown")]) == {
        (NS, "k1"): 1,
        (NS, "k2"): 1,
    }
    a.leave_for_lookup([((NS, "k2"), at(1))])  # k2 may have reached Catena
    row = a.get(NS, "k1")
    assert row is not None  # never sent, but kept: the count must survive
    assert (row["status"], row["lease_until"], row["ambiguous_since"]) == ("claimed", None, None)
    # At once, no lease to wait out: k1 is a plain send, k2 is looked up first.
    assert b.claim([req("k1"), req("k2")], now=at(2)) == [
        ClaimResult(SEND, outage_exits=1),
        ClaimResult(RECOVER, prior_claimed_at=at(1), outage_exits=1),
    ]
    assert b.note_outage_exit([(NS, "k1")]) == {(NS, "k1"): 2}
    b.release([(NS, "k2")])  # b never sent k2: still ambiguous, count kept
    assert c.claim([req("k1"), req("k2")], now=at(3)) == [
        ClaimResult(SEND, outage_exits=2),
        ClaimResult(RECOVER, prior_claimed_at=at(1), outage_exits=1),
    ]
    assert c.note_outage_exit([(NS, "k1")]) == {(NS, "k1"): 3}
    # Released after an outage exit (never sent): the row and its count stay.
    assert decisions(a.claim([req("k1")], now=at(4))) == [SEND]
    a.release([(NS, "k1")])
    assert b.claim([req("k1")], now=at(5)) == [ClaimResult(SEND, outage_exits=3)]


def test_a_claim_that_crashed_after_an_outage_exit_is_recovered(
    open_ledger: Callable[..., Ledger],
) -> None:
    """A run that reclaimed an outage-left row and died holding it may have sent it."""
    a, b, c = open_ledger("run-a"), open_ledger("run-b"), open_ledger("run-c")
    a.claim([req("k1")], now=T0)
    a.note_outage_exit([(NS, "k1")])
    assert decisions(b.claim([req("k1")], now=at(1))) == [SEND]
    assert c.claim([req("k1")], now=at(1 + LEASE)) == [
        ClaimResult(RECOVER, prior_claimed_at=at(1), outage_exits=1)
    ]


def test_counters_restart_for_a_changed_body_after_a_dead_letter_and_on_rearm(
    open_ledger: Callable[..., Ledger],
) -> None:
    a, b = open_ledger("run-a"), open_ledger("run-b")
    a.claim([req("k1"), req("k2")], now=T0)
    a.note_outage_exit([(NS, "k1"), (NS, "k2")])
    b.claim([req("k1"), req("k2")], now=at(1))
    b.note_resend(NS, "k1")
    b.note_resend(NS, "k2")
    b.record([dead("k1"), dead("k2", stage="ambiguous")], now=at(2))
    # The same body is still the dead letter it was, counters and all.
    assert a.claim([req("k1")], now=at(3)) == [
        ClaimResult(PREV, stage="api", ambiguous_resends=1, outage_exits=1)
    ]
    # A changed body is a new message: counters from 0, in the result and the row.
    assert a.claim([req("k1", FP2)], now=at(4)) == [ClaimResult(SEND, stage="api")]
    row = a.get(NS, "k1")
    assert row is not None
    assert (row["ambiguous_resends"], row["outage_exits"]) == (0, 0)
    # A re-armed ambiguous dead letter is looked up first, with a fresh budget.
    assert a.rearm_dead_letters([(NS, "k2")], now=at(5)) == {"removed": 0, "ambiguous": 1}
    [k2] = a.claim([req("k2")], now=at(6))
    assert (k2.decision, k2.ambiguous_resends, k2.outage_exits) == (RECOVER, 0, 0)


def test_peek_reports_the_counters_a_claim_would_carry(
    open_ledger: Callable[..., Ledger],
) -> None:
    a = open_ledger("run-a")
    a.claim([req("k1")], now=T0)
    a.note_resend(NS, "k1")
    a.note_outage_exit([(NS, "k1")])
    a.leave_for_lookup([((NS, "k1"), T0)])
    ro = open_ledger("dry", read_only=True)
    assert ro.peek([req("k1")], now=at(1)) == [
        ClaimResult(RECOVER, prior_claimed_at=T0, ambiguous_resends=1, outage_exits=1)
    ]


def test_operation_ids_in_use(open_ledger: Callable[..., Ledger]) -> None:
    a = open_ledger("run-a")
    a.claim([req("k1"), req("k2")], now=T0)
    a.record([accepted("k1", "op-1"), dead("k2", stage="confirmation")], now=T0)
    a.record([LedgerOutcome(NS, "k3", "dead_lettered", FP1, operation_id="op-3", stage="x")])
    assert a.operation_ids_in_use(["op-1", "op-2", "op-3", "op-1"]) == {"op-1", "op-3"}
    assert a.operation_ids_in_use([]) == set()


def test_large_batches_are_chunked_and_paged(open_ledger: Callable[..., Ledger]) -> None:
    a = open_ledger("run-a")
    keys = [f"k{i:05d}" for i in range(1203)]
    assert set(decisions(a.claim([req(k) for k in keys], now=T0))) == {SEND}
    a.record([accepted(k, f"op-{k}") for k in keys[::2]], now=at(1))
    assert [r["key"] for r in a.rows()] == keys
    assert len(list(a.rows(status="accepted"))) == 602
    assert len(a.operation_ids_in_use([f"op-{k}" for k in keys])) == 602
    assert Counter(decisions(a.claim([req(k) for k in keys], now=at(2)))) == {
        DUP: 602,
        RECOVER: 601,
    }


# -- atomicity ----------------------------------------------------------------------------------


def _crash_on_commit(url: str, op: str, payload: list[Any]) -> None:
    """Child process: run one claim/record and die (no cleanup) just before its COMMIT."""
    ledger = Ledger.open(url, run_id="run-crash", lease_seconds=LEASE)
    sa.event.listen(ledger._store.engine, "commit", lambda _conn: os._exit(3))
    if op == "claim":
        ledger.claim(payload, now=at(2 * LEASE))
    else:
        ledger.record(payload, now=at(2 * LEASE))
    os._exit(0)


@pytest.mark.parametrize("op", ["claim", "record"])
def test_a_crash_before_commit_leaves_no_part_of_the_batch(
    url: str, open_ledger: Callable[..., Ledger], op: str
) -> None:
    a = open_ledger("run-a")
    a.claim([req("acc"), req("dl"), req("stale")], now=T0)
    a.record([accepted("acc", "op-1"), dead("dl")], now=at(1))
    before = list(a.rows())
    payload: list[Any]
    if op == "claim":  # an insert, a reclaim, a recovery and a duplicate in one transaction
        payload = [req("new"), req("dl", FP2), req("stale"), req("acc")]
    else:
        payload = [accepted("new", "op-2"), accepted("stale", "op-3"), dead("acc", "confirmation")]
    child = multiprocessing.get_context("spawn").Process(
        target=_crash_on_commit, args=(url, op, payload)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 3
    assert list(open_ledger("run-after").rows()) == before


# -- read-only, files, schema, locations ----------------------------------------------------------


def test_read_only_ledger_refuses_writes_and_changes_nothing(
    open_ledger: Callable[..., Ledger],
) -> None:
    a = open_ledger("run-a")
    a.claim([req("held"), req("acc")], now=T0)
    a.record([accepted("acc", "op-1")], now=T0)
    before = list(a.rows())
    ro = open_ledger("run-dry", read_only=True)
    assert decisions(ro.peek([req("held"), req("acc"), req("new")], now=at(1))) == [
        ELSEWHERE,
        DUP,
        SEND,
    ]
    assert decisions(ro.peek([req("held")], now=at(LEASE))) == [RECOVER]
    _assert_writes_refused(ro)
    assert ro.count() == 2
    assert list(a.rows()) == before


def _assert_writes_refused(ledger: Ledger) -> None:
    for write in (
        lambda: ledger.claim([req("new")], now=T0),
        lambda: ledger.record([accepted("new", "op-x")], now=T0),
        lambda: ledger.renew_leases([(NS, "held")], now=T0),
        lambda: ledger.release([(NS, "held")]),
    ):
        with pytest.raises(LedgerReadOnlyError, match="read-only"):
            write()


def test_read_only_sqlite_that_does_not_exist_is_empty_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "ledger.sqlite"
    with Ledger.open(f"sqlite:///{path}", run_id="dry", read_only=True) as ro:
        assert ro.location == str(path)
        assert ro.count() == 0
        assert decisions(ro.peek([req("k1")])) == [SEND]
        assert ro.get(NS, "k1") is None
        assert list(ro.rows()) == []
        assert ro.operation_ids_in_use(["op-1"]) == set()
        _assert_writes_refused(ro)
    assert not path.parent.exists()


@pytest.mark.postgres
def test_read_only_postgresql_without_table_is_empty_and_not_created(
    pg_url: str,
) -> None:
    url = fresh_schema_url(pg_url)
    with Ledger.open(url, run_id="dry", read_only=True) as ro:
        assert ro.count() == 0
        assert decisions(ro.peek([req("k1")])) == [SEND]
        _assert_writes_refused(ro)
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        assert not sa.inspect(conn).has_table(TABLE.name)
    engine.dispose()


def test_sqlite_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "ledger.sqlite"
    with Ledger.open(f"sqlite:///{path}", run_id="r") as ledger:
        ledger.claim([req("k1")])
        for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name

    loose = tmp_path / "loose.sqlite"
    loose.touch()
    loose.chmod(0o644)
    with Ledger.open(f"sqlite:///{loose}", run_id="r") as ledger:
        assert ledger.count() == 0
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600


def test_sqlite_uses_wal_and_full_sync(tmp_path: Path) -> None:
    with Ledger.open(f"sqlite:///{tmp_path}/l.sqlite", run_id="r") as ledger:
        assert ledger._store.engine is not None
        with ledger._store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_schema_has_no_place_for_message_text(open_ledger: Callable[..., Ledger]) -> None:
    assert set(TABLE.c.keys()) == {
        "namespace", "key", "status", "fingerprint", "operation_id", "stage", "attempts",
        "connection_id", "run_id", "claimed_at", "lease_until", "ambiguous_since",
        "resolved_at", "confirmed_status", "updated_at", "ambiguous_resends", "outage_exits",
    }  # fmt: skip
    open_ledger("r")  # the table actually created matches the declaration
    text = "Please pick up load 42 at dock 7"
    with pytest.raises(ValueError, match="hex"):
        req("k1", fp=text)
    with pytest.raises(ValueError, match="hex"):
        LedgerOutcome(NS, "k1", "accepted", text, operation_id="op-1")


def test_outcomes_must_be_complete() -> None:
    with pytest.raises(ValueError, match="operation_id"):
        LedgerOutcome(NS, "k1", "accepted", FP1)
    with pytest.raises(ValueError, match="stage"):
        LedgerOutcome(NS, "k1", "dead_lettered", FP1)


def test_sqlite_location_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with Ledger.open("sqlite:///rel/ledger.sqlite", run_id="r") as ledger:
        assert ledger.location == str(tmp_path / "rel" / "ledger.sqlite")
    with Ledger.open(f"sqlite:///{tmp_path}/abs.sqlite", run_id="r") as ledger:
        assert ledger.location == str(tmp_path / "abs.sqlite")
    assert (tmp_path / "rel" / "ledger.sqlite").is_file()


@pytest.mark.postgres
def test_postgresql_location_and_errors_never_show_the_password(
    pg_url: str,
) -> None:
    secret = "s3cret-Pw"
    with_password = pg_url.replace("postgres@", f"postgres:{secret}@", 1)
    assert secret in with_password
    with Ledger.open(with_password, run_id="r") as ledger:  # trust auth ignores the password
        assert secret not in ledger.location
        assert ledger.location.startswith("postgresql://postgres@")
    unreachable = "postgresql://postgres:" + secret + "@127.0.0.1:1/nowhere"
    with pytest.raises(LedgerError) as caught:
        Ledger.open(unreachable, run_id="r")
    assert secret not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)


def test_unsupported_urls_are_config_errors() -> None:
    for bad in ("mysql://u:s3cret@host/db", "sqlite://", "sqlite:///:memory:", "not a url"):
        with pytest.raises(ConfigError) as caught:
            Ledger.open(bad, run_id="r")
        assert "s3cret" not in str(caught.value)


# -- concurrency --------------------------------------------------------------------------------


def _seed_contested_keys(url: str, n: int) -> list[str]:
    """Keys in every claimable state: new, dead-lettered (re-sent with FP2), stale claims."""
    keys = [f"k{i:03d}" for i in range(n)]
    with Ledger.open(url, run_id="run-dead", lease_seconds=LEASE) as ledger:
        ledger.claim([req(k) for k in keys[n // 3 :]], now=at(-2 * LEASE))
        ledger.record([dead(k) for k in keys[n // 3 : 2 * n // 3]], now=at(-2 * LEASE))
    return keys


def _claim_batches(
    url: str, run_id: str, keys: list[str], seed: int, start: Any
) -> list[tuple[str, str]]:
    """Claim most of ``keys`` in shuffled batches once ``start`` opens; (key, decision) pairs."""
    rng = random.Random(seed)
    mine = rng.sample(keys, k=len(keys) * 3 // 4)
    with Ledger.open(url, run_id=run_id, lease_seconds=LEASE) as ledger:
        start.wait()
        results: list[tuple[str, str]] = []
        for i in range(0, len(mine), 15):
            batch = mine[i : i + 15]
            decided = ledger.claim([req(k, FP2) for k in batch], now=T0)
            results.extend((k, r.decision.value) for k, r in zip(batch, decided, strict=True))
        return results


def _claim_worker(url: str, run_id: str, keys: list[str], seed: int, start: Any, out: Any) -> None:
    out.put(_claim_batches(url, run_id, keys, seed, start))


def _assert_one_grant_per_key(keys: list[str], per_claimant: list[list[tuple[str, str]]]) -> None:
    n = len(keys)
    expected = dict.fromkeys(keys[: 2 * n // 3], "send") | dict.fromkeys(
        keys[2 * n // 3 :], "recover"
    )
    grants = [
        (k, d) for results in per_claimant for k, d in results if d != "in_progress_elsewhere"
    ]
    claimed = {k for results in per_claimant for k, _ in results}
    assert Counter(k for k, _ in grants) == dict.fromkeys(claimed, 1)
    assert all(expected[k] == d for k, d in grants)
    assert {expected[k] for k in claimed} == {"send", "recover"}


def test_threads_claiming_overlapping_keys_grant_each_once(url: str) -> None:
    keys = _seed_contested_keys(url, 120)
    start = threading.Barrier(6)
    found: list[list[tuple[str, str]]] = []
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            found.append(_claim_batches(url, f"thread-{n}", keys, n, start))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(found) == 6
    _assert_one_grant_per_key(keys, found)


def test_concurrent_writers_wait_for_each_other(url: str) -> None:
    """record/renew/release read before writing: on SQLite only BEGIN IMMEDIATE makes them wait."""
    Ledger.open(url, run_id="setup").close()
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        keys = [f"t{n}-{i:02d}" for i in range(40)]
        try:
            with Ledger.open(url, run_id=f"writer-{n}", lease_seconds=LEASE) as ledger:
                ledger.claim([req(k) for k in keys], now=T0)
                start.wait()
                for i in range(0, 30, 3):
                    ledger.record([accepted(k, f"op-{k}") for k in keys[i : i + 3]], now=T0)
                    ledger.renew_leases([(NS, k) for k in keys[30:]], now=at(i))
                ledger.release([(NS, k) for k in keys[35:]])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    with Ledger.open(url, run_id="check") as ledger:
        assert Counter(r["status"] for r in ledger.rows()) == {"accepted": 180, "claimed": 30}
        assert {r["lease_until"] for r in ledger.rows(status="claimed")} == {at(27 + LEASE)}


def test_processes_claiming_overlapping_keys_grant_each_once(url: str) -> None:
    keys = _seed_contested_keys(url, 150)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_claim_worker, args=(url, f"proc-{n}", keys, n, start, out))
        for n in range(2)
    ]
    for proc in procs:
        proc.start()
    found = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    _assert_one_grant_per_key(keys, found)


# -- property: any interleaving of two runs -----------------------------------------------------

KEYS = ["k0", "k1", "k2"]
RUNS = ["run-a", "run-b"]
SHORT_LEASE = 60.0


@dataclass
class _ModelRow:
    status: str
    fingerprint: str
    run_id: str
    claimed_at: datetime | None = None
    lease_until: datetime | None = None
    ambiguous_since: datetime | None = None
    operation_id: str | None = None
    stage: str | None = None


class _TwoRuns(RuleBasedStateMachine):
    """Claims, outcomes, renewals, releases and the clock, in any order, from two runs."""

    ledgers: dict[str, Ledger]

    def __init__(self) -> None:
        super().__init__()
        self.ns = uuid.uuid4().hex
        self.now = T0
        self.model: dict[str, _ModelRow] = {}
        self.ops = 0

    def _expect(self, key: str, fp: str, run: str) -> ClaimResult:
        row = self.model.get(key)
        if row is None:
            return ClaimResult(SEND)
        if row.status == "accepted":
            return ClaimResult(DUP, operation_id=row.operation_id)
        if row.status == "dead_lettered":
            same = row.fingerprint == fp
            return ClaimResult(PREV if same else SEND, stage=row.stage)
        live = row.lease_until is not None and row.lease_until > self.now
        if live and row.run_id != run:
            return ClaimResult(ELSEWHERE, prior_claimed_at=row.claimed_at)
        return ClaimResult(RECOVER, prior_claimed_at=row.ambiguous_since or row.claimed_at)

    @rule(
        run=st.sampled_from(RUNS),
        keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True),
        fp=st.sampled_from([FP1, FP2]),
    )
    def claim(self, run: str, keys: list[str], fp: str) -> None:
        results = self.ledgers[run].claim([req(k, fp, self.ns) for k in keys], now=self.now)
        for key, result in zip(keys, results, strict=True):
            assert result == self._expect(key, fp, run)
            if result.decision not in (SEND, RECOVER):
                continue
            row = self.model.get(key)
            # The invariant: nobody else may hold a live lease on a key granted to this run.
            assert not (
                row is not None
                and row.status == "claimed"
                and row.run_id != run
                and row.lease_until is not None
                and row.lease_until > self.now
            )
            ambiguous = result.prior_claimed_at if result.decision is RECOVER else None
            lease = self.now + timedelta(seconds=SHORT_LEASE)
            self.model[key] = _ModelRow("claimed", fp, run, self.now, lease, ambiguous)

    @rule(
        run=st.sampled_from(RUNS),
        key=st.sampled_from(KEYS),
        ok=st.booleans(),
        fp=st.sampled_from([FP1, FP2]),
    )
    def record(self, run: str, key: str, ok: bool, fp: str) -> None:
        self.ops += 1
        op = f"op-{self.ops}" if ok else None
        stage = None if ok else "api"
        outcome = LedgerOutcome(
            self.ns, key, "accepted" if ok else "dead_lettered", fp, operation_id=op, stage=stage
        )
        self.ledgers[run].record([outcome], now=self.now)
        self.model[key] = _ModelRow(outcome.status, fp, run, operation_id=op, stage=stage)

    @rule(seconds=st.sampled_from([1, 30, 59, 60, 61, 200]))
    def advance(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(run=st.sampled_from(RUNS), keys=st.lists(st.sampled_from(KEYS), max_size=3))
    def renew(self, run: str, keys: list[str]) -> None:
        self.ledgers[run].renew_leases([(self.ns, k) for k in keys], now=self.now)
        for key in keys:
            row = self.model.get(key)
            if row is not None and row.status == "claimed" and row.run_id == run:
                row.lease_until = self.now + timedelta(seconds=SHORT_LEASE)

    @rule(run=st.sampled_from(RUNS), keys=st.lists(st.sampled_from(KEYS), max_size=3))
    def release(self, run: str, keys: list[str]) -> None:
        self.ledgers[run].release([(self.ns, k) for k in keys])
        for key in set(keys):
            row = self.model.get(key)
            if row is None or row.status != "claimed" or row.run_id != run:
                continue
            if row.ambiguous_since is None:
                del self.model[key]
            else:
                row.lease_until = None


def test_two_runs_never_both_hold_a_live_claim(url: str) -> None:
    ledgers = {run: Ledger.open(url, run_id=run, lease_seconds=SHORT_LEASE) for run in RUNS}
    _TwoRuns.ledgers = ledgers
    try:
        run_state_machine_as_test(
            _TwoRuns,
            settings=settings(
                max_examples=30,
                stateful_step_count=20,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        for ledger in ledgers.values():
            ledger.close()


@pytest.mark.postgres
def test_pg_fixture_gives_a_throwaway_database(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    assert row[0].startswith("catena_test_")
