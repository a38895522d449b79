"""Tests for the client's urllib3 transport over real loopback sockets: TLS trust, pool bounds,
proxies, headers and query strings.

Small local servers (plain, TLS with a self-signed certificate, a CONNECT proxy) stand in for
Catena where the sandbox cannot: they count sockets and see raw requests.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import certifi
import pytest
import urllib3.exceptions as u3

from target_catena_messages.catena import (
    Accepted,
    CatenaClient,
    Failure,
    HttpTransport,
    StaticTokenProvider,
    make_session,
)
from target_catena_messages.catena.classify import FailureKind
from target_catena_messages.catena.errors import ClientConfigError
from target_catena_messages.catena.transport import ca_bundle_from_env
from tests.harness import run_target, sandbox_config, singer_lines

TOKEN = "tok-Do-Not-Leak-7"
CONNECTION = "0b6f5a4e-1c2d-4e3f-8a9b-0c1d2e3f4a5b"
BODY = {"connection_id": "c", "message_text": "hi"}
_ENV = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
        "all_proxy", "NO_PROXY", "no_proxy")  # fmt: skip

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------
# servers


class Server(http.server.ThreadingHTTPServer):
    """Answers every request ``status`` ``{"id": ...}``; counts sockets and records requests."""

    daemon_threads = True

    def __init__(
        self,
        delay: float = 0.0,
        tls: ssl.SSLContext | None = None,
        status: int = 202,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.delay = delay
        self.status = status
        self.extra_headers = headers or {}
        self.lock = threading.Lock()
        self.accepted = 0  # connections that reached HTTP (after a TLS handshake)
        self.open = 0
        self.peak_open = 0
        self.requests: list[dict[str, Any]] = []

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.accepted += 1
            self.open += 1
            self.peak_open = max(self.peak_open, self.open)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.open -= 1
        super().shutdown_request(request)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: Server

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with self.server.lock:
            n = len(self.server.requests)
            self.server.requests.append(
                {"method": self.command, "path": self.path, "headers": dict(self.headers),
                 "body": body}
            )  # fmt: skip
        time.sleep(self.server.delay)
        payload = json.dumps({"id": f"op-{n}"}).encode()
        self.send_response(self.server.status)
        for name, value in self.server.extra_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serving(
    delay: float = 0.0, tls: ssl.SSLContext | None = None, **answer: Any
) -> Iterator[Server]:
    server = Server(delay, tls, **answer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def url_of(server: Server, scheme: str = "http", host: str = "127.0.0.1") -> str:
    return f"{scheme}://{host}:{server.server_address[1]}"


class ConnectProxy:
    """A CONNECT-only HTTP proxy: records each tunnel's request line and the bytes it relays."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.srv.getsockname()[1]}"
        self.tunnels: list[str] = []
        self.relayed = b""
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        line = head.split(b"\r\n", 1)[0].decode()
        self.tunnels.append(line)
        host, port = line.split()[1].rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=self._pipe, args=(upstream, conn, False), daemon=True).start()
        self._pipe(conn, upstream, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.relayed += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()
            src.close()

    def close(self) -> None:
        self.srv.close()


# ---------------------------------------------------------------------------------------------
# certificates


def _self_signed(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A certificate for 127.0.0.1 and one for another name, both self-signed (their own CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary")
    directory = tmp_path_factory.mktemp("certs")
    return {
        "loopback": _self_signed(directory, "loopback", "IP:127.0.0.1"),
        "other": _self_signed(directory, "other", "DNS:other.example"),
    }


def server_context(cert_and_key: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert_and_key)
    return context


def send(url: str, transport: HttpTransport) -> Accepted | Failure:
    return CatenaClient(url, StaticTokenProvider(TOKEN), transport).create_message(BODY)


# ---------------------------------------------------------------------------------------------
# TLS trust


@needs_openssl
@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_ca_bundle_from_env_is_trusted(
    certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    cert = certs["loopback"][0]
    monkeypatch.setenv(variable, str(cert))
    with serving(tls=server_context(certs["loopback"])) as server, make_session(2) as transport:
        assert transport.ca_bundle == str(cert)
        result = send(url_of(server, "https"), transport)
    assert isinstance(result, Accepted), result
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {TOKEN}"


@needs_openssl
def test_requests_ca_bundle_wins_over_ssl_cert_file(
    certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs["loopback"][0]))
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["other"][0]))
    assert ca_bundle_from_env() == (str(certs["loopback"][0]), "REQUESTS_CA_BUNDLE")
    assert ca_bundle_from_env({}) == (certifi.where(), "certifi")


@needs_openssl
def test_ca_directory_is_accepted(
    certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shutil.copy(certs["loopback"][0], tmp_path / "loopback.pem")
    rehash = subprocess.run(["openssl", "rehash", str(tmp_path)], check=False, capture_output=True)
    if rehash.returncode:
        pytest.skip("openssl rehash is not available")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path))
    with serving(tls=server_context(certs["loopback"])) as server, make_session(2) as transport:
        assert isinstance(send(url_of(server, "https"), transport), Accepted)


