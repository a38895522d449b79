"""Ambiguous sends settle by lookup: exactly once without needless ambiguous dead letters.

The rule under test (docs/retry.md, "Settling an ambiguous send"): a lookup that finds no
operation settles the send as *not created* and it is sent again; the lag before a lookup counts
from the attempt's end; resends are capped per key across runs; a matcher that cannot find the
operations this run created stops negative settling on its connection; an expired key whose
claim is still open is looked up, never sent. Real sandbox, real CLI, real SQLite ledger; every
record's ``message_text`` names its key, so the sandbox's accepted bodies count the copies.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.catena import (
    Accepted,
    CatenaClient,
    ClientCredentialsTokenProvider,
    HttpTransport,
    make_session,
)
from target_catena_messages.catena.classify import FailureKind
from target_catena_messages.catena.retry import GiveUp, GiveUpReason, RetryPolicy
from target_catena_messages.delivery.lookup import (
    CatenaOperationLookup,
    MatcherCheck,
    Verdict,
    differing_fields,
    settle_verdict,
)
from target_catena_messages.ledger import ClaimRequest, Ledger
from target_catena_messages.outcome import Message
from target_catena_messages.sandbox import Sandbox
from target_catena_messages.sandbox.config import SandboxConfig, SandboxConfigError
from tests.harness import TargetResult, run_target, sandbox_config, singer_lines
from tests.test_catena_client import CLIENT_ID, CONN, SECRET, TOKEN_PATH, source_body
from tests.test_crash import copies_by_key, reap_targets, start_target, write_input

__all__ = ["reap_targets"]  # autouse: kills a target a failed test left running

STREAM = "tms-dispatch_messages"
CONNECTION = "11111111-1111-4111-8111-111111111111"
DEAD_RUN = "another-host/31337/deadbeef"  # another machine: only its lease says it is gone
AMBIGUOUS, SAFE = FailureKind.AMBIGUOUS, FailureKind.SAFE


# -- the pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidates", "check", "verdict"),
    [
        (1, None, Verdict.ADOPT),
        (2, MatcherCheck.VERIFIED, Verdict.SEVERAL),
        (-1, MatcherCheck.VERIFIED, Verdict.UNREADABLE),
        (0, MatcherCheck.VERIFIED, Verdict.NOT_CREATED),
        (0, MatcherCheck.UNVERIFIED, Verdict.NOT_CREATED),
        (0, MatcherCheck.FAILED, Verdict.UNCONFIRMED),
        (0, None, Verdict.UNREADABLE),  # the self-check could not be made: nothing is known
    ],
)
def test_settle_verdict(candidates: int, check: MatcherCheck | None, verdict: Verdict) -> None:
    assert settle_verdict(candidates, check) is verdict


def test_differing_fields_name_what_the_stored_payload_changed() -> None:
    body = {"message_text": "Dock  4", "source_recipient_ids": ["b", "a"], "priority": None}
    stored = {"message_text": "Dock 4", "source_recipient_ids": ["a", "b"], "extra": 1}
    assert differing_fields(stored, body) == ["message_text"]
    assert differing_fields({**stored, "message_text": "Dock  4"}, body) == []


def test_the_cap_on_ambiguous_resends_defaults_to_three_and_spans_runs() -> None:
    assert RetryPolicy().max_ambiguous_resends == 3
    # A key two earlier runs already resent twice has one resend left in this run.
    state = RetryPolicy().resume(resends=2, maybe_sent=True)
    assert state.may_resend
    step = state.increment(AMBIGUOUS, 500)
    assert isinstance(step, RetryPolicy)
    assert (step.resends, step.look_up, step.maybe_sent) == (3, True, True)
    assert not step.may_resend
    end = step.increment(AMBIGUOUS, None)
    assert isinstance(end, GiveUp)
    assert (end.reason, end.look_up, end.retryable) == (GiveUpReason.RESENDS, True, False)


def test_a_negative_lookup_settles_the_send_so_a_later_give_up_is_retryable() -> None:
    policy = RetryPolicy(max_retries=1, max_ambiguous_resends=5)
    step = policy.increment(AMBIGUOUS, 504)
    assert isinstance(step, RetryPolicy)
    settled = step.settle(1)  # the lookup found nothing; the ledger counted the resend
    assert (settled.maybe_sent, settled.resends) == (False, 1)
    end = settled.increment(SAFE, 503)
    assert isinstance(end, GiveUp)
    assert (end.reason, end.maybe_sent, end.retryable) == (GiveUpReason.RETRIES, False, True)
    # The ledger's count is authoritative when it is ahead (resends of earlier runs).
    assert step.settle(4).resends == 4


# -- the sandbox's new faults --------------------------------------------------------------------


def test_sandbox_rejects_bad_lag_tail_and_normalisation_keys() -> None:
    with pytest.raises(SandboxConfigError) as bad:
        SandboxConfig.from_dict(
            {
                "list_lag_tail": {"seconds": -1, "match": {"probability": 2}, "often": True},
                "payload_normalisation": {"message_text": "lowercase", "mode": "trim"},
            }
        )
    problems = "\n".join(bad.value.problems)
    for expected in (
        "list_lag_tail.often: unknown key",
        "list_lag_tail.seconds: must be a number >= 0",
        "list_lag_tail.match.probability: must be between 0 and 1",
        "payload_normalisation.mode: unknown key",
        "payload_normalisation.message_text: must be one of trim, collapse_whitespace",
    ):
        assert expected in problems
    with pytest.raises(SandboxConfigError, match="needs seconds"):
        SandboxConfig.from_dict({"list_lag_tail": {"seconds": 5}})


@pytest.fixture
def client_of() -> Iterator[Any]:
    sessions: list[HttpTransport] = []

    def make(box: Sandbox, timeout: float = 5.0) -> CatenaClient:
        session = make_session(4)
        sessions.append(session)
        tokens = ClientCredentialsTokenProvider(session, box.url + TOKEN_PATH, CLIENT_ID, SECRET)
        return CatenaClient(box.url, tokens, session, timeout=timeout)

    yield make
    for session in sessions:
        session.close()


def test_sandbox_lag_tail_hides_matching_operations_from_the_list_only(
    sandbox_factory: Any, client_of: Any
) -> None:
    box = sandbox_factory({"list_lag_tail": {"seconds": 600, "match": {"requests": [2]}}})
    client = client_of(box)
    ids = []
    for text in ("one", "two", "three"):
        result = client.create_message(source_body(message_text=text))
        assert isinstance(result, Accepted)
        ids.append(result.operation_id)
    since = datetime.now(timezone.utc) - timedelta(minutes=1)
    listed = [op.id for op in client.list_operation_summaries(CONN, from_datetime=since)]
    assert listed == [ids[0], ids[2]]  # the second lags far behind the others
    assert isinstance(client.get_operation(CONN, ids[1]), dict)  # GET by id sees it at once


def test_sandbox_payload_normalisation_changes_the_stored_text(
    sandbox_factory: Any, client_of: Any
) -> None:
    box = sandbox_factory({"payload_normalisation": {"message_text": "collapse_whitespace"}})
    client = client_of(box)
    result = client.create_message(source_body(message_text="  Dock   4,\n gate 2 "))
    assert isinstance(result, Accepted)
    [op] = box.operations()
    assert op["payload"]["message_text"] == "Dock 4, gate 2"
    box.configure({"payload_normalisation": {"message_text": "trim"}})
    client.create_message(source_body(message_text="  Dock   4 "))
    assert box.operations()[1]["payload"]["message_text"] == "Dock   4"


def test_sandbox_creates_the_operation_after_a_client_timed_out(
    sandbox_factory: Any, client_of: Any
) -> None:
    """A latency beyond the client's timeout: the client gives up, the operation comes later."""
    box = sandbox_factory({"faults": {"rules": [{"kind": "latency", "ms": 1500}]}})
    client = client_of(box, timeout=0.5)
    result = client.create_message(source_body())
    assert not isinstance(result, Accepted)
    assert result.kind is AMBIGUOUS
    assert box.operations() == []  # not yet: the handler is still in its latency
    deadline = time.monotonic() + 10
    while not box.operations():
        assert time.monotonic() < deadline, "the operation was never created"
        time.sleep(0.05)


