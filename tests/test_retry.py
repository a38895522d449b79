"""Tests for the retry model and classification: statuses, exceptions, Retry-After, the policy.

Exceptions come from real sockets (a closed port, tiny local servers that misbehave) sent through
the client's own transport, so the tests follow whatever wrapping urllib3 actually does.
"""

from __future__ import annotations

import ast
import http.client
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3.exceptions as u3
from hypothesis import given
from hypothesis import strategies as st
from urllib3 import HTTPHeaderDict
from urllib3.util.ssl_match_hostname import CertificateError

from target_catena_messages.catena.auth import token_policy
from target_catena_messages.catena.classify import (
    FailureKind,
    RequestNotSendable,
    classify_exception,
    classify_status,
    retry_after_seconds,
)
from target_catena_messages.catena.retry import GiveUp, GiveUpReason, RejectionBreaker, RetryPolicy
from target_catena_messages.catena.transport import SEND_ERRORS, HttpTransport
from target_catena_messages.delivery.lookup import READ_POLICY
from target_catena_messages.ops.confirm import rounds_policy
from target_catena_messages.pipeline.users import USERS_POLICY

SAFE, AMBIGUOUS, AUTH, REJECTION = (
    FailureKind.SAFE,
    FailureKind.AMBIGUOUS,
    FailureKind.AUTH,
    FailureKind.REJECTION,
)

# ---------------------------------------------------------------------------------------------
# classify_status


@pytest.mark.parametrize("status", [200, 201, 202])
@pytest.mark.parametrize("is_sync", [False, True])
def test_accepted_statuses_are_not_failures(status: int, is_sync: bool) -> None:
    assert classify_status(status, {"id": "x"}, is_sync=is_sync) is None


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, SAFE),
        (503, SAFE),
        (408, SAFE),
        (500, AMBIGUOUS),
        (502, AMBIGUOUS),
        (504, AMBIGUOUS),
        (507, AMBIGUOUS),
        (599, AMBIGUOUS),
        (401, AUTH),
        (403, AUTH),
        (400, REJECTION),
        (404, REJECTION),
        (405, REJECTION),
        (409, REJECTION),
        (410, REJECTION),
        (413, REJECTION),
        (422, REJECTION),
        (501, REJECTION),
        (301, REJECTION),
        (302, REJECTION),
        (307, REJECTION),
        (308, REJECTION),
        (204, AMBIGUOUS),
        (206, AMBIGUOUS),
    ],
)
def test_status_classes_async(status: int, kind: FailureKind) -> None:
    assert classify_status(status, None, is_sync=False) is kind


def test_501_is_a_rejection_not_an_unknown_5xx() -> None:
    assert (
        classify_status(501, {"code": 501, "message": "Not Implemented"}, is_sync=True) is REJECTION
    )


def _operation(*logs: dict[str, object]) -> dict[str, object]:
    return {"id": "op-1", "status": "failed", "resource": "message", "logs": list(logs)}


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (_operation({"status": "failed", "error_type": "network"}), AMBIGUOUS),
        (
            _operation({"status": "failed", "error_type": "tsp", "response_status_code": 429}),
            AMBIGUOUS,
        ),
        (
            _operation({"status": "failed", "error_type": "tsp", "response_status_code": 500}),
            AMBIGUOUS,
        ),
        (
            _operation({"status": "failed", "error_type": "tsp", "response_status_code": 503}),
            AMBIGUOUS,
        ),
        (
            _operation({"status": "failed", "error_type": "tsp", "response_status_code": 400}),
            REJECTION,
        ),
        (_operation({"status": "failed", "error_type": "validation"}), REJECTION),
        (
            _operation({"status": "failed", "error_type": "auth", "response_status_code": 401}),
            REJECTION,
        ),
        (
            _operation({"status": "failed", "error_type": "tsp", "response_status_code": None}),
            REJECTION,
        ),
        # Only the LAST log entry counts.
        (
            _operation(
                {"status": "failed", "error_type": "network"},
                {"status": "failed", "error_type": "tsp", "response_status_code": 422},
            ),
            REJECTION,
        ),
        (
            _operation(
                {"status": "failed", "error_type": "tsp", "response_status_code": 422},
                {"status": "failed", "error_type": "network"},
            ),
            AMBIGUOUS,
        ),
        # An operation without logs: Catena answered and refused, nothing points at an outage.
        (_operation(), REJECTION),
        ({"id": "op-1", "status": "failed"}, REJECTION),
        # Not an operation at all: a gateway answered, the request may have been processed.
        (None, AMBIGUOUS),
        ({"message": "Bad Gateway"}, AMBIGUOUS),
        ("<html>bad gateway</html>", AMBIGUOUS),
    ],
)
def test_sync_502_depends_on_last_log(body: object, kind: FailureKind) -> None:
    assert classify_status(502, body, is_sync=True) is kind