@needs_openssl
def test_untrusted_certificate_is_a_safe_failure_and_nothing_arrives(
    certs: dict[str, tuple[Path, Path]],
) -> None:
    with serving(tls=server_context(certs["loopback"])) as server, make_session(2) as transport:
        assert transport.ca_bundle == certifi.where()
        result = send(url_of(server, "https"), transport)
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (None, FailureKind.SAFE)
    assert "CERTIFICATE_VERIFY_FAILED" in result.message
    assert server.requests == []


@needs_openssl
def test_trusted_certificate_for_another_host_is_refused(
    certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs["other"][0]))
    with serving(tls=server_context(certs["other"])) as server, make_session(2) as transport:
        result = send(url_of(server, "https"), transport)
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (None, FailureKind.SAFE)
    assert server.requests == []


@pytest.mark.parametrize("content", [None, "not a certificate"])
def test_unusable_ca_bundle_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None
) -> None:
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_text(content, encoding="utf-8")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    with pytest.raises(ClientConfigError, match="REQUESTS_CA_BUNDLE"):
        make_session(2)


# ---------------------------------------------------------------------------------------------
# pooling


def test_pool_never_opens_more_than_pool_size_sockets_under_32_threads() -> None:
    pool_size, threads, each = 4, 32, 5
    statuses: list[int] = []
    with serving(delay=0.01) as server, HttpTransport(pool_size) as transport:
        url = url_of(server) + "/v2/telematics/messages"
        barrier = threading.Barrier(threads)

        def work() -> None:
            barrier.wait()
            for _ in range(each):
                answer = transport.request("POST", url, body=b"{}", timeout=10)
                statuses.append(answer.status_code)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        accepted, peak = server.accepted, server.peak_open
    assert statuses == [202] * (threads * each)
    assert peak == pool_size  # the threads did contend for every socket...
    assert accepted == pool_size  # ...and no extra socket was opened and thrown away


def test_waiting_for_a_socket_longer_than_the_timeout_fails_safe() -> None:
    with serving(delay=2.0) as server, HttpTransport(1) as transport:
        url = url_of(server)
        slow = threading.Thread(target=transport.request, args=("GET", url), daemon=True)
        slow.start()
        time.sleep(0.2)
        with pytest.raises(u3.EmptyPoolError):
            transport.request("GET", url, timeout=0.2)
        assert slow.is_alive()  # gave up at its own timeout, while the socket was still taken
        slow.join(10)
        assert len(server.requests) == 1


# ---------------------------------------------------------------------------------------------
# requests on the wire


