"""Exactly once under kill -9, SIGTERM/SIGINT and ambiguous sends: real processes, real HTTP.

The target runs as its real CLI (``python -m target_catena_messages``) and the sandbox as a
separate ``catena-sandbox`` process, so killing the target cannot touch what the sandbox saw.
Every record's ``message_text`` carries its key (``[key=N]``), so the sandbox's accepted bodies
(including those whose answer was dropped) can be counted per key: that count is the ground truth
for "lost" and "duplicated". Figures are printed (``pytest -s``) and kept in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import run_target, sandbox_config, singer_lines

STREAM = "tms-dispatch_messages"
CONNECTIONS = ("11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222")
SANDBOX_BIN = Path(sys.executable).with_name("catena-sandbox")
KEY_IN_TEXT = re.compile(r"\[key=([^\]]+)\]")
TOKEN_PATH = "/realms/catena/protocol/openid-connect/token"


# -- the sandbox as its own process --------------------------------------------------------------


class SandboxProcess:
    """``catena-sandbox --config FILE --port 0`` in a subprocess, driven over ``/_sandbox/``."""

    def __init__(self, workdir: Path, config: Mapping[str, Any], *args: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "sandbox.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = workdir / "sandbox.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(SANDBOX_BIN), "--config", str(self.config_path), "--port", "0", *args],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().decode().strip()
        assert self.url.startswith("http://"), self.log_path.read_text()

    def get(self, path: str, timeout: float = 10) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post_json(self, path: str, body: Any, headers: Mapping[str, str] | None = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def token(self, client_id: str = "test-client", secret: str = "direct-secret") -> str:
        form = f"grant_type=client_credentials&client_id={client_id}&client_secret={secret}"
        request = urllib.request.Request(
            self.url + TOKEN_PATH, data=(form + "&scope=organization").encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["access_token"])

    def accepted_bodies(self, timeout: float = 10) -> list[dict[str, Any]]:
        """Every body the sandbox accepted (a soak's million take a while to encode)."""
        return list(self.get("/_sandbox/accepted_bodies", timeout))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextmanager
def sandbox_process(workdir: Path, config: Mapping[str, Any]) -> Iterator[SandboxProcess]:
    box = SandboxProcess(workdir, config)
    try:
        yield box
    finally:
        box.stop()


# -- the target as a process we may kill ---------------------------------------------------------


@dataclass
class TargetProcess:
    """One run of the target CLI whose output goes to files (so a killed run leaves them)."""

    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def states(self) -> list[dict[str, Any]]:
        """Complete STATE lines (a kill may cut the last one short: that one never counted)."""
        text = self.stdout_path.read_text()
        complete = text if text.endswith("\n") else text.rpartition("\n")[0]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def summary(self) -> dict[str, Any] | None:
        for line in self.stderr().splitlines():
            if line.startswith('{"summary":'):
                return dict(json.loads(line)["summary"])
        return None


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def reap_targets() -> Iterator[None]:
    """Kill target processes a failed test left running (they would retry for many minutes)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_target(
    workdir: Path,
    config_path: Path,
    input_path: Path,
    name: str,
    env: Mapping[str, str] | None = None,
) -> TargetProcess:
    out, err = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "target_catena_messages",
                "--config",
                str(config_path),
                "--input",
                str(input_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=workdir,
            env={**os.environ, **(env or {})},
        )
    _STARTED.append(proc)
    return TargetProcess(proc, out, err)


def write_config(workdir: Path, url: str, **settings: Any) -> Path:
    config = sandbox_config(url, **settings)
    config.setdefault("dead_letter_path", str(workdir / "dead-letters.jsonl"))
    config.setdefault("ledger_url", f"sqlite:///{workdir / 'ledger.sqlite'}")
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    return path


# -- input, ledger and ground truth --------------------------------------------------------------


def dispatch_record(i: int, *, lanes: int = 40, invalid: bool = False) -> dict[str, Any]:
    """A TMS row whose message text names its key; ``invalid`` gives it a priority Catena lacks."""
    return {
        "id": i,
        "connection_id": CONNECTIONS[i % 2],
        "source_sender_id": "dispatcher-7",
        "source_recipient_ids": [f"driver-{i % lanes}"],
        "message_text": f"[key={i}] Load {1000 + i}: pick up at dock {i % 9}",
        "priority": "urgent" if invalid else ("high" if i % 3 == 0 else None),
    }


def write_input(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def position(state: Mapping[str, Any], stream: str = STREAM) -> int:
    return int(state["bookmarks"][stream]["replication_key_value"])


def sqlite_ledger(path: Path) -> dict[str, dict[str, Any]]:
    """The ledger rows by key, read independently of the target's code."""
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM catena_message_ledger").fetchall()
    except sqlite3.OperationalError:  # killed before the table was created
        return {}
    finally:
        conn.close()
    return {row["key"]: dict(row) for row in rows}


def unsafe_state_problems(
    states: list[dict[str, Any]], ledger: Mapping[str, Mapping[str, Any]], keys_at: list[str]
) -> list[str]:
    """Every way a STATE line claims more than the ledger holds.

    ``keys_at[p - 1]`` is the key of the record at input position ``p``. A line with bookmark
    ``p`` says every record up to ``p`` is resolved, so each must have an outcome in the ledger,
    and every operation id it reports must be the ledger's.
    """
    problems = []
    for n, state in enumerate(states, 1):
        for key in keys_at[: position(state)]:
            status = ledger.get(key, {}).get("status")
            if status not in ("accepted", "dead_lettered"):
                problems.append(f"state {n} covers key {key} whose ledger status is {status}")
        ours = state["target_catena_messages"]
        for _, key, op in ours["operations"]:
            if ledger.get(key, {}).get("operation_id") != op:
                problems.append(f"state {n} reports operation {op} for {key}, ledger disagrees")
        for _, key, _stage in ours["dead_letters"]:
            if ledger.get(key, {}).get("status") != "dead_lettered":
                problems.append(f"state {n} reports {key} dead-lettered, ledger disagrees")
    return problems


def newest_safe_position(
    ledger: Mapping[str, Mapping[str, Any]], keys_at: list[str], *, every: int
) -> int:
    """The newest tap-state position (a multiple of ``every``) whose records all have outcomes."""
    resolved = 0
    for key in keys_at:
        if ledger.get(key, {}).get("status") not in ("accepted", "dead_lettered"):
            break
        resolved += 1
    return resolved - resolved % every


def read_dead_letters(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key_of(body: Mapping[str, Any]) -> str:
    found = KEY_IN_TEXT.search(str(body.get("message_text", "")))
    return found.group(1) if found else "?"


def copies_by_key(bodies: list[dict[str, Any]]) -> Counter[str]:
    return Counter(_key_of(body) for body in bodies)


@dataclass
class Figures:
    """What a scenario proved, in the fault matrix's columns."""

    scenarios: int = 0
    runs: int = 0
    kills: int = 0
    records: int = 0
    valid: int = 0
    lost: int = 0
    duplicated: int = 0
    ambiguous: int = 0
    ambiguous_delivered: int = 0
    adopted: int = 0
    drops: int = 0
    server_errors: int = 0
    unsafe_states: int = 0
    exit_codes: Counter[int] = field(default_factory=Counter)

    def add(self, other: Figures) -> None:
        for name in self.__dataclass_fields__:
            if name == "exit_codes":
                self.exit_codes.update(other.exit_codes)
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))

    def line(self, label: str) -> str:
        codes = ",".join(f"{c}x{n}" for c, n in sorted(self.exit_codes.items()))
        return (
            f"[{label}] scenarios={self.scenarios} runs={self.runs} kills={self.kills} "
            f"records={self.records} valid={self.valid} lost={self.lost} "
            f"duplicated={self.duplicated} ambiguous={self.ambiguous} "
            f"(delivered once: {self.ambiguous_delivered}) adopted={self.adopted} "
            f"drops={self.drops} 5xx={self.server_errors} unsafe_states={self.unsafe_states} "
            f"exit_codes={codes}"
        )