def test_the_list_read_has_no_upper_bound_from_our_clock(
    sandbox_factory: Any, client_of: Any, tmp_path: Path
) -> None:
    """Our clock two minutes behind Catena's: an operation "from the future" is still found."""
    box = sandbox_factory({})
    client = client_of(box)
    result = client.create_message(source_body())
    assert isinstance(result, Accepted)
    behind = timedelta(minutes=2)
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite'}", run_id="test/1/a")
    lookup = CatenaOperationLookup(
        client,
        ledger,
        lag_seconds=0.0,
        stop=threading.Event(),
        now=lambda: datetime.now(timezone.utc) - behind,
    )
    sent = datetime.now(timezone.utc) - behind
    message = Message(
        seq=1,
        stream="s",
        namespace="s",
        key="k",
        record={},
        body=source_body(),
        fingerprint="f",
        lane="l",
        first_sent_at=sent,
        last_sent_at=sent,
        last_ended_at=sent,
    )
    assert lookup.find(message) == (result.operation_id, 1)
    ledger.close()


# -- end to end ----------------------------------------------------------------------------------


def record(key: int, lane: str, text: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": key,
        "connection_id": CONNECTION,
        "source_sender_id": "dispatcher-7",
        "source_recipient_ids": [f"driver-{lane}"],
        "message_text": text or f"[key={key}] Load {1000 + key}: pick up at dock {key % 9}",
        **extra,
    }


