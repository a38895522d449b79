"""No secret leaks: not in logs at DEBUG, not in files, not through a redirect, not over plain http.

The main test runs a deliberately faulty delivery at debug level (revoked and short-lived tokens,
401s, 500s, non-JSON 503s, rejections, a failing token endpoint), then a run with a wrong secret
and one with a static token, and searches everything they wrote — stdout, stderr, the dead
letters, the SQLite ledger and its -wal/-shm while they exist — for the client secrets and every
token the sandbox issued. The other tests prove the doors are shut: http:// to a non-loopback
host, 307 redirects, and the sandbox's own bind address.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.sandbox.server import Sandbox
from tests.harness import run_target, sandbox_config, singer_lines
from tests.test_crash import (
    STREAM,
    SandboxProcess,
    TargetProcess,
    dispatch_record,
    reap_targets,  # noqa: F401 - autouse: kills leftover targets
    sandbox_process,
    start_target,
    write_input,
)

CLIENT_ID = "fleet-ops-client"
SECRET = "cs-9f2Q7xLmZ0pRt4Vw8YbN3kJd6HsA1eUo"
WRONG_SECRET = "cs-wrong-4Ft8Kq2Lz9Xc7Vb5Nm3Pw1Rt6Yh0Ju"
DEBUG_ENV = {"TARGET_CATENA_MESSAGES_LOGLEVEL": "DEBUG", "LOGLEVEL": "DEBUG"}

FAULTY = {
    "credentials": [{"client_id": CLIENT_ID, "client_secret": SECRET}],
    "token_lifetime_seconds": 3,  # several tokens per run, refreshed before expiry
    "list_lag_seconds": 0.2,
    "faults": {
        "seed": 7,
        "rules": [
            {"kind": "latency", "ms": 5, "jitter_ms": 10, "endpoint": "any"},
            # Revocations make the 401s (and refreshes). No injected 401s besides: one landing on
            # the resend after a refresh is a 401 with the newest token, which ends the run.
            {"kind": "revoke_tokens", "match": {"every": 25}},
            {"kind": "status", "status": 500, "match": {"probability": 0.04}},
            {"kind": "status", "status": 503, "non_json": True, "match": {"probability": 0.04}},
            {"kind": "status", "status": 400, "match": {"requests": [11, 12]}},
            {"kind": "status", "status": 500, "endpoint": "token", "match": {"requests": [2]}},
            {"kind": "latency", "ms": 150, "endpoint": "token"},
        ],
    },
}


class FileSweeper:
    """Every version of every file under ``root`` while a process runs (WAL files come and go)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data: dict[Path, bytes] = {}
        self.modes: dict[Path, set[int]] = {}

    def sweep(self) -> None:
        for path in self.root.rglob("*"):
            try:
                if path.is_file():
                    self.data[path] = self.data.get(path, b"") + path.read_bytes()
                    self.modes.setdefault(path, set()).add(stat.S_IMODE(path.stat().st_mode))
            except OSError:
                pass  # gone between listing and reading

    def follow(self, proc: TargetProcess, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while proc.proc.poll() is None:
            assert time.monotonic() < deadline, "the target did not finish"
            self.sweep()
            time.sleep(0.05)
        self.sweep()
        return int(proc.proc.returncode)


def faulty_records(n: int) -> list[dict[str, Any]]:
    return [dispatch_record(i, invalid=i % 40 == 0) for i in range(1, n + 1)]


def start_private(
    workdir: Path, config: dict[str, Any], lines: list[str], name: str
) -> TargetProcess:
    """The target with umask 000: files it creates must be 0600 by its own doing."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "dead_letter_path": str(workdir / "out" / "dead-letters.jsonl"),
        "ledger_url": f"sqlite:///{workdir / 'out' / 'ledger.sqlite'}",
        **config,
    }
    config_path = workdir / "config.json"  # written by the test, holds the secret: not searched
    config_path.write_text(json.dumps(config))
    input_path = write_input(workdir / "input.jsonl", lines)
    (workdir / "out").mkdir()
    old = os.umask(0)
    try:
        return start_target(workdir / "out", config_path, input_path, name, env=DEBUG_ENV)
    finally:
        os.umask(old)


def test_faulty_debug_runs_leak_no_secret_and_no_token_anywhere(tmp_path: Path) -> None:
    lines = singer_lines(STREAM, faulty_records(150), state_every=10)
    sweeper = FileSweeper(tmp_path)
    with sandbox_process(tmp_path / "sandbox", FAULTY) as sandbox:
        base = {**sandbox_config(sandbox.url), "client_id": CLIENT_ID, "client_secret": SECRET}
        base |= {"max_concurrency": 6, "operation_lookup_lag_seconds": 0.5}
        run = start_private(tmp_path / "faulty", base, lines, "faulty")
        assert sweeper.follow(run) == 2, run.stderr()[-3000:]
        assert "DEBUG" in run.stderr()  # the level really was debug

        wrong_cfg = base | {"client_secret": WRONG_SECRET}
        wrong = start_private(tmp_path / "wrong", wrong_cfg, lines[:12], "wrong")
        assert sweeper.follow(wrong) == 1
        assert "refused" in wrong.stderr()

        # a static token cannot be refreshed: without the revoking faults, it must just work
        sandbox.post_json("/_sandbox/config", {"credentials": FAULTY["credentials"]})
        static = sandbox.token(CLIENT_ID, SECRET)
        static_cfg = {k: v for k, v in base.items() if k != "client_secret"}
        static_cfg["access_token"] = static
        static_run = start_private(tmp_path / "static", static_cfg, lines[:5], "static")
        assert sweeper.follow(static_run) == 0, static_run.stderr()[-3000:]
        stats = sandbox.get("/_sandbox/stats")

    tokens = stats["tokens_issued"]
    assert len(tokens) >= 4, "the run should have needed several tokens"
    assert stats["status_counts"]["messages"].get("401", 0) >= 3
    needles = {"client secret": SECRET, "wrong secret": WRONG_SECRET}
    for n, token in enumerate(tokens):
        needles[f"token {n}"] = token
        needles[f"token {n} signature"] = token.rsplit(".", 1)[1]
    written = {p: d for p, d in sweeper.data.items() if "out" in p.relative_to(tmp_path).parts}
    names = {p.name for p in written}
    assert {"dead-letters.jsonl", "ledger.sqlite", "faulty.stdout", "faulty.stderr"} <= names
    assert "ledger.sqlite-wal" in names, "never saw the WAL while running"
    leaks = [
        f"{what} in {path.relative_to(tmp_path)}"
        for path, data in written.items()
        for what, needle in needles.items()
        if needle.encode() in data
    ]
    assert leaks == []
    # the files holding records and keys are private even under umask 000
    private = {
        str(p.relative_to(tmp_path)): sorted(oct(m) for m in modes)
        for p, modes in sweeper.modes.items()
        if p.name.startswith(("dead-letters", "ledger.sqlite"))
    }
    assert private
    assert all(modes == ["0o600"] for modes in private.values()), private


def test_plain_http_to_a_non_loopback_host_is_refused_before_connecting(tmp_path: Path) -> None:
    address = _non_loopback_address()
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        for name in ("api_url", "auth_url"):
            for url in (
                f"http://{address}:{port}",
                f"http://localhost.{address}.nip.io:{port}",
                "http://catena.example.com",
            ):
                config = sandbox_config(f"http://127.0.0.1:{port}") | {name: url}
                result = run_target(
                    tmp_path / name, config, singer_lines(STREAM, [dispatch_record(1)])
                )
                assert result.returncode == 1, result.stderr[-2000:]
                assert name in result.stderr
                assert "loopback" in result.stderr
                assert "Traceback" not in result.stderr
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()


def test_plain_http_to_localhost_is_allowed(tmp_path: Path, sandbox: Sandbox) -> None:
    url = sandbox.url.replace("127.0.0.1", "localhost")
    result = run_target(
        tmp_path, sandbox_config(url), singer_lines(STREAM, [dispatch_record(1)], state_every=1)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(sandbox.accepted_bodies()) == 1


class _Catcher(BaseHTTPRequestHandler):
    """Records any request: a redirect that was followed would land here."""

    hits: list[tuple[str, str, str]]

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode(errors="replace")
        self.hits.append((self.path, self.headers.get("Authorization", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"access_token": "caught", "expires_in": 60, "id": "caught"}')

    do_GET = do_POST = _record

    def log_message(self, *args: Any) -> None:
        pass


class _Redirector(BaseHTTPRequestHandler):
    """Answers everything with a 307 to the catcher, keeping the path (what a hijack would do)."""

    target: str

    def _redirect(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(307)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _redirect

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def redirect_pair() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    hits: list[tuple[str, str, str]] = []
    catcher = ThreadingHTTPServer(("127.0.0.1", 0), type("C", (_Catcher,), {"hits": hits}))
    catcher_url = f"http://127.0.0.1:{catcher.server_address[1]}"
    redirector = ThreadingHTTPServer(
        ("127.0.0.1", 0), type("R", (_Redirector,), {"target": catcher_url})
    )
    servers = [catcher, redirector]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield f"http://127.0.0.1:{redirector.server_address[1]}", hits
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_a_307_from_the_token_endpoint_does_not_carry_the_secret_away(tmp_path: Path) -> None:
    with redirect_pair() as (redirector, hits):
        config = sandbox_config(redirector) | {"client_secret": SECRET}
        result = run_target(
            tmp_path, config, singer_lines(STREAM, [dispatch_record(1)]), env=DEBUG_ENV
        )
    assert result.returncode == 1, result.stderr[-2000:]
    assert hits == []
    assert "307" in result.stderr
    assert SECRET not in result.stderr


def test_a_307_from_the_api_does_not_carry_the_token_away(tmp_path: Path, sandbox: Sandbox) -> None:
    with redirect_pair() as (redirector, hits):
        config = sandbox_config(sandbox.url) | {"api_url": redirector}
        result = run_target(
            tmp_path,
            config,
            singer_lines(STREAM, [dispatch_record(i) for i in (1, 2)], state_every=2),
            env=DEBUG_ENV,
        )
    assert hits == []
    # A redirect means a wrong api_url: the preflight ends the run before input is read.
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"fatal: GET {redirector}/v2/integrations/" in result.stderr
    assert "answered 307 Temporary Redirect" in result.stderr
    assert result.dead_letters == []
    [token] = sandbox.stats()["tokens_issued"]
    assert token not in result.stderr
    assert token not in json.dumps(result.dead_letters)


def test_the_sandbox_binds_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    assert Sandbox().host == "127.0.0.1"
    box = SandboxProcess(tmp_path, {})
    try:
        assert box.url.startswith("http://127.0.0.1:")
        port = int(box.url.rsplit(":", 1)[1])
        assert box.get("/_sandbox/stats")["requests"] == {}
        with pytest.raises(OSError):
            socket.create_connection((_non_loopback_address(), port), timeout=2).close()
    finally:
        box.stop()


def _non_loopback_address() -> str:
    """An address of this machine that is not loopback (skip where there is none)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        address = str(probe.getsockname()[0])
    except OSError:
        address = ""
    finally:
        probe.close()
    if not address or address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    return address


def test_debug_log_grows_with_the_records_not_their_square(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    records = [dispatch_record(i) for i in range(1, 301)]
    result = run_target(
        tmp_path,
        sandbox_config(sandbox.url),
        singer_lines(STREAM, records, state_every=300),
        env=DEBUG_ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stderr) < 3_000_000, f"{len(result.stderr):,} bytes of DEBUG log"