# -- 1. kill -9 at random moments ----------------------------------------------------------------

CRASH_FAULTS: list[dict[str, Any]] = [
    {"kind": "latency", "ms": 5, "jitter_ms": 25},
    {"kind": "drop", "match": {"probability": 0.02}},
    {"kind": "status", "status": 503, "match": {"probability": 0.03}},
    {"kind": "status", "status": 500, "match": {"probability": 0.02}},
    {"kind": "status", "status": 500, "after_processing": True, "match": {"probability": 0.01}},
]


def kill_at_random_moment(
    run: TargetProcess, sandbox: SandboxProcess, rng: random.Random, remaining: int
) -> bool:
    """Kill -9 ``run`` at a random moment; False when it finished first.

    A quarter of the moments fall in the first seconds (start-up, ledger claims, the lookups of
    recovered keys waiting out the list lag); the rest come right after a random number of this
    run's POSTs, so they land mid-delivery whatever the machine's speed.
    """
    if rng.random() < 0.25:
        posts, extra = 0, rng.uniform(0.4, 2.0)
    else:
        posts, extra = rng.randint(1, max(1, remaining)), rng.uniform(0.0, 0.2)
    base = sandbox.get("/_sandbox/stats")["requests"].get("messages", 0)
    deadline = time.monotonic() + 120
    while run.proc.poll() is None:
        assert time.monotonic() < deadline, "the target neither finished nor got killed"
        if sandbox.get("/_sandbox/stats")["requests"].get("messages", 0) - base >= posts:
            time.sleep(extra)
            if run.proc.poll() is not None:
                return False
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait()
            return True
        time.sleep(0.01)
    return False