def settings(url: str, workdir: Path, **extra: Any) -> dict[str, Any]:
    """One sending slot, so the POSTs' order (and the sandbox's request numbers) is the input's."""
    defaults = {
        "operation_lookup_lag_seconds": 1,
        "max_concurrency": 1,
        "dead_letter_path": str(workdir / "dead-letters.jsonl"),
        "ledger_url": f"sqlite:///{workdir / 'ledger.sqlite'}",
    }
    return sandbox_config(url, **{**defaults, **extra})


def leave_dead_claims(workdir: Path, keys: list[int], *, minutes_ago: float = 10) -> None:
    """Claims a run on another machine made and never finished (its lease ran out long ago)."""
    url = f"sqlite:///{workdir / 'ledger.sqlite'}"
    with Ledger.open(url, run_id=DEAD_RUN, lease_seconds=60) as dead:
        results = dead.claim(
            [
                ClaimRequest(
                    STREAM, str(k), hashlib.sha256(str(k).encode()).hexdigest(), CONNECTION
                )
                for k in keys
            ],
            now=datetime.now(timezone.utc) - timedelta(minutes=minutes_ago),
        )
    assert [r.decision.value for r in results] == ["send"] * len(keys)


def copies(box: Sandbox) -> Counter[str]:
    """Copies per key Catena created, once no request is still being handled (a timed-out
    request may create its operation after the target has finished)."""
    deadline = time.monotonic() + 30
    while box.stats()["in_flight"]:
        assert time.monotonic() < deadline, "the sandbox is still handling a request"
        time.sleep(0.05)
    return copies_by_key(box.accepted_bodies())


def warnings(result: TargetResult) -> list[str]:
    """Warnings of the operation lookup (the summary of a run with dead letters is one too)."""
    return [
        line
        for line in result.stderr.splitlines()
        if "WARNING" in line and "delivery.lookup" in line
    ]


