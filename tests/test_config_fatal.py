"""Configuration errors end the run (not one dead letter per record), the preflight, and ``fatal``.

The rule (docs/retry.md, "Configuration failures"): refused credentials and a wrong
``api_url``/path/proxy end the run at once with one line naming the URL and the status; the
records they touched are not dead-lettered (their claims are released), so the run after the fix
sends them. The preflight (token, then a size-1 operation-list read) finds most of them before any
input is read. The summary's JSON names why a run ended in ``fatal``.

Real CLI, real HTTP to the sandbox, real SQLite ledgers.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.catena.classify import (
    configuration_problem,
    is_catena_error_body,
    is_configuration_failure,
)
from target_catena_messages.catena.client import CatenaClient, Failure
from target_catena_messages.catena.retry import RetryPolicy
from target_catena_messages.errors import FatalError, FatalKind
from target_catena_messages.pipeline.preflight import preflight
from target_catena_messages.sandbox import Sandbox
from tests.harness import (
    TargetResult,
    run_target,
    sandbox_client,
    sandbox_config,
    singer_lines,
)

CONN = "11111111-1111-4111-8111-111111111111"
STREAM = "public-dispatch_messages"
FAST_PROBES = RetryPolicy(
    max_retries=4, base_seconds=0.01, cap_seconds=0.02, jitter=False, idempotent=True
)


def message(i: int, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": i,
        "connection_id": CONN,
        "source_sender_id": "dispatcher-7",
        "source_recipient_ids": [f"driver-{i % 3}"],
        "message_text": f"Load {1000 + i}: pick up at dock {i % 9}",
    }
    record.update(overrides)
    return record


def faults(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"faults": {"seed": 1, "rules": list(rules)}}


def ledger_rows(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "ledger.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM catena_message_ledger")]


def fatal_lines(result: TargetResult) -> list[str]:
    return [line for line in result.stderr.splitlines() if "fatal:" in line]


def requests_to(sandbox: Sandbox, endpoint: str) -> int:
    return int(sandbox.stats()["requests"].get(endpoint, 0))


# -- the rule, pure ------------------------------------------------------------------------------

CATENA_404 = {"code": 404, "message": "Not Found", "detail": None}
CATENA_422 = {"code": 422, "message": "Invalid Request Body", "detail": []}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (CATENA_404, True),
        ({"message": "Internal Server Error"}, True),
        ({"detail": "Not Found"}, True),
        ({"text": "<html><body>404 Not Found</body></html>"}, False),  # the client's wrapper
        ({"text": ""}, False),  # an empty body
        ({"error": "invalid_token"}, False),  # a gateway's JSON
        (["not", "an", "object"], False),
        (None, False),
    ],
)
def test_catena_error_bodies_are_json_objects_of_catenas_shape(body: Any, expected: bool) -> None:
    assert is_catena_error_body(body) is expected


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, CATENA_404, True),  # after a token refresh (the client retried already)
        (403, CATENA_404, True),
        (404, CATENA_404, True),  # Catena's own 404: no such endpoint is still a wrong path
        (405, CATENA_404, True),
        (404, {"text": "<html>"}, True),
        (307, {"text": ""}, True),  # Catena never redirects
        (400, {"text": "<html>Bad Request</html>"}, True),  # a proxy's page
        (422, {"error": "bad"}, True),  # JSON, but not Catena's shape
        (400, {"code": 400, "message": "Bad Request", "detail": "x"}, False),  # about the body
        (409, {"code": 409, "message": "Conflict", "detail": None}, False),
        (422, CATENA_422, False),
        (429, {"text": "<html>"}, False),  # a rate limit is transient
        (408, {"text": "<html>"}, False),
        (500, {"text": "<html>"}, False),  # may be an outage, never a setting
        (502, {"text": "<html>"}, False),
        (503, None, False),
        (None, None, False),  # no answer
        (202, {"text": ""}, False),  # a create's 2xx without an id is ambiguous
    ],
)
def test_which_refusals_of_a_create_are_configuration_failures(
    status: int | None, body: Any, expected: bool
) -> None:
    assert is_configuration_failure(status, body) is expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, True), (400, True), (422, True), (404, True), (429, False), (500, False), (None, False)],
)
def test_a_probe_answer_below_500_that_is_not_a_page_is_a_configuration_failure(
    status: int | None, expected: bool
) -> None:
    assert is_configuration_failure(status, CATENA_422, read=True) is expected


def test_the_fatal_line_names_method_url_status_and_what_to_check() -> None:
    url = "https://api.example.com/v2/v2/telematics/messages"
    line = configuration_problem("POST", url, 404, when="before any message was accepted")
    assert line.startswith(f"POST {url} answered 404 Not Found before any message was accepted: ")
    assert "must not end in /v2" in line
    assert "credentials" in configuration_problem("POST", url, 401)
    assert "proxy" in configuration_problem("POST", url, 400)
    assert "redirect" in configuration_problem("POST", url, 301)


# -- preflight, as a function against the sandbox -----------------------------------------------


def test_preflight_returns_when_catena_answers_a_page(sandbox: Sandbox) -> None:
    client = sandbox_client(sandbox.url, CatenaClient)
    calls: list[Failure] = []
    preflight(client, connection_id=CONN, on_unavailable=calls.append, stop=threading.Event())
    assert calls == []
    assert requests_to(sandbox, "operations") == 1
    assert sandbox.stats()["token_requests"] == 1


def test_preflight_asks_the_hook_while_catena_is_unavailable_then_goes_on(
    sandbox_factory: Callable[..., Sandbox],
) -> None:
    sandbox = sandbox_factory(
        faults({"kind": "status", "status": 503, "endpoint": "operations", "match": {"times": 2}})
    )
    client = sandbox_client(sandbox.url, CatenaClient)
    calls: list[Failure] = []
    preflight(client, connection_id=None, on_unavailable=calls.append, stop=threading.Event())
    assert [c.status for c in calls] == [503, 503]
    assert requests_to(sandbox, "operations") == 3


def test_preflight_retries_a_rate_limit_without_calling_it_an_outage(
    sandbox_factory: Callable[..., Sandbox],
) -> None:
    sandbox = sandbox_factory(
        faults(
            {
                "kind": "status",
                "status": 429,
                "endpoint": "operations",
                "retry_after_seconds": 0,
                "match": {"times": 1},
            }
        )
    )
    client = sandbox_client(sandbox.url, CatenaClient)
    calls: list[Failure] = []
    preflight(
        client,
        connection_id=None,
        on_unavailable=calls.append,
        stop=threading.Event(),
        policy=FAST_PROBES,
    )
    assert calls == []
    assert requests_to(sandbox, "operations") == 2


def test_a_persistent_500_at_start_is_catena_unavailable(
    sandbox_factory: Callable[..., Sandbox],
) -> None:
    sandbox = sandbox_factory(faults({"kind": "status", "status": 500, "endpoint": "operations"}))
    client = sandbox_client(sandbox.url, CatenaClient)
    with pytest.raises(FatalError) as caught:
        preflight(
            client,
            connection_id=None,
            on_unavailable=lambda f: None,
            stop=threading.Event(),
            policy=FAST_PROBES,
        )
    assert caught.value.kind is FatalKind.CATENA_UNAVAILABLE
    assert requests_to(sandbox, "operations") == 5  # the first probe and max_retries=4


# -- the CLI: preflight --------------------------------------------------------------------------


def test_api_url_ending_in_v2_is_one_fatal_line_and_the_fixed_rerun_sends_everything_once(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    records = [message(i) for i in range(1, 7)]
    lines = singer_lines(STREAM, records, state_every=3)
    wrong = run_target(tmp_path, sandbox_config(sandbox.url, api_url=sandbox.url + "/v2"), lines)

    assert wrong.returncode == 1
    assert "Traceback" not in wrong.stderr
    url = f"{sandbox.url}/v2/v2/integrations/connections/resource-operations"
    assert len(fatal_lines(wrong)) == 1, wrong.stderr
    assert f"fatal: GET {url} answered 404 Not Found" in wrong.stderr
    assert "must not end in /v2" in wrong.stderr
    assert wrong.stdout == ""  # no STATE
    assert wrong.dead_letters == []
    assert ledger_rows(tmp_path) == []
    assert sandbox.received() == []
    assert wrong.summary is not None
    assert wrong.summary["fatal"] == "configuration"
    assert wrong.summary["records"] == 0

    fixed = run_target(tmp_path, sandbox_config(sandbox.url), lines)
    assert fixed.returncode == 0, fixed.stderr
    assert len(sandbox.accepted_bodies()) == 6
    assert fixed.last_state is not None
    assert fixed.last_state["target_catena_messages"]["totals"]["accepted"] == 6
    assert fixed.summary is not None
    assert fixed.summary["fatal"] is None


def _start_target(workdir: Path, config: dict[str, Any]) -> subprocess.Popen[bytes]:
    """The CLI with stdin left open: what it does before input arrives can be watched."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "dead_letter_path": str(workdir / "dead-letters.jsonl"),
        "ledger_url": f"sqlite:///{workdir / 'ledger.sqlite'}",
        **config,
    }
    path = workdir / "config.json"
    path.write_text(json.dumps(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "target_catena_messages", "--config", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
    )


def _summary(stderr: str) -> dict[str, Any]:
    line = next(x for x in stderr.splitlines() if x.startswith('{"summary":'))
    summary: dict[str, Any] = json.loads(line)["summary"]
    return summary


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    """Wait (bounded, not timed) until ``condition`` holds; the target must still be running."""
    deadline = time.monotonic() + 60
    while not condition():
        assert proc.poll() is None, "the target ended early"
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "how",
    ["token endpoint refuses the client", "API refuses a fresh token too"],
)
def test_refused_credentials_end_the_run_before_any_input_is_read(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox], how: str
) -> None:
    if how == "token endpoint refuses the client":
        sandbox = sandbox_factory(
            {"credentials": {"client_id": "test-client", "client_secret": "another-secret-0000"}}
        )
    else:  # every token is revoked before the list read: 401, refresh, 401 again
        sandbox = sandbox_factory(faults({"kind": "revoke_tokens", "endpoint": "operations"}))
    proc = _start_target(tmp_path, sandbox_config(sandbox.url))
    assert proc.stdin is not None
    try:
        # Nothing is written to stdin: the run must end on its own, having read nothing.
        returncode = proc.wait(timeout=120)
    finally:
        proc.kill()
    stdout, stderr = proc.communicate()
    assert returncode == 1
    assert stdout == b""
    text = stderr.decode()
    assert "Traceback" not in text
    assert len([x for x in text.splitlines() if "fatal:" in x]) == 1, text
    assert "401" in text
    if how == "API refuses a fresh token too":
        assert f"GET {sandbox.url}/v2/integrations/connections/resource-operations" in text
        assert requests_to(sandbox, "operations") == 2
    else:
        assert "/realms/catena/protocol/openid-connect/token" in text
        assert requests_to(sandbox, "operations") == 0
    assert sandbox.received() == []
    assert _summary(text)["fatal"] == "configuration"