def kill9_scenario(workdir: Path, seed: int, *, records: int = 300, max_kills: int = 4) -> Figures:
    """Kill -9 the target at random moments and re-run the same input until a run finishes."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    invalid = {i for i in range(1, records + 1) if i % 97 == 0}
    rows = [dispatch_record(i, invalid=i in invalid) for i in range(1, records + 1)]
    keys_at = [str(r["id"]) for r in rows]
    input_path = write_input(workdir / "input.jsonl", singer_lines(STREAM, rows, state_every=10))
    figures = Figures(scenarios=1, records=records, valid=records - len(invalid))
    sandbox_cfg = {"list_lag_seconds": 0.5, "faults": {"seed": seed, "rules": CRASH_FAULTS}}
    with sandbox_process(workdir / "sandbox", sandbox_cfg) as sandbox:
        config = write_config(
            workdir, sandbox.url, max_concurrency=8, operation_lookup_lag_seconds=1
        )
        while True:
            remaining = figures.valid - len(copies_by_key(sandbox.accepted_bodies()))
            run = start_target(workdir, config, input_path, f"run{figures.runs}")
            figures.runs += 1
            if figures.kills < max_kills and kill_at_random_moment(run, sandbox, rng, remaining):
                figures.kills += 1
                ledger = sqlite_ledger(workdir / "ledger.sqlite")
                problems = unsafe_state_problems(run.states(), ledger, keys_at)
                figures.unsafe_states += len(problems)
                assert not problems, problems
                continue
            code = run.proc.wait(120)
            figures.exit_codes[code] += 1
            assert code in (0, 2), run.stderr()[-3000:]
            break
        summary = run.summary()
        assert summary is not None
        figures.adopted = int(summary["http"].get("operations_adopted", 0))
        stats = sandbox.get("/_sandbox/stats")
        counts = stats["status_counts"]["messages"]
        figures.drops = int(counts.get("drop", 0))
        figures.server_errors = sum(int(n) for s, n in counts.items() if s.startswith("5"))
        copies = copies_by_key(sandbox.accepted_bodies())
        operations = {op["id"]: op for op in sandbox.get("/_sandbox/operations")}

    # the finished run's STATE reaches the tap's last bookmark and is backed by the ledger
    ledger = sqlite_ledger(workdir / "ledger.sqlite")
    assert run.states(), run.stderr()[-3000:]
    assert position(run.states()[-1]) == records
    assert unsafe_state_problems(run.states(), ledger, keys_at) == []
    dead = read_dead_letters(workdir / "dead-letters.jsonl")
    stages = Counter((d["key"], d["stage"]) for d in dead)
    ambiguous = {key for key, stage in stages if stage == "ambiguous"}
    assert {key for key, stage in stages if stage == "validation"} == {str(i) for i in invalid}
    assert all(n == 1 for n in stages.values()), f"a dead letter was written twice: {stages}"
    assert {stage for _, stage in stages} <= {"validation", "ambiguous"}, stages
    figures.ambiguous = len(ambiguous)
    figures.ambiguous_delivered = sum(1 for key in ambiguous if copies[key] == 1)
    for key in keys_at:
        if int(key) in invalid:
            assert copies[key] == 0, f"invalid record {key} was sent"
            continue
        if copies[key] > 1:
            figures.duplicated += 1
        elif copies[key] == 0 and key not in ambiguous:
            figures.lost += 1
        row = ledger.get(key, {})
        if key not in ambiguous:
            # the ledger holds the very operation the sandbox created for this key's body
            op = operations.get(row.get("operation_id") or "")
            assert row.get("status") == "accepted", (key, row)
            assert op is not None, (key, row)
            assert f"[key={key}]" in op["payload"]["message_text"], (key, op)
    return figures


def _kill9_report(figures: Figures, label: str) -> None:
    print("\n" + figures.line(label))
    assert figures.lost == 0, figures
    assert figures.duplicated == 0, figures
    assert figures.unsafe_states == 0, figures


@pytest.mark.parametrize("seed", [11, 23])
def test_kill9_at_random_moments_every_record_exactly_once(tmp_path: Path, seed: int) -> None:
    figures = kill9_scenario(tmp_path, seed, records=300, max_kills=3)
    assert figures.kills >= 1, "no run was killed: the scenario proved nothing"
    _kill9_report(figures, f"kill -9 seed {seed}")


@pytest.mark.slow
def test_kill9_soak_many_seeds(tmp_path: Path) -> None:
    total = Figures()
    for seed in range(101, 109):
        total.add(kill9_scenario(tmp_path / f"seed{seed}", seed, records=300, max_kills=6))
    _kill9_report(total, "kill -9 soak, 8 seeds")
    assert total.kills >= 8, "too few runs were killed: the soak proved little"


# -- 3. ambiguous drops: list lag, normalised payloads, adoption, two candidates ----------------

DISPATCHER = ("aaaaaaaa-0000-4000-8000-000000000001", "dispatcher-7")
DRIVER = ("bbbbbbbb-0000-4000-8000-000000000002", "driver-42")


def catena_ids_sandbox(drop_requests: list[int]) -> dict[str, Any]:
    """catena_ids bodies, seeded users (so stored payloads gain source ids), a lagging list."""
    users = [
        {"id": uid, "source_id": sid, "connection_id": CONNECTIONS[0], "is_driver": driver}
        for (uid, sid), driver in ((DISPATCHER, False), (DRIVER, True))
    ]
    return {
        "message_schema": "catena_ids",
        "list_lag_seconds": 0.5,
        "users": users,
        "faults": {"rules": [{"kind": "drop", "match": {"requests": drop_requests}}]},
    }


def catena_ids_record(i: int, text: str | None = None) -> dict[str, Any]:
    return {
        "id": i,
        "connection_id": CONNECTIONS[0],
        "sender_id": DISPATCHER[0],
        "recipient_id": DRIVER[0],  # one lane: request n is record n
        "message_text": text or f"[key={i}] Trailer {i} is ready at door {i % 7}",
        "priority": None,  # left out of the body: the stored payload has no such key
        "reply_to_message_id": None,
    }


def ambiguous_settings(url: str, workdir: Path) -> dict[str, Any]:
    return {
        **sandbox_config(url),
        "message_schema": "catena_ids",
        "operation_lookup_lag_seconds": 1,
        "dead_letter_path": str(workdir / "dead-letters.jsonl"),
        "ledger_url": f"sqlite:///{workdir / 'ledger.sqlite'}",
    }


def test_dropped_answers_are_adopted_from_the_lagging_list_not_resent(tmp_path: Path) -> None:
    with sandbox_process(tmp_path / "sandbox", catena_ids_sandbox([2, 5])) as sandbox:
        records = [catena_ids_record(i) for i in range(1, 7)]
        result = run_target(
            tmp_path,
            ambiguous_settings(sandbox.url, tmp_path),
            singer_lines(STREAM, records, state_every=6),
        )
        received = sandbox.get("/_sandbox/received")
        operations = sandbox.get("/_sandbox/operations")
    assert result.returncode == 0, result.stderr
    assert result.dead_letters == []
    assert copies_by_key([e["body"] for e in received]) == Counter({str(i): 1 for i in range(1, 7)})
    by_text = {_key_of(e["body"]): e for e in received}
    assert [k for k, e in by_text.items() if e["fault"] == "drop"] == ["2", "5"]
    # Catena stores a normalised payload: nulls gone, source ids added.
    stored = next(op["payload"] for op in operations if "[key=2]" in op["payload"]["message_text"])
    assert stored["source_sender_id"] == "dispatcher-7"
    assert "priority" not in stored
    # STATE and ledger hold the sandbox's operation ids, the dropped requests' included
    by_key = {key: op for _, key, op in result.operations()}
    assert by_key == {k: e["operation_id"] for k, e in by_text.items()}
    ledger = sqlite_ledger(tmp_path / "ledger.sqlite")
    assert {k: row["operation_id"] for k, row in ledger.items()} == by_key
    assert result.summary is not None
    assert result.summary["http"]["operations_adopted"] == 2


def test_identical_body_held_by_another_key_is_not_adopted_twice(tmp_path: Path) -> None:
    """Two keys, one body: the first key's operation is in the ledger, so the second's is unique."""
    text = "Same words for two loads: call dispatch"
    with sandbox_process(tmp_path / "sandbox", catena_ids_sandbox([2])) as sandbox:
        records = [catena_ids_record(1, text), catena_ids_record(2, text)]
        result = run_target(
            tmp_path,
            ambiguous_settings(sandbox.url, tmp_path),
            singer_lines(STREAM, records, state_every=2),
        )
        received = sandbox.get("/_sandbox/received")
    assert result.returncode == 0, result.stderr
    assert len(received) == 2, received
    first, second = received
    assert second["fault"] == "drop"
    ops = {key: op for _, key, op in result.operations()}
    assert ops == {"1": first["operation_id"], "2": second["operation_id"]}


def test_two_matching_operations_make_an_ambiguous_dead_letter_not_a_resend(
    tmp_path: Path,
) -> None:
    with sandbox_process(tmp_path / "sandbox", catena_ids_sandbox([2])) as sandbox:
        records = [catena_ids_record(i) for i in range(1, 4)]
        # The same message was created before the run (by hand, or by a tool outside the ledger).
        body = {k: v for k, v in records[0].items() if k != "id" and v is not None}
        token = sandbox.token()  # request 1 below; the target's first POST is request 2
        sandbox.post_json("/v2/telematics/messages", body, {"Authorization": f"Bearer {token}"})
        lines = singer_lines(STREAM, records, state_every=3)
        result = run_target(tmp_path, ambiguous_settings(sandbox.url, tmp_path), lines)
        copies = copies_by_key(sandbox.accepted_bodies())
        again = run_target(tmp_path, ambiguous_settings(sandbox.url, tmp_path), lines)
        assert again.returncode == 0, again.stderr
        assert copies_by_key(sandbox.accepted_bodies()) == copies  # no third copy, ever
    assert result.returncode == 2, result.stderr
    [dead] = result.dead_letters
    assert (dead["key"], dead["stage"], dead["retryable"]) == ("1", "ambiguous", False)
    assert "2 operations" in dead["errors"][0]["message"]
    assert copies == Counter({"1": 2, "2": 1, "3": 1})  # the manual one and ours: no third
    assert result.last_state is not None
    assert result.last_state["target_catena_messages"]["dead_letters"] == [
        [STREAM, "1", "ambiguous"]
    ]
    ledger = sqlite_ledger(tmp_path / "ledger.sqlite")
    assert (ledger["1"]["status"], ledger["1"]["stage"]) == ("dead_lettered", "ambiguous")


# -- 4. SIGTERM / SIGINT -------------------------------------------------------------------------


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_exits_1_with_safe_state_and_rerun_completes(
    tmp_path: Path, signum: signal.Signals
) -> None:
    records = [dispatch_record(i, lanes=3) for i in range(1, 121)]
    keys_at = [str(r["id"]) for r in records]
    input_path = write_input(tmp_path / "input.jsonl", singer_lines(STREAM, records, state_every=5))
    slow = {"faults": {"rules": [{"kind": "latency", "ms": 40}]}}
    with sandbox_process(tmp_path / "sandbox", slow) as sandbox:
        config = write_config(tmp_path, sandbox.url, max_concurrency=3, batch_size_rows=20)
        run = start_target(tmp_path, config, input_path, "interrupted")
        _wait_for(lambda: len(sandbox.accepted_bodies()) >= 30)
        run.proc.send_signal(signum)
        code = run.proc.wait(60)
        sent_before = copies_by_key(sandbox.accepted_bodies())
        stderr = run.stderr()
        assert code == 1, stderr[-3000:]
        assert signal.Signals(signum).name in stderr
        assert "Traceback" not in stderr
        states = run.states()
        assert states, "no STATE line at all after an interrupt"
        ledger = sqlite_ledger(tmp_path / "ledger.sqlite")
        assert unsafe_state_problems(states, ledger, keys_at) == []
        covered = position(states[-1])
        assert covered == newest_safe_position(ledger, keys_at, every=5)
        assert all(sent_before[k] == 1 for k in keys_at[:covered])
        assert len(sent_before) < len(records), "the interrupt came too late to prove anything"

        rerun = start_target(tmp_path, config, input_path, "rerun")
        assert rerun.proc.wait(120) == 0, rerun.stderr()[-3000:]
        copies = copies_by_key(sandbox.accepted_bodies())
    assert copies == Counter(keys_at)
    assert position(rerun.states()[-1]) == len(records)
    assert read_dead_letters(tmp_path / "dead-letters.jsonl") == []


def test_a_second_signal_during_shutdown_still_ends_cleanly_with_safe_state(
    tmp_path: Path,
) -> None:
    """Impatient Ctrl-C twice, or Meltano's SIGTERM followed by another: same clean ending."""
    records = [dispatch_record(i, lanes=3) for i in range(1, 61)]
    keys_at = [str(r["id"]) for r in records]
    input_path = write_input(tmp_path / "input.jsonl", singer_lines(STREAM, records, state_every=5))
    slow = {"faults": {"rules": [{"kind": "latency", "ms": 300}]}}
    with sandbox_process(tmp_path / "sandbox", slow) as sandbox:
        config = write_config(tmp_path, sandbox.url, max_concurrency=3, batch_size_rows=10)
        run = start_target(tmp_path, config, input_path, "interrupted")
        _wait_for(lambda: len(sandbox.accepted_bodies()) >= 6)
        run.proc.send_signal(signal.SIGINT)
        time.sleep(0.1)  # in-flight requests take 300 ms: the run is shutting down now
        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(60) == 1
    stderr = run.stderr()
    assert "Traceback" not in stderr, stderr[-3000:]
    states = run.states()
    assert states, "no safe STATE after the second signal"
    ledger = sqlite_ledger(tmp_path / "ledger.sqlite")
    assert unsafe_state_problems(states, ledger, keys_at) == []
    assert position(states[-1]) == newest_safe_position(ledger, keys_at, every=5)


def test_sigterm_while_waiting_to_look_up_an_ambiguous_send_keeps_it_recoverable(
    tmp_path: Path,
) -> None:
    """An interrupt during the list-lag wait is not "Catena cannot tell": the next run can."""
    cfg = catena_ids_sandbox([2])
    with sandbox_process(tmp_path / "sandbox", cfg) as sandbox:
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
        assert read_dead_letters(tmp_path / "dead-letters.jsonl") == [], (
            "an interrupted lookup was dead-lettered as ambiguous: the next run can never adopt it"
        )
        config.write_text(json.dumps(settings | {"operation_lookup_lag_seconds": 1}))
        rerun = start_target(tmp_path, config, input_path, "rerun")
        assert rerun.proc.wait(120) == 0, rerun.stderr()[-3000:]
        copies = copies_by_key(sandbox.accepted_bodies())
        received = sandbox.get("/_sandbox/received")
    assert copies == Counter({"1": 1, "2": 1, "3": 1, "4": 1})
    dropped_op = received[1]["operation_id"]
    assert sqlite_ledger(tmp_path / "ledger.sqlite")["2"]["operation_id"] == dropped_op