def test_a_recovered_key_whose_resend_meets_a_500_is_settled_and_sent_once(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    """The measured case: a dead run's claim, a lookup that finds nothing, a 500 on the resend.

    Before, the dead run's send used up ``max_ambiguous_resends: 1`` and the 500 made the key an
    ambiguous dead letter although the list answered every lookup. Now each lookup that finds
    nothing settles the send as not created: the key goes out once more and is accepted once.
    """
    box = sandbox_factory({"faults": {"rules": [{"kind": "status", "match": {"requests": [2]}}]}})
    leave_dead_claims(tmp_path, [1])
    # Key 1 (recovered) waits for its lookup; key 2, another driver, is POST 1 meanwhile, so the
    # resend of key 1 is POST 2, which gets the 500.
    lines = singer_lines(STREAM, [record(1, "a"), record(2, "b")], state_every=2)
    result = run_target(tmp_path, settings(box.url, tmp_path), lines)
    received = box.received()
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.dead_letters == []
    assert [(e["status"], copies_by_key([e["body"]])) for e in received] == [
        (202, Counter({"2": 1})),
        (500, Counter({"1": 1})),
        (202, Counter({"1": 1})),
    ]
    assert copies(box) == Counter({"1": 1, "2": 1})
    assert result.summary is not None
    assert result.summary["http"]["ambiguous_resends"] == 2
    assert warnings(result) == []


def test_resends_are_capped_across_runs_when_the_list_lags_beyond_the_configured_lag(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    """At most 1 + max_ambiguous_resends copies of a key in all, however many runs try it.

    Every answer to key 1 is dropped and its operations lag ten minutes behind in the list, far
    beyond the configured lag: each lookup finds nothing. A first run is killed after two copies;
    the second run continues the count from the ledger and stops at the cap.
    """
    faults = {
        "list_lag_tail": {"seconds": 600, "match": {"from": 2}},  # all but POST 1
        "faults": {"rules": [{"kind": "drop", "match": {"from": 2}}]},
    }
    box = sandbox_factory(faults)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(settings(box.url, tmp_path, operation_lookup_lag_seconds=1.5)))
    first_input = write_input(
        tmp_path / "first.jsonl", singer_lines(STREAM, [record(2, "b"), record(1, "a")])
    )
    run = start_target(tmp_path, config, first_input, "first")
    deadline = time.monotonic() + 60
    while len(box.received()) < 3:  # POST 1 key 2, POSTs 2 and 3 key 1
        assert time.monotonic() < deadline, run.stderr()[-3000:]
        assert run.proc.poll() is None, run.stderr()[-3000:]
        time.sleep(0.02)
    run.proc.kill()  # while it waits out the lag before looking up copy 2
    run.proc.wait()
    assert copies(box) == Counter({"2": 1, "1": 2})

    box.configure(faults)  # request numbers start again: key 3 is POST 1 of the second run
    lines = singer_lines(STREAM, [record(3, "c"), record(1, "a")])
    second = run_target(tmp_path / "second", json.loads(config.read_text()), lines)
    assert second.returncode == 2, second.stderr[-3000:]
    assert copies(box) == Counter({"1": 4, "2": 1, "3": 1})
    [dead] = second.dead_letters
    assert (dead["key"], dead["stage"], dead["retryable"]) == ("1", "ambiguous", False)
    assert "already resent 3 times" in dead["errors"][0]["message"]


def test_the_lag_counts_from_the_attempts_end_so_a_late_operation_is_adopted(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    """A send times out after 1 s; Catena creates its operation at 2 s; the lag is 1.5 s.

    Counted from the attempt's start the lookup would come at 1.5 s, find nothing and resend
    (a duplicate); counted from its end it comes at 2.5 s and adopts the operation.
    """
    box = sandbox_factory(
        {"faults": {"rules": [{"kind": "latency", "ms": 2000, "match": {"requests": [1]}}]}}
    )
    lines = singer_lines(STREAM, [record(1, "a")], state_every=1)
    result = run_target(
        tmp_path,
        settings(box.url, tmp_path, request_timeout_seconds=1, operation_lookup_lag_seconds=1.5),
        lines,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert copies(box) == Counter({"1": 1})
    [op] = box.operations()
    assert [key for _, key, _ in result.operations()] == ["1"]
    assert result.operations()[0][2] == op["id"]
    assert result.summary is not None
    assert result.summary["http"]["operations_adopted"] == 1


def test_a_matcher_that_misses_our_own_operations_stops_negative_settling(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    """Catena stores the text whitespace-collapsed: the lookup could never find a match.

    The self-check searches for key 2, which this run created, and misses it: one warning, and
    key 1's dropped answer is not resent (an ambiguous dead letter, not a second copy).
    """
    box = sandbox_factory(
        {
            "payload_normalisation": {"message_text": "collapse_whitespace"},
            "faults": {"rules": [{"kind": "drop", "match": {"requests": [2]}}]},
        }
    )
    records = [
        record(2, "b", "[key=2] Load  1002:  pick up at dock 2"),
        record(1, "a", "[key=1] Load  1001:  pick up at dock 1"),
    ]
    result = run_target(tmp_path, settings(box.url, tmp_path), singer_lines(STREAM, records))
    assert result.returncode == 2, result.stderr[-3000:]
    assert copies(box) == Counter({"1": 1, "2": 1})
    [dead] = result.dead_letters
    assert (dead["key"], dead["stage"], dead["retryable"]) == ("1", "ambiguous", False)
    assert "could not confirm" in dead["errors"][0]["message"]
    [warning] = warnings(result)
    assert CONNECTION in warning
    assert "message_text" in warning


@pytest.mark.parametrize("exists", [True, False])
def test_an_expired_key_with_an_open_claim_is_looked_up_never_sent(
    tmp_path: Path, sandbox_factory: Any, exists: bool
) -> None:
    box = sandbox_factory({})
    two_hours_ago = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()
    records = [record(1, "a", created_at=two_hours_ago)]
    leave_dead_claims(tmp_path, [1])
    operation_id = None
    if exists:  # the dead run had sent it
        body = {k: v for k, v in records[0].items() if k not in ("id", "created_at")}
        client = CatenaClient(
            box.url,
            ClientCredentialsTokenProvider(
                session := make_session(1), box.url + TOKEN_PATH, "test-client", "x"
            ),
            session,
            timeout=5,
        )
        posted = client.create_message(body)
        session.close()
        assert isinstance(posted, Accepted)
        operation_id = posted.operation_id
    before = len(box.received())
    result = run_target(
        tmp_path,
        settings(
            box.url,
            tmp_path,
            message_time_field="created_at",
            max_message_age_hours=1,
            operation_lookup_lag_seconds=0.5,
        ),
        singer_lines(STREAM, records, state_every=1),
    )
    assert len(box.received()) == before, "an expired record was POSTed"
    if exists:
        assert result.returncode == 0, result.stderr[-3000:]
        assert [op for _, _, op in result.operations()] == [operation_id]
        assert result.dead_letters == []
    else:
        assert result.returncode == 2, result.stderr[-3000:]
        [dead] = result.dead_letters
        assert (dead["key"], dead["stage"]) == ("1", "expired")
        assert "looked up" in dead["errors"][0]["message"]


def test_the_self_check_waits_for_a_sample_then_settles_unverified_and_checks_again_later(
    sandbox_factory: Any,
    client_of: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No acceptance of this run on the connection yet: wait (bounded), then settle unverified."""
    monkeypatch.setattr("target_catena_messages.delivery.lookup._SAMPLE_WAIT", timedelta(0))
    box = sandbox_factory({})
    client = client_of(box)
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite'}", run_id="test/1/a")
    lookup = CatenaOperationLookup(client, ledger, lag_seconds=0.2, stop=threading.Event())
    now = datetime.now(timezone.utc)

    def message(text: str) -> Message:
        return Message(
            seq=1,
            stream="s",
            namespace="s",
            key=text,
            record={},
            body=source_body(message_text=text),
            fingerprint="f",
            lane="l",
            first_sent_at=now,
            last_sent_at=now,
            last_ended_at=now,
        )

    with caplog.at_level("WARNING", logger="target_catena_messages.delivery.lookup"):
        found = lookup.settle(message("never sent"))
        assert found.verdict is Verdict.NOT_CREATED
        assert [
            r.getMessage() for r in caplog.records if "no message of this run" in r.getMessage()
        ]
        assert lookup._checks[CONN] is MatcherCheck.UNVERIFIED
        # An acceptance arrives: the next negative settle checks the matcher with it.
        sent = message("accepted")
        result = client.create_message(sent.body)
        assert isinstance(result, Accepted)
        sent.last_ended_at = datetime.now(timezone.utc)
        lookup.accepted(sent, result.operation_id)
        assert lookup.settle(message("also never sent")).verdict is Verdict.NOT_CREATED
        assert lookup._checks[CONN] is MatcherCheck.VERIFIED
        assert lookup.settle(message("accepted"), check=False).verdict is Verdict.ADOPT
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    ledger.close()
