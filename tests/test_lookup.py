"""The operation lookup against the real sandbox: adopt exactly one match, never guess, and keep
only what lookups in progress need (a soak found the snapshot growing with the run).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from target_catena_messages.catena import (
    Accepted,
    CatenaClient,
    ClientCredentialsTokenProvider,
    HttpTransport,
    make_session,
)
from target_catena_messages.catena.client import OperationSummary
from target_catena_messages.delivery.lookup import CatenaOperationLookup, _Snapshot, text_key
from target_catena_messages.ledger import Ledger
from target_catena_messages.outcome import Message
from tests.test_catena_client import CLIENT_ID, CONN, SECRET, TOKEN_PATH, source_body

T0 = datetime(2026, 11, 27, 4, 0, tzinfo=timezone.utc)


def _op(op_id: str, text: str, seconds: float) -> OperationSummary:
    created = (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    item = {"id": op_id, "created_at": created, "payload": {"message_text": text, "mode": "x"}}
    return msgspec.convert(item, OperationSummary)


def test_snapshot_skips_known_ids_and_prunes_the_oldest() -> None:
    snap = _Snapshot(since=T0, read_at=T0)
    for op_id, text, at in [("a", "dock 4", 1), ("b", "dock 4", 2), ("c", "gate", 3)]:
        snap.add(_op(op_id, text, at), T0)
    snap.add(_op("a", "dock 4", 1), T0)  # re-read by a refresh's overlap
    assert snap.by_text == {text_key("dock 4"): ["a", "b"], text_key("gate"): ["c"]}

    snap.prune(T0 + timedelta(seconds=2))
    assert snap.by_text == {text_key("dock 4"): ["b"], text_key("gate"): ["c"]}
    assert snap.since == T0 + timedelta(seconds=2)
    snap.prune(T0 + timedelta(seconds=4))
    assert snap.by_text == {}
    assert not snap.order
    snap.prune(T0)  # never back: what was dropped is not there any more
    assert snap.since == T0 + timedelta(seconds=4)


@pytest.fixture
def client(sandbox_factory: Any) -> Iterator[CatenaClient]:
    box = sandbox_factory({"list_lag_seconds": 0})
    session: HttpTransport = make_session(4)
    tokens = ClientCredentialsTokenProvider(session, box.url + TOKEN_PATH, CLIENT_ID, SECRET)
    yield CatenaClient(box.url, tokens, session, timeout=5.0)
    session.close()


def _send(client: CatenaClient, **extra: Any) -> str:
    result = client.create_message(source_body(**extra))
    assert isinstance(result, Accepted), result
    return result.operation_id


def _message(body: dict[str, Any], sent_at: datetime) -> Message:
    return Message(
        seq=1,
        stream="s",
        namespace="s",
        key=str(id(body)),
        record={},
        body=body,
        fingerprint="f",
        lane="l",
        first_sent_at=sent_at,
        last_sent_at=sent_at,
    )


def _lookup(client: CatenaClient, tmp_path: Path, **kwargs: Any) -> CatenaOperationLookup:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite'}", run_id="test/1/a")
    return CatenaOperationLookup(client, ledger, lag_seconds=0.05, stop=threading.Event(), **kwargs)


def test_adopts_only_the_operation_whose_payload_matches(
    client: CatenaClient, tmp_path: Path
) -> None:
    ours = _send(client, source_recipient_ids=["drv-1"])
    _send(client, source_recipient_ids=["drv-2"])  # same text, another driver
    lookup = _lookup(client, tmp_path)
    now = datetime.now(timezone.utc)

    assert lookup.find(_message(source_body(source_recipient_ids=["drv-1"]), now)) == (ours, 1)
    # Same text, no operation of its own: not found, so delivery may resend.
    assert lookup.find(_message(source_body(source_recipient_ids=["drv-3"]), now)) == (None, 0)
    _send(client, source_recipient_ids=["drv-1"])  # a second copy: which one is ours?
    again = _message(source_body(source_recipient_ids=["drv-1"]), now)
    again.last_sent_at = again.last_ended_at = datetime.now(timezone.utc)  # a fresher read
    assert lookup.find(again) == (None, 2)


def test_a_pruned_operation_is_read_again_for_a_lookup_that_reaches_back_to_it(
    client: CatenaClient, tmp_path: Path
) -> None:
    early = _send(client, message_text="early")
    # The lookup's clock runs two minutes ahead: "early" lies before the window of a message
    # sent "now", so serving that message prunes it from the snapshot.
    skew = timedelta(minutes=2)
    lookup = _lookup(client, tmp_path, now=lambda: datetime.now(timezone.utc) + skew)
    later = datetime.now(timezone.utc) + skew

    assert lookup.find(_message(source_body(message_text="early"), later)) == (None, 0)
    assert text_key("early") not in lookup._snapshots[CONN].by_text

    sent = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert lookup.find(_message(source_body(message_text="early"), sent)) == (early, 1)
    assert lookup._snapshots[CONN].by_text[text_key("early")] == [early]


def test_an_acceptance_never_waits_for_a_list_read_in_progress(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Every accepted send hands the lookup a self-check sample: it must not queue behind a read.

    The read holds the snapshot lock for as long as Catena takes to answer the page.
    """
    box = sandbox_factory(
        {"faults": {"rules": [{"kind": "latency", "endpoint": "operations", "ms": 3000}]}}
    )
    session: HttpTransport = make_session(4)
    tokens = ClientCredentialsTokenProvider(session, box.url + TOKEN_PATH, CLIENT_ID, SECRET)
    slow = CatenaClient(box.url, tokens, session, timeout=10.0)
    try:
        lookup = _lookup(slow, tmp_path)
        sent = datetime.now(timezone.utc) - timedelta(seconds=1)
        reading = threading.Thread(target=lookup.find, args=(_message(source_body(), sent),))
        reading.start()
        while not box.stats()["requests"].get("operations"):  # the read is in, the lock held
            assert reading.is_alive()
            threading.Event().wait(0.02)
        lookup.accepted(_message(source_body(message_text="other"), sent), "op-accepted")
        assert reading.is_alive()  # the acceptance came back while the read still ran
        reading.join()
    finally:
        session.close()