def test_headers_query_and_form_on_the_wire() -> None:
    with serving() as server, HttpTransport(2, user_agent="ua-test/1") as transport:
        answer = transport.request(
            "GET",
            url_of(server) + "/v2/telematics/users?fixed=1",
            params=[
                ("source_ids", "a b"),
                ("source_ids", "c&d"),
                ("at", "2026-01-01T00:00:00+00:00"),
            ],
            headers={"accept": "text/plain", "Authorization": f"Bearer {TOKEN}"},
        )
        transport.request("POST", url_of(server) + "/token", form={"grant_type": "x y", "s": "&="})
        transport.request("GET", url_of(server) + "/p", params={"ids": ["1", "2"], "one": "3"})
    assert answer.status_code == 202
    assert answer.reason == "Accepted"
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.content) == {"id": "op-0"}
    get, post, mapping = server.requests
    assert get["path"] == (
        "/v2/telematics/users?fixed=1&source_ids=a+b&source_ids=c%26d&at=2026-01-01T00%3A00%3A00%2B00%3A00"
    )
    assert get["headers"]["User-Agent"] == "ua-test/1"
    assert get["headers"]["accept"] == "text/plain"  # replaced the default, not duplicated
    assert "Accept" not in get["headers"]
    assert post["body"] == b"grant_type=x+y&s=%26%3D"
    assert post["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert post["headers"]["Accept"] == "application/json"
    assert mapping["path"] == "/p?ids=1&ids=2&one=3"


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (429, {"Retry-After": "1"}),
        (503, {"Retry-After": "1"}),
        (307, {"Location": "/elsewhere"}),
        (301, {"Location": "/elsewhere"}),
    ],
)
def test_urllib3_never_retries_or_redirects_even_a_get(
    status: int, headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    real_sleep = time.sleep

    def watched_sleep(seconds: float) -> None:
        slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", watched_sleep)  # what urllib3's Retry.sleep calls
    with serving(status=status, headers=headers) as server, HttpTransport(2) as transport:
        answer = transport.request("GET", url_of(server) + "/v2/telematics/users")
    assert answer.status_code == status
    assert len(server.requests) == 1
    assert not [s for s in slept if s >= 1]  # no Retry-After sleep either


def test_body_and_form_together_are_a_programming_error() -> None:
    with HttpTransport(1) as transport, pytest.raises(ValueError, match="not both"):
        transport.request("POST", "http://127.0.0.1:9/x", body=b"{}", form={"a": "b"})


# ---------------------------------------------------------------------------------------------
# proxies


@needs_openssl
def test_https_proxy_tunnels_and_never_sees_the_token(
    certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = ConnectProxy()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs["loopback"][0]))
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    try:
        with serving(tls=server_context(certs["loopback"])) as server, make_session(2) as t:
            results = [send(url_of(server, "https"), t) for _ in range(3)]
    finally:
        proxy.close()
    assert all(isinstance(r, Accepted) for r in results), results
    assert len(proxy.tunnels) == 1  # one tunnel, reused by the pooled connection
    assert proxy.tunnels[0].startswith(f"CONNECT 127.0.0.1:{server.server_address[1]} ")
    assert TOKEN.encode() not in proxy.relayed  # inside TLS end to end
    assert len(server.requests) == 3


@needs_openssl
def test_no_proxy_bypasses_the_proxy(
    certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = ConnectProxy()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs["loopback"][0]))
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    try:
        with serving(tls=server_context(certs["loopback"])) as server, make_session(2) as t:
            result = send(url_of(server, "https"), t)
    finally:
        proxy.close()
    assert isinstance(result, Accepted)
    assert proxy.tunnels == []


def test_http_origins_never_use_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    with serving() as server, make_session(2) as transport:
        assert isinstance(send(url_of(server), transport), Accepted)


def test_unreachable_proxy_is_a_safe_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    with make_session(2) as transport:
        result = send("https://api.example.invalid", transport)
    assert isinstance(result, Failure)
    assert (result.status, result.kind) == (None, FailureKind.SAFE)


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1:1080", "http://user:pw@[::1"])
def test_unusable_proxy_is_a_config_error_without_its_credentials(
    monkeypatch: pytest.MonkeyPatch, proxy: str
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    with (
        make_session(2) as transport,
        pytest.raises(ClientConfigError, match="HTTPS_PROXY") as info,
    ):
        send("https://api.example.invalid", transport)
    assert "pw" not in str(info.value)


def test_target_with_an_unusable_ca_bundle_exits_1_naming_it(sandbox: Any, tmp_path: Path) -> None:
    record = {"id": "1", "connection_id": CONNECTION, "source_sender_id": "d", "message_text": "hi",
              "source_recipient_ids": ["drv-1"], "mode": "direct"}  # fmt: skip
    missing = tmp_path / "no-such-ca.pem"
    result = run_target(
        tmp_path / "run",
        sandbox_config(sandbox.url),
        singer_lines("messages", [record]),
        env={"REQUESTS_CA_BUNDLE": str(missing)},
    )
    assert result.returncode == 1
    assert "REQUESTS_CA_BUNDLE" in result.stderr
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert sandbox.stats()["requests"].get("messages", 0) == 0