def test_preflight_is_one_token_and_one_list_read_before_the_first_line_is_read(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    proc = _start_target(tmp_path, sandbox_config(sandbox.url, default_connection_id=CONN))
    assert proc.stdin is not None
    try:
        _wait_for(lambda: requests_to(sandbox, "operations") == 1, proc)
        assert sandbox.stats()["token_requests"] == 1
        assert sandbox.received() == []
        lines = singer_lines(STREAM, [message(i) for i in range(1, 5)], state_every=4)
        stdout, stderr = proc.communicate(("\n".join(lines) + "\n").encode(), timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr.decode()
    assert len(sandbox.accepted_bodies()) == 4
    assert requests_to(sandbox, "operations") == 1  # once, not per batch or stream
    assert sandbox.stats()["token_requests"] == 1  # the preflight's token is reused
    assert _summary(stderr.decode())["fatal"] is None
    assert stdout


def test_a_dry_run_makes_no_preflight(tmp_path: Path, sandbox: Sandbox) -> None:
    result = run_target(
        tmp_path,
        {"dry_run": True, "api_url": sandbox.url},
        singer_lines(STREAM, [message(1)], state_every=1),
    )
    assert result.returncode == 0, result.stderr
    assert sandbox.stats()["requests"] == {}
    assert result.summary is not None
    assert result.summary["fatal"] is None


def test_catena_unavailable_at_start_ends_the_run_after_max_retry_seconds(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    sandbox = sandbox_factory(faults({"kind": "status", "status": 503, "endpoint": "operations"}))
    result = run_target(
        tmp_path,
        sandbox_config(sandbox.url, max_retry_seconds=1),
        singer_lines(STREAM, [message(1)], state_every=1),
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert sandbox.received() == []
    assert ledger_rows(tmp_path) == []
    warnings = [
        x for x in result.stderr.splitlines() if "WARNING" in x and "Catena unavailable since" in x
    ]
    assert len(warnings) == 1, result.stderr
    assert len(fatal_lines(result)) == 1, result.stderr
    assert requests_to(sandbox, "operations") >= 2
    assert result.summary is not None
    assert result.summary["fatal"] == "catena_unavailable"


# -- the CLI: the POST path ------------------------------------------------------------------------


def test_a_404_from_the_post_path_before_any_acceptance_ends_the_run_and_releases_the_claims(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    # The list read works (preflight passes) but POSTs reach no endpoint: the path is wrong.
    sandbox = sandbox_factory(faults({"kind": "status", "status": 404}))
    lines = singer_lines(STREAM, [message(i) for i in range(1, 9)], state_every=4)
    wrong = run_target(tmp_path, sandbox_config(sandbox.url, batch_size_rows=4), lines)

    assert wrong.returncode == 1
    assert "Traceback" not in wrong.stderr
    [line] = fatal_lines(wrong)
    assert (
        f"fatal: POST {sandbox.url}/v2/telematics/messages answered 404 Not Found "
        "before any message was accepted: check api_url"
    ) in line
    assert wrong.dead_letters == []
    assert wrong.stdout == ""  # nothing resolved: no STATE
    assert ledger_rows(tmp_path) == []  # a 404 means nothing was processed: claims released
    assert wrong.summary is not None
    assert wrong.summary["fatal"] == "configuration"
    assert wrong.summary["totals"]["dead_lettered"] == 0

    sandbox.configure({})  # the fix
    fixed = run_target(tmp_path, sandbox_config(sandbox.url, batch_size_rows=4), lines)
    assert fixed.returncode == 0, fixed.stderr
    assert sorted(b["message_text"] for b in sandbox.accepted_bodies()) == sorted(
        message(i)["message_text"] for i in range(1, 9)
    )
    assert "earlier run" not in fixed.stderr.replace("dead-lettered in an earlier run, skipped", "")
    assert fixed.summary is not None
    assert fixed.summary["totals"]["previously_dead_lettered"] == 0


class _HtmlProxy(BaseHTTPRequestHandler):
    """A reverse proxy that forwards reads to the sandbox and answers POSTs with its own page."""

    upstream = ""
    post_status = 405

    def do_GET(self) -> None:
        request = urllib.request.Request(
            self.upstream + self.path, headers={"Authorization": self.headers["Authorization"]}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = answer.read()
            self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        page = b"<html><head><title>Not Allowed</title></head><body>nginx</body></html>"
        self.send_response(self.post_status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def html_proxy(sandbox: Sandbox) -> Iterator[str]:
    handler = type("Proxy", (_HtmlProxy,), {"upstream": sandbox.url})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_proxy_answering_html_on_the_post_path_is_a_configuration_error(
    tmp_path: Path, sandbox: Sandbox, html_proxy: str
) -> None:
    config = sandbox_config(sandbox.url, api_url=html_proxy)
    result = run_target(tmp_path, config, singer_lines(STREAM, [message(1), message(2)]))
    assert result.returncode == 1
    assert len(fatal_lines(result)) == 1, result.stderr
    assert f"fatal: POST {html_proxy}/v2/telematics/messages answered 405" in result.stderr
    assert result.dead_letters == []
    assert ledger_rows(tmp_path) == []
    assert result.summary is not None
    assert result.summary["fatal"] == "configuration"


@pytest.mark.parametrize("status", [400, 405])
def test_a_non_catena_error_page_before_any_acceptance_is_fatal(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox], status: int
) -> None:
    sandbox = sandbox_factory(faults({"kind": "status", "status": status, "non_json": True}))
    result = run_target(
        tmp_path, sandbox_config(sandbox.url), singer_lines(STREAM, [message(1), message(2)])
    )
    assert result.returncode == 1
    assert len(fatal_lines(result)) == 1, result.stderr
    assert f"answered {status} " in fatal_lines(result)[0]
    assert result.dead_letters == []
    assert result.summary is not None
    assert result.summary["fatal"] == "configuration"


def test_after_an_acceptance_a_404_is_one_rejected_message_and_the_run_goes_on(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    sandbox = sandbox_factory(faults({"kind": "status", "status": 404, "match": {"requests": [2]}}))
    records = [message(i) for i in range(1, 6)]
    result = run_target(
        tmp_path,
        sandbox_config(sandbox.url, max_concurrency=1),
        singer_lines(STREAM, records, state_every=5),
    )
    assert result.returncode == 2, result.stderr
    assert fatal_lines(result) == []
    assert [(d["key"], d["stage"], d["status"]) for d in result.dead_letters] == [("2", "api", 404)]
    assert len(sandbox.accepted_bodies()) == 4
    assert result.summary is not None
    assert result.summary["fatal"] is None


def test_a_401_after_a_token_refresh_is_fatal_even_after_an_acceptance(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    # From the second POST on, every token is revoked before the request: 401, refresh, 401.
    sandbox = sandbox_factory(
        faults({"kind": "revoke_tokens", "endpoint": "messages", "match": {"from": 2}})
    )
    records = [message(i) for i in range(1, 6)]
    result = run_target(
        tmp_path,
        sandbox_config(sandbox.url, max_concurrency=1),
        singer_lines(STREAM, records, state_every=1),
    )
    assert result.returncode == 1
    assert len(fatal_lines(result)) == 1, result.stderr
    line = fatal_lines(result)[0]
    assert f"POST {sandbox.url}/v2/telematics/messages answered 401 Unauthorized" in line
    assert "credentials" in line
    assert result.dead_letters == []
    assert len(sandbox.accepted_bodies()) == 1
    assert result.last_state is not None
    assert result.last_state["bookmarks"] == {STREAM: {"replication_key_value": 1}}
    assert result.summary is not None
    assert result.summary["fatal"] == "configuration"


# -- the summary's ``fatal`` for every other ending ----------------------------------------------


def test_fatal_is_input_for_a_malformed_line(tmp_path: Path, sandbox: Sandbox) -> None:
    lines = [*singer_lines(STREAM, [message(1)], state_every=1), '{"type": "RECORD", "str']
    result = run_target(tmp_path, sandbox_config(sandbox.url), lines)
    assert result.returncode == 1
    assert result.summary is not None
    assert result.summary["fatal"] == "input"
    assert len(sandbox.accepted_bodies()) == 1  # what was read before it still went out


def test_fatal_is_invalid_record_for_on_invalid_record_fail(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    lines = singer_lines(STREAM, [message(1), message(2, message_text="")], state_every=1)
    result = run_target(tmp_path, sandbox_config(sandbox.url, on_invalid_record="fail"), lines)
    assert result.returncode == 1
    assert result.summary is not None
    assert result.summary["fatal"] == "invalid_record"


def test_fatal_is_rejections_when_the_breaker_trips(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    # Catena's own 422s (its JSON shape): about the messages, so dead letters until the breaker.
    sandbox = sandbox_factory(faults({"kind": "status", "status": 422}))
    result = run_target(
        tmp_path,
        sandbox_config(sandbox.url, max_consecutive_rejections=3, max_concurrency=1),
        singer_lines(STREAM, [message(i) for i in range(1, 11)], state_every=10),
    )
    assert result.returncode == 1
    assert "max_consecutive_rejections" in result.stderr
    assert result.summary is not None
    assert result.summary["fatal"] == "rejections"
    assert 3 <= len(result.dead_letters) < 10


def test_fatal_is_interrupted_for_sigterm(tmp_path: Path, sandbox: Sandbox) -> None:
    proc = _start_target(tmp_path, sandbox_config(sandbox.url))
    assert proc.stdin is not None
    try:
        proc.stdin.write(("\n".join(singer_lines(STREAM, [message(1)])) + "\n").encode())
        proc.stdin.flush()
        _wait_for(lambda: requests_to(sandbox, "operations") == 1, proc)  # preflight done
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert "SIGTERM" in stderr.decode()
    assert _summary(stderr.decode())["fatal"] == "interrupted"


def test_fatal_is_null_on_success_and_on_dead_letters(tmp_path: Path, sandbox: Sandbox) -> None:
    lines = singer_lines(STREAM, [message(1), message(2, message_text="")], state_every=2)
    result = run_target(tmp_path, sandbox_config(sandbox.url), lines)
    assert result.returncode == 2, result.stderr
    assert result.summary is not None
    assert result.summary["fatal"] is None
    assert "exit code 2 (finished, some records not delivered)" in result.stderr
    assert "ended early" not in result.stderr
