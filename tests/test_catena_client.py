"""Tests for the Catena client and token providers against the real local sandbox over loopback.

No HTTP is mocked: faults come from the sandbox's fault plan, so each test exercises the same
sockets, status codes and bodies the target sees in production-like failure.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import certifi
import pytest

from target_catena_messages.catena import (
    Accepted,
    CatenaApiError,
    CatenaClient,
    ClientCredentialsTokenProvider,
    CredentialsRefused,
    Failure,
    HttpTransport,
    StaticTokenProvider,
    TokenNotRefreshable,
    TokenUnavailable,
    make_session,
)
from target_catena_messages.catena.classify import FailureKind
from target_catena_messages.catena.errors import ClientConfigError
from target_catena_messages.connect import client_from_settings
from target_catena_messages.errors import ConfigError, FatalError
from target_catena_messages.redact import Redactor
from target_catena_messages.settings import Settings

TOKEN_PATH = "/realms/catena/protocol/openid-connect/token"
REVOKE_PATH = "/realms/catena/protocol/openid-connect/revoke"
CONN = "0b6f5a4e-1c2d-4e3f-8a9b-0c1d2e3f4a5b"
OTHER_CONN = "7d3e2f1a-9b8c-4d7e-a6f5-4e3d2c1b0a9f"
SENDER = "11111111-2222-4333-8444-555555555555"
RECIPIENT = "66666666-7777-4888-9999-aaaaaaaaaaaa"
CLIENT_ID = "target-tests"
SECRET = "s3cret-Do-Not-Leak-42"


@pytest.fixture
def session() -> Iterator[HttpTransport]:
    s = make_session(16)
    yield s
    s.close()


class Kit:
    """A client wired to one sandbox, plus the pieces tests look at."""

    def __init__(self, sandbox: Any, session: HttpTransport, **provider: Any) -> None:
        self.sandbox = sandbox
        self.tokens = ClientCredentialsTokenProvider(
            session, sandbox.url + TOKEN_PATH, CLIENT_ID, SECRET, **provider
        )
        self.client = CatenaClient(sandbox.url, self.tokens, session, timeout=5.0)


@pytest.fixture
def kit_factory(
    sandbox_factory: Callable[[dict[str, Any]], Any], session: HttpTransport
) -> Callable[..., Kit]:
    def make(config: dict[str, Any] | None = None, **provider: Any) -> Kit:
        return Kit(sandbox_factory(config or {}), session, **provider)

    return make


def source_body(**extra: Any) -> dict[str, Any]:
    return {
        "connection_id": CONN,
        "source_sender_id": "dispatch-1",
        "source_recipient_ids": ["drv-1"],
        "message_text": "Load 42 is ready at dock 3",
        "mode": "direct",
        **extra,
    }


def catena_body(connection_id: str = CONN, **extra: Any) -> dict[str, Any]:
    return {
        "connection_id": connection_id,
        "sender_id": SENDER,
        "recipient_id": RECIPIENT,
        "message_text": "Load 42 is ready at dock 3",
        **extra,
    }


def faults(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"seed": 1, "rules": list(rules)}


def assert_no_secrets(kit: Kit, *texts: str) -> None:
    secrets = [SECRET, *kit.sandbox.stats()["tokens_issued"]]
    for text in texts:
        for secret in secrets:
            assert secret not in text


# ---------------------------------------------------------------------------------------------
# create_message: accepted


def test_source_ids_body_gets_202_with_bare_id(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"message_schema": "source_ids"})
    sent_at = datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc)
    result = kit.client.create_message(source_body(weight=Decimal("1.50"), sent_at=sent_at))
    assert isinstance(result, Accepted)
    assert result.status == 202
    assert result.operation is None
    received = kit.sandbox.received()
    assert len(received) == 1
    assert received[0]["operation_id"] == result.operation_id
    assert received[0]["body"]["weight"] == 1.5  # Decimal went out as a JSON number
    assert received[0]["body"]["sent_at"].startswith("2026-03-01T12:30:00")
    assert received[0]["authorization"] == "Bearer ***"
    assert result.elapsed > 0


def test_catena_ids_body_gets_202_with_resource_operation(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"message_schema": "catena_ids"})
    result = kit.client.create_message(catena_body())
    assert isinstance(result, Accepted)
    assert result.status == 202
    assert result.operation is not None
    assert result.operation["id"] == result.operation_id
    assert result.operation["status"] == "pending"
    assert result.operation["connection_id"] == CONN


def test_sync_success_is_200_with_resource_id(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"message_schema": "catena_ids"})
    result = kit.client.create_message(catena_body(), is_sync=True)
    assert isinstance(result, Accepted)
    assert result.status == 200
    assert result.operation is not None
    assert result.operation["status"] == "success"
    assert result.operation["resource_id"]
    assert kit.sandbox.received()[0]["query"].get("is_sync") == "true"


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ({"error_type": "tsp", "response_status_code": 400}, FailureKind.REJECTION),
        ({"error_type": "validation"}, FailureKind.REJECTION),
        ({"error_type": "network"}, FailureKind.AMBIGUOUS),
        ({"error_type": "tsp", "response_status_code": 503}, FailureKind.AMBIGUOUS),
    ],
)
def test_sync_502_is_classified_by_its_last_log(
    kit_factory: Callable[..., Kit], params: dict[str, Any], kind: FailureKind
) -> None:
    kit = kit_factory(
        {"message_schema": "catena_ids", "faults": faults({"kind": "sync_fail", **params})}
    )
    result = kit.client.create_message(catena_body(), is_sync=True)
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (502, kind)
    assert isinstance(result.api_error, dict)
    assert result.api_error["status"] == "failed"
    assert result.api_error["logs"][-1]["error_type"] == params["error_type"]


# ---------------------------------------------------------------------------------------------
# create_message: failures by status


def test_422_is_a_rejection_with_every_detail(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"message_schema": "catena_ids"})
    result = kit.client.create_message(
        {"connection_id": "not-a-uuid", "recipient_id": RECIPIENT, "priority": "urgent"}
    )
    assert isinstance(result, Failure)
    assert (result.status, result.kind, result.retry_after) == (422, FailureKind.REJECTION, None)
    assert isinstance(result.api_error, dict)
    paths = {d["path"] for d in result.api_error["detail"]}
    assert {"connection_id", "sender_id", "priority"} <= paths
    assert "\n" not in result.message
    assert "sender_id" in result.message


@pytest.mark.parametrize(
    ("rule", "retry_after"),
    [
        ({"kind": "status", "status": 429, "retry_after_seconds": 3}, 3.0),
        ({"kind": "status", "status": 429}, None),
        (
            {"kind": "status", "status": 429, "retry_after_seconds": 2, "retry_after_header": True},
            2.0,
        ),
    ],
)
def test_429_is_safe_with_its_wait(
    kit_factory: Callable[..., Kit], rule: dict[str, Any], retry_after: float | None
) -> None:
    kit = kit_factory({"faults": faults(rule)})
    result = kit.client.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.status, result.kind, result.retry_after) == (429, FailureKind.SAFE, retry_after)
    assert kit.sandbox.stats()["status_counts"]["messages"] == {"429": 1}


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, FailureKind.AMBIGUOUS),
        (502, FailureKind.AMBIGUOUS),
        (503, FailureKind.SAFE),
        (504, FailureKind.AMBIGUOUS),
        (400, FailureKind.REJECTION),
        (404, FailureKind.REJECTION),
        (409, FailureKind.REJECTION),
        (501, FailureKind.REJECTION),
    ],
)
def test_status_faults_are_classified(
    kit_factory: Callable[..., Kit], status: int, kind: FailureKind
) -> None:
    kit = kit_factory({"faults": faults({"kind": "status", "status": status})})
    result = kit.client.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (status, kind)
    assert result.api_error is not None
    if status == 500:
        assert result.api_error == {"message": "Internal Server Error"}


def test_non_json_error_body_is_kept_as_text(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"faults": faults({"kind": "status", "status": 502, "non_json": True})})
    result = kit.client.create_message(source_body())
    assert isinstance(result, Failure)
    assert result.kind is FailureKind.AMBIGUOUS
    assert isinstance(result.api_error, dict)
    assert set(result.api_error) == {"text"}
    assert 0 < len(result.api_error["text"]) <= 500


# ---------------------------------------------------------------------------------------------
# create_message: network faults


def test_reset_is_ambiguous_and_nothing_was_stored(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"faults": faults({"kind": "reset", "match": {"requests": [1]}})})
    result = kit.client.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (None, FailureKind.AMBIGUOUS)
    assert result.api_error is None
    assert kit.sandbox.operations() == []
    # The pool recovers: the next message goes through on a new connection.
    assert isinstance(kit.client.create_message(source_body()), Accepted)


def test_drop_is_ambiguous_but_the_operation_exists(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"faults": faults({"kind": "drop", "match": {"requests": [1]}})})
    result = kit.client.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (None, FailureKind.AMBIGUOUS)
    assert len(kit.sandbox.operations()) == 1


def test_refused_connection_is_safe(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory(
        {"faults": faults({"kind": "refuse", "seconds": 1.0, "match": {"requests": [2]}})}
    )
    assert isinstance(kit.client.create_message(source_body()), Accepted)
    # Request 2 is answered (with Connection: close), then the listener closes for 1 s.
    assert isinstance(kit.client.create_message(source_body()), Accepted)
    result = kit.client.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (None, FailureKind.SAFE)
    time.sleep(1.3)
    assert isinstance(kit.client.create_message(source_body()), Accepted)


def test_read_timeout_is_ambiguous(kit_factory: Callable[..., Kit], session: HttpTransport) -> None:
    kit = kit_factory(
        {"faults": faults({"kind": "latency", "ms": 800, "match": {"requests": [1]}})}
    )
    slow = CatenaClient(kit.sandbox.url, kit.tokens, session, timeout=0.3)
    result = slow.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (None, FailureKind.AMBIGUOUS)
    assert "Timeout" in result.message


def test_redirect_is_not_followed_and_is_a_rejection(session: HttpTransport) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 307 Temporary Redirect\r\nLocation: https://elsewhere.example/v2\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = CatenaClient(f"http://127.0.0.1:{port}", StaticTokenProvider("tok"), session)
    result = client.create_message(source_body())
    thread.join(5)
    srv.close()
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (307, FailureKind.REJECTION)
    assert "elsewhere.example" in result.message


# ---------------------------------------------------------------------------------------------
# auth


def test_401_after_revocation_refreshes_once_then_succeeds(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"faults": faults({"kind": "revoke_tokens", "match": {"requests": [2]}})})
    assert isinstance(kit.client.create_message(source_body()), Accepted)
    result = kit.client.create_message(source_body())
    assert isinstance(result, Accepted)
    assert kit.tokens.requests_made == 2
    assert kit.sandbox.stats()["token_requests"] == 2
    assert kit.sandbox.stats()["status_counts"]["messages"] == {"202": 2, "401": 1}  # one resend


def test_401_forever_is_a_rejection_after_one_refresh(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"faults": faults({"kind": "status", "status": 401})})
    result = kit.client.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (401, FailureKind.REJECTION)
    assert "refresh" in result.message
    assert kit.tokens.requests_made == 2
    assert kit.sandbox.stats()["requests"]["messages"] == 2


def test_403_on_one_connection_rejects_only_that_connection(
    kit_factory: Callable[..., Kit],
) -> None:
    kit = kit_factory(
        {
            "message_schema": "catena_ids",
            "faults": faults({"kind": "forbid", "match": {"connection_id": OTHER_CONN}}),
        }
    )
    forbidden = kit.client.create_message(catena_body(OTHER_CONN))
    assert isinstance(forbidden, Failure)
    assert (forbidden.status, forbidden.kind) == (403, FailureKind.REJECTION)
    assert isinstance(forbidden.api_error, dict)
    assert forbidden.api_error["code"] == 403
    assert isinstance(kit.client.create_message(catena_body(CONN)), Accepted)
    assert kit.tokens.requests_made == 2  # the first token and the one refresh


def test_static_token_403_is_a_rejection_without_refresh(
    sandbox_factory: Callable[[dict[str, Any]], Any], session: HttpTransport
) -> None:
    box = sandbox_factory(
        {"faults": faults({"kind": "forbid", "match": {"connection_id": OTHER_CONN}})}
    )
    token = ClientCredentialsTokenProvider(session, box.url + TOKEN_PATH, CLIENT_ID, SECRET).token()
    client = CatenaClient(box.url, StaticTokenProvider(token), session)
    result = client.create_message(source_body(connection_id=OTHER_CONN))
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (403, FailureKind.REJECTION)
    assert box.stats()["requests"]["messages"] == 1
    assert isinstance(client.create_message(source_body()), Accepted)


def test_static_token_401_is_fatal_without_leaking_it(sandbox: Any, session: HttpTransport) -> None:
    client = CatenaClient(sandbox.url, StaticTokenProvider("expired-token-abc"), session)
    with pytest.raises(CredentialsRefused) as info:
        client.create_message(source_body())
    assert "expired-token-abc" not in str(info.value)
    assert sandbox.stats()["token_requests"] == 0


def test_credentials_refused_names_url_and_client_but_never_the_secret(
    sandbox_factory: Callable[[dict[str, Any]], Any],
    session: HttpTransport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    box = sandbox_factory(
        {"credentials": {"client_id": CLIENT_ID, "client_secret": "the-right-one"}}
    )
    tokens = ClientCredentialsTokenProvider(session, box.url + TOKEN_PATH, CLIENT_ID, SECRET)
    client = CatenaClient(box.url, tokens, session)
    with pytest.raises(CredentialsRefused) as info:
        client.create_message(source_body())
    text = str(info.value)
    assert box.url + TOKEN_PATH in text
    assert CLIENT_ID in text
    assert "invalid_client" in text
    assert SECRET not in text
    assert SECRET not in caplog.text
    assert tokens.requests_made == 1  # refused credentials are not retried
    assert box.stats()["requests"].get("messages", 0) == 0


def test_right_credentials_are_accepted(
    sandbox_factory: Callable[[dict[str, Any]], Any], session: HttpTransport
) -> None:
    box = sandbox_factory({"credentials": {"client_id": CLIENT_ID, "client_secret": SECRET}})
    tokens = ClientCredentialsTokenProvider(session, box.url + TOKEN_PATH, CLIENT_ID, SECRET)
    assert isinstance(
        CatenaClient(box.url, tokens, session).create_message(source_body()), Accepted
    )


def test_token_endpoint_503_then_ok(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory(
        {
            "faults": faults(
                {
                    "kind": "status",
                    "status": 503,
                    "endpoint": "token",
                    "match": {"requests": [1, 2]},
                }
            )
        }
    )
    assert isinstance(kit.client.create_message(source_body()), Accepted)
    assert kit.tokens.requests_made == 3


def test_token_endpoint_down_is_a_safe_failure(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory(
        {"faults": faults({"kind": "status", "status": 503, "endpoint": "token"})}, max_attempts=2
    )
    result = kit.client.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.kind, result.status) == (FailureKind.SAFE, None)
    assert "token" in result.message
    assert kit.tokens.requests_made == 2
    assert kit.sandbox.stats()["requests"].get("messages", 0) == 0
    with pytest.raises(TokenUnavailable):
        kit.tokens.token()


def test_token_endpoint_honours_retry_after_header(kit_factory: Callable[..., Kit]) -> None:
    # The sandbox's token endpoint answers Keycloak-style ({"error": ...}); the wait is a header.
    rule = {
        "kind": "status",
        "status": 429,
        "endpoint": "token",
        "retry_after_seconds": 1,
        "retry_after_header": True,
        "match": {"requests": [1]},
    }
    kit = kit_factory({"faults": faults(rule)})
    started = time.monotonic()
    kit.tokens.token()
    assert time.monotonic() - started >= 0.9
    assert kit.tokens.requests_made == 2


def test_token_is_reused_while_fresh(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"token_lifetime_seconds": 5})
    for _ in range(100):
        assert isinstance(kit.client.create_message(source_body()), Accepted)
    assert kit.sandbox.stats()["token_requests"] == 1
    assert kit.tokens.requests_made == 1


def test_short_token_is_refreshed_before_it_expires(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"token_lifetime_seconds": 1})
    sent, started = 0, time.monotonic()
    while time.monotonic() - started < 2.0:
        result = kit.client.create_message(source_body())
        assert isinstance(result, Accepted), result  # never a 401 from an expired token
        sent += 1
    assert sent > 20
    assert 2 <= kit.sandbox.stats()["token_requests"] <= 4
    assert set(kit.sandbox.stats()["status_counts"]["messages"]) == {"202"}  # no auth retry


def test_refresh_margin_is_a_tenth_of_short_lifetimes(
    sandbox_factory: Callable[[dict[str, Any]], Any], session: HttpTransport
) -> None:
    box = sandbox_factory({"token_lifetime_seconds": 5})
    now = [1000.0]
    tokens = ClientCredentialsTokenProvider(
        session, box.url + TOKEN_PATH, CLIENT_ID, SECRET, clock=lambda: now[0]
    )
    first = tokens.token()
    now[0] += 4.49
    assert tokens.token() == first
    now[0] += 0.02
    assert tokens.token() != first
    assert tokens.requests_made == 2


def test_eight_threads_refused_at_once_cause_one_refresh(
    kit_factory: Callable[..., Kit], session: HttpTransport
) -> None:
    kit = kit_factory()
    first = kit.tokens.token()
    revoked = session.request(
        "POST",
        kit.sandbox.url + REVOKE_PATH,
        form={"token": first, "client_id": CLIENT_ID, "client_secret": SECRET},
        timeout=5,
    )
    assert revoked.status_code == 200
    barrier = threading.Barrier(8)
    results: list[Accepted | Failure] = []

    def send() -> None:
        barrier.wait()
        results.append(kit.client.create_message(source_body()))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 8
    assert all(isinstance(r, Accepted) for r in results), results
    assert kit.tokens.requests_made == 2
    assert kit.sandbox.stats()["token_requests"] == 2


def test_concurrent_refresh_after_failure_single_flights(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"faults": faults({"kind": "latency", "ms": 100, "endpoint": "token"})})
    stale = kit.tokens.token()
    barrier = threading.Barrier(8)
    fresh: list[str] = []

    def refresh() -> None:
        barrier.wait()
        fresh.append(kit.tokens.refresh_after_failure(stale))

    threads = [threading.Thread(target=refresh) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(set(fresh)) == 1
    assert fresh[0] != stale
    assert kit.tokens.requests_made == 2


def test_no_token_or_secret_in_logs_or_failures(
    kit_factory: Callable[..., Kit], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kit = kit_factory(
        {
            "faults": faults(
                {"kind": "revoke_tokens", "match": {"requests": [1]}},
                {"kind": "status", "status": 422, "match": {"requests": [3]}},
                {"kind": "reset", "match": {"requests": [4]}},
            )
        }
    )
    outcomes = [kit.client.create_message(source_body()) for _ in range(3)]
    texts = [caplog.text, repr(kit.tokens), *(repr(o) for o in outcomes)]
    assert_no_secrets(kit, *texts)


# ---------------------------------------------------------------------------------------------
# operations and users


def test_get_operation(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory()
    accepted = kit.client.create_message(source_body())
    assert isinstance(accepted, Accepted)
    operation = kit.client.get_operation(CONN, accepted.operation_id)
    assert isinstance(operation, dict)
    assert operation["id"] == accepted.operation_id
    assert operation["status"] == "pending"
    missing = kit.client.get_operation(CONN, str(uuid.uuid4()))
    assert isinstance(missing, Failure)
    assert (missing.status, missing.kind) == (404, FailureKind.REJECTION)


def test_list_operations_follows_pages(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory()
    ids = []
    for _ in range(25):
        accepted = kit.client.create_message(source_body())
        assert isinstance(accepted, Accepted)
        ids.append(accepted.operation_id)
    kit.client.create_message(source_body(connection_id=OTHER_CONN))
    now = datetime.now(timezone.utc)
    listed = list(
        kit.client.list_operations(
            CONN, from_datetime=now - timedelta(hours=1), to_datetime=now + timedelta(minutes=1),
            size=10,
        )
    )  # fmt: skip
    assert [op["id"] for op in listed] == ids
    assert kit.sandbox.stats()["requests"]["operations"] == 3


def test_list_operation_summaries_carry_id_time_and_text(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory()
    for n in range(3):
        assert isinstance(
            kit.client.create_message(source_body(message_text=f"dock {n}")), Accepted
        )
    now = datetime.now(timezone.utc)
    window = {"from_datetime": now - timedelta(hours=1), "to_datetime": now + timedelta(minutes=1)}
    full = list(kit.client.list_operations(CONN, **window))
    summaries = list(kit.client.list_operation_summaries(CONN, **window))
    assert [(s.id, s.created_at, s.message_text) for s in summaries] == [
        (op["id"], op["created_at"], op["payload"]["message_text"]) for op in full
    ]
    assert [s.message_text for s in summaries] == ["dock 0", "dock 1", "dock 2"]


def test_list_operation_summaries_error_keeps_catena_error_body(
    kit_factory: Callable[..., Kit],
) -> None:
    kit = kit_factory(
        {"faults": faults({"kind": "status", "status": 503, "endpoint": "operations"})}
    )
    now = datetime.now(timezone.utc)
    with pytest.raises(CatenaApiError) as info:
        list(kit.client.list_operation_summaries(CONN, from_datetime=now, to_datetime=now))
    assert (info.value.status, info.value.kind) == (503, FailureKind.SAFE)
    assert info.value.api_error is not None


def test_list_operations_refuses_naive_datetimes(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory()
    with pytest.raises(ValueError, match="timezone"):
        kit.client.list_operations(
            CONN, from_datetime=datetime(2026, 1, 1), to_datetime=datetime(2026, 1, 2)
        )


def test_list_operations_error_raises_with_kind(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory(
        {
            "faults": faults(
                {
                    "kind": "status",
                    "status": 429,
                    "endpoint": "operations",
                    "retry_after_seconds": 4,
                }
            )
        }
    )
    now = datetime.now(timezone.utc)
    with pytest.raises(CatenaApiError) as info:
        list(
            kit.client.list_operations(
                CONN, from_datetime=now - timedelta(hours=1), to_datetime=now
            )
        )
    assert (info.value.status, info.value.kind, info.value.retry_after) == (
        429,
        FailureKind.SAFE,
        4.0,
    )


def test_list_users_batches_ids_by_100(kit_factory: Callable[..., Kit]) -> None:
    users = [
        {"id": str(uuid.uuid4()), "source_id": f"drv-{i}", "connection_id": CONN, "is_driver": True}
        for i in range(250)
    ]
    kit = kit_factory({"users": users})
    wanted = [f"drv-{i}" for i in range(230)] + ["drv-0", "drv-unknown"]
    found = kit.client.list_users(CONN, wanted)
    assert sorted(u["source_id"] for u in found) == sorted(f"drv-{i}" for i in range(230))
    assert kit.sandbox.stats()["requests"]["users"] == 3
    assert kit.client.list_users(CONN, []) == []
    assert kit.sandbox.stats()["requests"]["users"] == 3


def test_list_users_failure_raises(kit_factory: Callable[..., Kit]) -> None:
    kit = kit_factory({"faults": faults({"kind": "status", "status": 503, "endpoint": "users"})})
    with pytest.raises(CatenaApiError) as info:
        kit.client.list_users(CONN, ["drv-1"])
    assert (info.value.status, info.value.kind) == (503, FailureKind.SAFE)


# ---------------------------------------------------------------------------------------------
# construction


@pytest.mark.parametrize(
    "url",
    ["http://api.catenatelematics.com", "ftp://127.0.0.1", "api.catenatelematics.com", "https://"],
)
def test_insecure_or_malformed_urls_are_refused(url: str, session: HttpTransport) -> None:
    with pytest.raises(ClientConfigError):
        CatenaClient(url, StaticTokenProvider("t"), session)
    with pytest.raises(ClientConfigError):
        ClientCredentialsTokenProvider(session, url, CLIENT_ID, SECRET)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://127.5.0.1",
        "http://[::1]:9",
        "http://localhost/",
        "https://x.example",
    ],
)
def test_loopback_http_and_https_are_allowed(url: str, session: HttpTransport) -> None:
    CatenaClient(url, StaticTokenProvider("t"), session)


def test_make_session_is_a_verifying_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with make_session(24) as transport:
        assert isinstance(transport, HttpTransport)
        assert transport.pool_size == 24
        assert transport.ca_bundle == certifi.where()
        assert transport.headers["User-Agent"].startswith("target-catena-messages")
        assert transport.headers["Accept"] == "application/json"
    with pytest.raises(ValueError):
        make_session(0)


def test_token_with_a_newline_is_a_rejection_that_never_leaves(
    sandbox: Any, session: HttpTransport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = CatenaClient(sandbox.url, StaticTokenProvider("abc\r\nX-Injected: 1"), session)
    result = client.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (None, FailureKind.REJECTION)
    assert "X-Injected" not in result.message
    assert "X-Injected" not in caplog.text
    assert sandbox.stats()["requests"].get("messages", 0) == 0


def test_closed_transport_fails_safe(sandbox: Any) -> None:
    transport = make_session(2)
    client = CatenaClient(sandbox.url, StaticTokenProvider("t"), transport)
    transport.close()
    result = client.create_message(source_body())
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (None, FailureKind.SAFE)


# ---------------------------------------------------------------------------------------------
# the boundary: what the client cannot go on with ends the target's run


def _settings(url: str, tmp_path: Path, **extra: Any) -> Settings:
    return Settings.from_config(
        {
            "api_url": url,
            "auth_url": url + TOKEN_PATH,
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "ledger_url": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
            "dead_letter_path": str(tmp_path / "dead-letters.jsonl"),
            **extra,
        }
    )


def test_refused_credentials_leave_the_built_client_as_a_fatal_error(
    sandbox_factory: Callable[[dict[str, Any]], Any], tmp_path: Path
) -> None:
    box = sandbox_factory(
        {"credentials": {"client_id": CLIENT_ID, "client_secret": "the-right-one"}}
    )
    client, _ = client_from_settings(_settings(box.url, tmp_path), Redactor())
    with pytest.raises(FatalError) as info:
        client.create_message(source_body())
    assert isinstance(info.value, CredentialsRefused)
    assert "invalid_client" in str(info.value)
    assert SECRET not in str(info.value)


def test_a_refused_static_token_is_fatal_but_its_403_stays_one_rejection(
    sandbox_factory: Callable[[dict[str, Any]], Any], session: HttpTransport, tmp_path: Path
) -> None:
    box = sandbox_factory(
        {"faults": faults({"kind": "forbid", "match": {"connection_id": OTHER_CONN}})}
    )
    token = ClientCredentialsTokenProvider(session, box.url + TOKEN_PATH, CLIENT_ID, SECRET).token()
    client, _ = client_from_settings(_settings(box.url, tmp_path, access_token=token), Redactor())
    forbidden = client.create_message(source_body(connection_id=OTHER_CONN))
    assert isinstance(forbidden, Failure)
    assert (forbidden.status, forbidden.kind) == (403, FailureKind.REJECTION)
    settings = _settings(box.url, tmp_path, access_token="expired-token-abc")
    stale, _ = client_from_settings(settings, Redactor())
    with pytest.raises(FatalError) as info:  # the sandbox never issued this token: a 401
        stale.create_message(source_body())
    assert isinstance(info.value, TokenNotRefreshable)
    assert "expired-token-abc" not in str(info.value)


def test_an_unusable_ca_bundle_is_a_configuration_error_of_the_run(
    sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="REQUESTS_CA_BUNDLE"):
        client_from_settings(_settings(sandbox.url, tmp_path), Redactor())