def test_sync_502_with_bool_status_code_is_not_a_5xx() -> None:
    body = _operation({"status": "failed", "error_type": "tsp", "response_status_code": True})
    assert classify_status(502, body, is_sync=True) is REJECTION


def test_async_502_ignores_the_body() -> None:
    body = _operation({"status": "failed", "error_type": "tsp", "response_status_code": 400})
    assert classify_status(502, body, is_sync=False) is AMBIGUOUS


# ---------------------------------------------------------------------------------------------
# classify_exception with real sockets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _read_request(conn: socket.socket) -> bytes:
    """Read until the end of headers plus the declared body, so the request was fully sent."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@contextmanager
def one_shot_server(handler: Callable[[socket.socket], object]) -> Iterator[str]:
    """A loopback server that accepts one connection, runs ``handler`` on it, then stops."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        try:
            handler(conn)
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.close()
        thread.join(timeout=5)


def _post(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> BaseException:
    """POST through a fresh transport and return what it raised (exactly as the client sees it)."""
    with HttpTransport(1) as transport:
        try:
            transport.request(
                "POST",
                url + "/v2/telematics/messages",
                body=b'{"a": 1}',
                headers={"Content-Type": "application/json", **(headers or {})},
                timeout=timeout,
            )
        except SEND_ERRORS as exc:
            return exc
    raise AssertionError("the request unexpectedly succeeded")


def test_connection_refused_is_safe() -> None:
    exc = _post(f"http://127.0.0.1:{_free_port()}")
    assert isinstance(exc, u3.NewConnectionError)
    assert classify_exception(exc) is SAFE


def test_name_resolution_failure_is_safe() -> None:
    exc = _post("http://no-such-host.invalid")
    assert isinstance(exc, u3.NameResolutionError)
    assert classify_exception(exc) is SAFE


def test_connect_timeout_is_safe() -> None:
    # A listener whose accept queue is full drops further SYNs, so connect() times out.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        time.sleep(0.05)
        exc = _post(f"http://127.0.0.1:{port}", timeout=0.3)
    finally:
        for f in fillers:
            f.close()
        srv.close()
    if not isinstance(exc, u3.ConnectTimeoutError):
        pytest.skip(f"this kernel does not drop SYNs on a full backlog ({type(exc).__name__})")
    assert classify_exception(exc) is SAFE


def test_close_after_reading_request_is_ambiguous() -> None:
    with one_shot_server(_read_request) as url:
        exc = _post(url)
    assert isinstance(exc, u3.ProtocolError)
    assert classify_exception(exc) is AMBIGUOUS


def _reset(conn: socket.socket) -> None:
    _read_request(conn)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_reset_after_reading_request_is_ambiguous() -> None:
    with one_shot_server(_reset) as url:
        exc = _post(url)
    assert isinstance(exc, u3.ProtocolError)
    assert classify_exception(exc) is AMBIGUOUS


def test_read_timeout_is_ambiguous() -> None:
    done = threading.Event()

    def stall(conn: socket.socket) -> None:
        _read_request(conn)
        done.wait(5)

    with one_shot_server(stall) as url:
        exc = _post(url, timeout=0.3)
        done.set()
    assert isinstance(exc, u3.ReadTimeoutError)
    assert classify_exception(exc) is AMBIGUOUS


def test_timeout_while_reading_body_is_ambiguous() -> None:
    done = threading.Event()

    def half_body(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(b'HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\n{"id":')
        done.wait(5)

    with one_shot_server(half_body) as url:
        exc = _post(url, timeout=0.3)
        done.set()
    assert isinstance(exc, u3.ReadTimeoutError)
    assert classify_exception(exc) is AMBIGUOUS


def test_truncated_chunked_body_is_ambiguous() -> None:
    def truncated(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(
            b'HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"id"\r\n'
            b"zz-not-hex\r\n"
        )

    with one_shot_server(truncated) as url:
        exc = _post(url)
    assert isinstance(exc, u3.ProtocolError)
    assert classify_exception(exc) is AMBIGUOUS


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://[::1", u3.LocationParseError),
        ("http://127.0.0.1:99999", u3.LocationParseError),
        ("ftp://127.0.0.1", u3.URLSchemeUnknown),
    ],
)
def test_unparsable_url_is_a_rejection(url: str, error: type[Exception]) -> None:
    exc = _post(url)
    assert isinstance(exc, error)
    assert classify_exception(exc) is REJECTION


def test_unsendable_header_is_a_rejection_and_nothing_is_sent() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        exc = _post(f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer t\r\nX-Evil: 1"})
        srv.settimeout(0.2)
        with pytest.raises(TimeoutError):
            srv.accept()  # not even a connection was opened
    assert isinstance(exc, RequestNotSendable)
    assert "X-Evil" not in str(exc)
    assert classify_exception(exc) is REJECTION


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
def test_untrusted_certificate_is_safe(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def tls(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls_conn:
                _read_request(tls_conn)
        except (ssl.SSLError, OSError):
            pass

    with one_shot_server(tls) as url:
        exc = _post(url.replace("http://", "https://"))
    assert isinstance(exc, u3.SSLError)
    assert classify_exception(exc) is SAFE


# Chains that are awkward to provoke with sockets; built the way urllib3 builds them.


def test_max_retry_error_reason_is_followed() -> None:
    refused = u3.NewConnectionError(None, "Failed to establish a new connection: refused")  # type: ignore[arg-type]
    assert classify_exception(u3.MaxRetryError(None, "/", reason=refused)) is SAFE  # type: ignore[arg-type]
    proto = u3.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
    assert classify_exception(u3.MaxRetryError(None, "/", reason=proto)) is AMBIGUOUS  # type: ignore[arg-type]


def test_wrapped_errors_in_args_are_followed() -> None:
    refused = u3.NewConnectionError(None, "Failed to establish a new connection: refused")  # type: ignore[arg-type]
    assert classify_exception(u3.ProxyError("Unable to connect to proxy", refused)) is SAFE
    assert classify_exception(u3.SSLError(CertificateError("hostname mismatch"))) is SAFE
    pool = HttpTransport(1)._pool("http", "127.0.0.1", 9)
    assert classify_exception(u3.EmptyPoolError(pool, "no free connection")) is SAFE
    exc = u3.SSLError(u3.ProtocolError("aborted", http.client.RemoteDisconnected("closed")))
    assert classify_exception(exc) is AMBIGUOUS


def test_conflicting_evidence_is_ambiguous() -> None:
    exc = u3.ProxyError("Unable to connect to proxy", ConnectionRefusedError(111, "refused"))
    exc.__context__ = ConnectionResetError(104, "reset")
    assert classify_exception(exc) is AMBIGUOUS


@pytest.mark.parametrize(
    "exc",
    [
        u3.HTTPError("something odd"),
        u3.TimeoutError("timed out, but connecting or reading?"),
        u3.SSLError(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")),
        TimeoutError("timed out"),
        OSError("boom"),
        RuntimeError("unknown"),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
    ],
)
def test_no_evidence_means_ambiguous(exc: BaseException) -> None:
    assert classify_exception(exc) is AMBIGUOUS


def test_raw_socket_errors() -> None:
    assert classify_exception(ConnectionRefusedError(111, "refused")) is SAFE
    assert classify_exception(ConnectionResetError(104, "reset")) is AMBIGUOUS
    assert classify_exception(BrokenPipeError(32, "pipe")) is AMBIGUOUS


def test_self_referencing_chain_terminates() -> None:
    a = u3.HTTPError("a")
    b = u3.HTTPError("b")
    a.__context__ = b
    b.__context__ = a
    assert classify_exception(a) is AMBIGUOUS


# ---------------------------------------------------------------------------------------------
# retry_after_seconds


def test_retry_after_from_body() -> None:
    body = {"code": 429, "message": "Too Many Requests", "detail": {"retry_after_seconds": 7}}
    assert retry_after_seconds(body, {"Retry-After": "99"}) == 7.0


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        ({"detail": {"retry_after_seconds": 1.5}}, {}, 1.5),
        ({"detail": {"retry_after_seconds": "3"}}, {}, 3.0),
        ({"detail": {"retry_after_seconds": -4}}, {}, 0.0),
        ({"detail": {"retry_after_seconds": True}}, {}, None),
        ({"detail": {"retry_after_seconds": "soon"}}, {}, None),
        ({"detail": {"retry_after_seconds": float("nan")}}, {}, None),
        ({"detail": {"message": "slow down"}}, {"Retry-After": "2"}, 2.0),
        ({"detail": None}, {"retry-after": "5"}, 5.0),
        ({"detail": "text"}, {"RETRY-AFTER": " 4 "}, 4.0),
        (None, {"Retry-After": "0"}, 0.0),
        (None, {}, None),
        ("<html>", {"Retry-After": "not a date"}, None),
        ({"message": "x"}, {"Content-Type": "application/json"}, None),
    ],
)
def test_retry_after_sources(body: object, headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(body, headers) == expected


def test_retry_after_http_date() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds(None, {"Retry-After": later}, now=now) == 30.0
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds(None, {"Retry-After": earlier}, now=now) == 0.0


def test_retry_after_with_urllib3_headers() -> None:
    headers = HTTPHeaderDict({"retry-after": "3"})
    assert retry_after_seconds({}, headers) == 3.0


# ---------------------------------------------------------------------------------------------
# RetryPolicy


def test_ceiling_doubles_then_caps() -> None:
    policy = RetryPolicy(base_seconds=0.5, cap_seconds=30.0)
    assert [policy.ceiling(a) for a in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.ceiling(10_000) == 30.0
    assert policy.ceiling(-1) == 0.5


@given(attempt=st.integers(min_value=0, max_value=10_000), seed=st.integers())
def test_backoff_within_bounds(attempt: int, seed: int) -> None:
    policy = RetryPolicy(base_seconds=0.25, cap_seconds=10.0)
    wait = policy.backoff(attempt, random.Random(seed))
    assert 0.0 <= wait <= policy.ceiling(attempt) <= 10.0


def test_backoff_is_jittered_and_reproducible() -> None:
    policy = RetryPolicy()
    waits = [policy.backoff(5, random.Random(i)) for i in range(50)]
    assert len(set(waits)) > 40  # full jitter, not a fixed delay
    assert min(waits) < 0.25 * policy.ceiling(5) < 0.75 * policy.ceiling(5) < max(waits)
    assert policy.backoff(3, random.Random(7)) == policy.backoff(3, random.Random(7))


def test_may_retry_counts_and_time_budget() -> None:
    policy = RetryPolicy(max_retries=3, max_retry_seconds=10.0)
    assert policy.may_retry(0, 0.0, 1.0)
    assert policy.may_retry(2, 5.0, 5.0)
    assert not policy.may_retry(3, 0.0, 0.0)
    assert not policy.may_retry(1, 9.0, 1.5)
    assert not RetryPolicy(max_retries=0).may_retry(0, 0.0, 0.0)


def test_defaults_match_the_contract() -> None:
    policy = RetryPolicy()
    assert (policy.max_retries, policy.max_retry_seconds) == (6, 900.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"max_retry_seconds": -1.0},
        {"base_seconds": 0.0},
        {"base_seconds": 5.0, "cap_seconds": 1.0},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_immutable() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_retries = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# RetryPolicy.increment: the one retry model (pure; a fake rng makes every backoff known)


class HalfRng(random.Random):
    """Full jitter always lands halfway: each backoff is half its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) / 2


RNG = HalfRng()


def steps(state: RetryPolicy, *failures: tuple[FailureKind, int | None, float | None]) -> Any:
    """Apply ``failures`` in turn; the last answer (a state or a GiveUp)."""
    answer: RetryPolicy | GiveUp = state
    for kind, status, retry_after in failures:
        assert isinstance(answer, RetryPolicy), answer
        answer = answer.increment(kind, status, retry_after, rng=RNG)
    return answer


def test_safe_failures_back_off_and_count_until_max_retries() -> None:
    policy = RetryPolicy(max_retries=3, base_seconds=1.0, cap_seconds=30.0)
    state = policy
    waits = []
    for _ in range(3):
        step = state.increment(SAFE, 503, None, rng=RNG)
        assert isinstance(step, RetryPolicy)
        assert (step.shared_pause, step.look_up, step.maybe_sent) == (False, False, False)
        waits.append(step.wait)
        state = step
    assert waits == [0.5, 1.0, 2.0]  # half of 1, 2, 4
    assert (state.retries, state.waited) == (3, 3.5)
    end = state.increment(SAFE, 503, None, rng=RNG)
    assert isinstance(end, GiveUp)
    assert (end.reason, end.retryable, end.look_up) == (GiveUpReason.RETRIES, True, False)
    assert [a.status for a in end.history] == [503] * 4
    assert policy.retries == 0  # the policy itself never changes


def test_the_waiting_budget_ends_retries_before_the_count_does() -> None:
    policy = RetryPolicy(max_retries=10, max_retry_seconds=2.0, base_seconds=1.0)
    end = steps(policy, (SAFE, None, None), (SAFE, None, None), (SAFE, None, None))
    assert isinstance(end, GiveUp)  # waits 0.5 + 1.0, then 2.0 would pass the 2 s budget
    assert end.reason is GiveUpReason.TIME
    assert len(end.history) == 3


def test_a_429_of_a_create_is_a_shared_pause_that_uses_no_retry() -> None:
    policy = RetryPolicy(max_retries=1, max_retry_seconds=10.0)
    state = steps(policy, *[(SAFE, 429, 3.0)] * 3)
    assert isinstance(state, RetryPolicy)
    assert (state.retries, state.waited, state.wait, state.shared_pause) == (0, 9.0, 3.0, True)
    assert not state.look_up
    end = state.increment(SAFE, 429, 3.0)
    assert isinstance(end, GiveUp)  # 12 s of pauses > 10 s
    assert (end.reason, end.retryable, end.pause) == (GiveUpReason.TIME, True, 3.0)
    after_ambiguous = steps(policy, (AMBIGUOUS, 500, None), *[(SAFE, 429, 5.0)] * 2)
    assert isinstance(after_ambiguous, GiveUp)  # out of time on 429s, but maybe sent before
    assert (after_ambiguous.reason, after_ambiguous.maybe_sent) == (GiveUpReason.TIME, True)
    assert not after_ambiguous.retryable
    without_wait = policy.increment(SAFE, 429, None, rng=RNG)
    assert isinstance(without_wait, RetryPolicy)
    assert without_wait.wait == 0.25  # no retry-after: the backoff (half of 0.5)


def test_an_ambiguous_create_is_looked_up_before_it_is_resent_or_given_up() -> None:
    policy = RetryPolicy(max_ambiguous_resends=1)
    first = policy.increment(AMBIGUOUS, 500, None, rng=RNG)
    assert isinstance(first, RetryPolicy)
    assert (first.look_up, first.maybe_sent, first.resends, first.retries) == (True, True, 1, 1)
    second = first.increment(AMBIGUOUS, None, None, rng=RNG)
    assert isinstance(second, GiveUp)
    assert (second.reason, second.look_up, second.retryable) == (
        GiveUpReason.RESENDS,
        True,
        False,
    )


def test_a_create_that_may_have_been_sent_is_never_retryable_when_it_gives_up() -> None:
    policy = RetryPolicy(max_retries=1, max_ambiguous_resends=5)
    end = steps(policy, (AMBIGUOUS, 504, None), (SAFE, 503, None))
    assert isinstance(end, GiveUp)
    assert (end.reason, end.maybe_sent, end.retryable, end.look_up) == (
        GiveUpReason.RETRIES,
        True,
        False,
        False,
    )


def test_resume_carries_a_send_of_an_earlier_run() -> None:
    resumed = RetryPolicy(max_ambiguous_resends=1).resume(resends=1, maybe_sent=True)
    end = resumed.increment(AMBIGUOUS, None, None, rng=RNG)
    assert isinstance(end, GiveUp)
    assert end.reason is GiveUpReason.RESENDS
    safe_end = steps(
        RetryPolicy(max_retries=0).resume(resends=0, maybe_sent=True), (SAFE, None, None)
    )
    assert isinstance(safe_end, GiveUp)
    assert not safe_end.retryable


def test_a_rejection_gives_up_at_once_and_feeds_the_breaker() -> None:
    policy = RetryPolicy()
    breaker = RejectionBreaker(2)
    first = policy.increment(REJECTION, 422, None, breaker=breaker, scope="conn")
    assert isinstance(first, GiveUp)
    assert (first.reason, first.retryable, first.fatal) == (GiveUpReason.REJECTED, False, None)
    second = policy.increment(REJECTION, 422, None, breaker=breaker, scope="conn")
    assert isinstance(second, GiveUp)
    assert second.fatal is not None
    assert second.fatal.startswith("2 rejections in a row with status 422 on connection conn")
    assert policy.increment(REJECTION, 422).fatal is None  # type: ignore[union-attr]


def test_rejections_without_a_status_also_make_a_streak() -> None:
    """A request refused before any answer (no status) repeats like any other status."""
    breaker = RejectionBreaker(2)
    assert breaker.rejected("conn", None) is None
    assert breaker.rejected("conn", None) is not None
    assert breaker.rejected("other", 422) is None
    assert breaker.rejected("other", None) is None  # a different status restarts the streak


def test_a_read_retries_ambiguous_failures_and_counts_429s() -> None:
    read = RetryPolicy(max_retries=2, idempotent=True, count_throttled=True, jitter=False)
    first = read.increment(AMBIGUOUS, 500, None)
    assert isinstance(first, RetryPolicy)
    assert (first.look_up, first.maybe_sent, first.resends, first.wait) == (False, False, 0, 0.5)
    second = first.increment(SAFE, 429, 7.0)
    assert isinstance(second, RetryPolicy)
    assert (second.retries, second.wait, second.shared_pause) == (2, 7.0, True)
    assert isinstance(second.increment(SAFE, 429, 7.0), GiveUp)
    honoured = read.increment(SAFE, 503, 4.0)
    assert isinstance(honoured, RetryPolicy)
    assert honoured.wait == 4.0  # a read honours the server's wait whatever the status
    create = RetryPolicy(jitter=False).increment(SAFE, 503, 4.0)
    assert isinstance(create, RetryPolicy)
    assert create.wait == 0.5  # a create backs off: its 429s have the shared pause instead


def test_an_unavailable_catena_uses_up_no_retries() -> None:
    up = [False]
    policy = RetryPolicy(max_retries=1, max_retry_seconds=1.0, available=lambda: up[0])
    state = steps(policy, *[(SAFE, None, None)] * 20)
    assert isinstance(state, RetryPolicy)
    assert (state.retries, state.waited, len(state.history)) == (0, 0.0, 20)
    up[0] = True
    state = steps(state, (SAFE, None, None))
    assert isinstance(state, RetryPolicy)
    assert state.retries == 1
    assert isinstance(state.increment(SAFE, None, None, rng=RNG), GiveUp)
    rejected = RetryPolicy(available=lambda: False).increment(REJECTION, 400)
    assert isinstance(rejected, GiveUp)  # an outage does not make a rejection retryable


def test_each_caller_keeps_its_numbers() -> None:
    def waits(policy: RetryPolicy) -> list[float]:
        out: list[float] = []
        state: RetryPolicy | GiveUp = policy
        while isinstance(state, RetryPolicy):
            state = state.increment(SAFE, 503, None, rng=RNG)
            if isinstance(state, RetryPolicy):
                out.append(state.wait)
        return out

    assert waits(READ_POLICY) == [2.0, 4.0, 6.0]  # 4 attempts, linear
    assert waits(USERS_POLICY) == [1.0, 2.0, 4.0, 8.0]  # 5 attempts, 2**n without jitter
    token = token_policy(5)
    assert (token.max_retries, token.max_retry_seconds, token.cap_seconds) == (4, 30.0, 8.0)
    assert waits(token) == [0.25, 0.5, 1.0, 2.0]  # full jitter (half of each ceiling here)
    rounds = rounds_policy(2.0)
    assert [rounds.ceiling(n) for n in range(8)] == [
        2.0,
        3.0,
        4.5,
        6.75,
        10.125,
        15.1875,
        22.78125,
        30.0,
    ]


def test_the_client_package_imports_nothing_from_the_rest_of_the_target() -> None:
    package = Path(__file__).resolve().parents[1] / "target_catena_messages"
    outside = []
    for path in sorted((package / "catena").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
                if node.module == "target_catena_messages":
                    names = [f"target_catena_messages.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            outside += [
                f"{path.name}: {n}"
                for n in names
                if n.startswith("target_catena_messages")
                and not n.startswith("target_catena_messages.catena")
            ]
    assert outside == []
