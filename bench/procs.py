"""Processes the bench measures: a child's wall time, CPU time and peak RSS; the sandbox server.

Every measured program runs as its own process so nothing shares a GIL with it, and its cost comes
from the kernel (``wait4`` rusage: user + system CPU, ``ru_maxrss`` = peak RSS) rather than from
the program reporting on itself. The sandbox is ``catena-sandbox`` in its own process too, driven
over its ``/_sandbox/`` endpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
TOKEN_PATH = "/realms/catena/protocol/openid-connect/token"


@dataclass(frozen=True)
class ChildRun:
    """What one finished child cost, as the kernel counted it."""

    returncode: int
    wall: float
    cpu: float
    peak_rss_mb: float
    stderr: str
    timed_out: bool = False

    def summary(self) -> dict[str, Any]:
        """The target's final ``{"summary": ...}`` line from stderr (empty when there is none)."""
        for line in reversed(self.stderr.splitlines()):
            if line.startswith('{"summary":'):
                value: dict[str, Any] = json.loads(line)["summary"]
                return value
        return {}

    def check(self, what: str) -> ChildRun:
        """Raise with the end of stderr when the child failed: a failed run measures nothing."""
        if self.timed_out or self.returncode != 0:
            lines = self.stderr.splitlines()
            progress = [line for line in lines if "progress:" in line][-2:]
            tail = "\n".join(progress + lines[-8:])
            how = "timed out (stopped)" if self.timed_out else f"exited {self.returncode}"
            raise RuntimeError(f"{what} {how} after {self.wall:.0f} s:\n{tail}")
        return self


def run_child(
    cmd: list[str], *, workdir: Path, timeout: float, stdin: Path | None = None
) -> ChildRun:
    """Run ``cmd`` in ``workdir``; stdout and stderr go to files there (stdout is Singer STATE).

    ``os.wait4`` instead of ``Popen.wait`` because only it returns the child's own rusage. It
    blocks (no polling to blur the wall time); a timer stops a child that outlives ``timeout``,
    so a hung program fails its row instead of hanging the bench.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    err_path = workdir / "stderr.txt"
    with (
        (stdin or Path(os.devnull)).open("rb") as source,
        (workdir / "stdout.txt").open("wb") as out,
        err_path.open("wb") as err,
    ):
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=source, stdout=out, stderr=err, cwd=workdir)
        watchdog = _Watchdog(proc.pid, timeout)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        wall = time.perf_counter() - started
        watchdog.done()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(
        returncode=proc.returncode,
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
        stderr=err_path.read_text(encoding="utf-8", errors="replace"),
        timed_out=watchdog.fired,
    )


class _Watchdog:
    """Stops a child that outlives its timeout: SIGTERM (the target writes its safe STATE), then
    SIGKILL. Signals go out only while the child is unreaped, so its pid cannot have been reused.
    """

    def __init__(self, pid: int, timeout: float) -> None:
        self._pid = pid
        self._lock = threading.Lock()
        self._reaped = False
        self._ended = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._watch, args=(timeout,), daemon=True)
        self._thread.start()

    def _signal(self, signum: int) -> None:
        with self._lock:
            if not self._reaped:
                self.fired = True
                os.kill(self._pid, signum)

    def _watch(self, timeout: float) -> None:
        if self._ended.wait(timeout):
            return
        self._signal(signal.SIGTERM)
        if not self._ended.wait(15):
            self._signal(signal.SIGKILL)

    def done(self) -> None:
        """The child has exited: from now on it may be reaped, so never signal it again."""
        with self._lock:
            self._reaped = True
        self._ended.set()
        self._thread.join()


def target_cmd(config: Path, input_path: Path) -> list[str]:
    """The real CLI, as Meltano runs it, reading ``input_path``."""
    return [
        sys.executable,
        "-m",
        "target_catena_messages",
        "--config",
        str(config),
        "--input",
        str(input_path),
    ]


def write_config(workdir: Path, settings: dict[str, Any]) -> Path:
    """A target config file in ``workdir`` with its ledger and dead letters kept there too."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "ledger_url": f"sqlite:///{workdir / 'ledger.sqlite'}",
        "dead_letter_path": str(workdir / "dead-letters.jsonl"),
        **settings,
    }
    path = workdir / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def parse_at(value: str) -> float:
    """Seconds since the epoch of a sandbox ``at`` timestamp (ISO 8601 with ``Z``)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class SandboxProcess:
    """``catena-sandbox`` in its own process, reconfigured and reset between measurements."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "sandbox.json"
        config.write_text(json.dumps({"message_schema": "source_ids"}), encoding="utf-8")
        script = Path(sys.executable).with_name("catena-sandbox")
        cmd = (
            [str(script)]
            if script.exists()
            else [sys.executable, "-m", "target_catena_messages.sandbox"]
        )
        cmd += ["--config", str(config), "--port", "0", "--log-level", "WARNING"]
        self._stderr = (workdir / "sandbox-stderr.txt").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.close()
            raise RuntimeError(f"catena-sandbox did not start (see {workdir})")
        self.http = requests.Session()

    def configure(self, **config: Any) -> None:
        """Replace the sandbox config (``source_ids`` body unless told) and forget all requests."""
        body = {"message_schema": "source_ids", **config}
        self.http.post(f"{self.url}/_sandbox/config", json=body, timeout=30).raise_for_status()
        self.http.post(f"{self.url}/_sandbox/reset", timeout=30).raise_for_status()

    def latency(self, ms: float, **config: Any) -> None:
        """Every create-message request answers after ``ms`` milliseconds."""
        rules = [{"kind": "latency", "ms": ms}] if ms else []
        self.configure(faults={"rules": rules}, **config)

    def received(self) -> list[dict[str, Any]]:
        """Every create-message request since the last reset, in arrival order."""
        answer = self.http.get(f"{self.url}/_sandbox/received", timeout=120)
        answer.raise_for_status()
        value: list[dict[str, Any]] = answer.json()
        return value

    def token(self) -> str:
        """A bearer token for clients that are not the target."""
        form = {
            "grant_type": "client_credentials",
            "client_id": "bench",
            "client_secret": "bench",
            "scope": "organization",
        }
        answer = self.http.post(f"{self.url}{TOKEN_PATH}", data=form, timeout=30)
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    def target_settings(self, **extra: Any) -> dict[str, Any]:
        """Target settings pointing at this sandbox."""
        return {
            "api_url": self.url,
            "auth_url": f"{self.url}{TOKEN_PATH}",
            "client_id": "bench",
            "client_secret": "bench-secret-not-real",
            **extra,
        }

    def cpu_seconds(self) -> float:
        """The sandbox process's CPU time so far (user + system), from /proc."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        """SIGTERM and wait: the sandbox stops cleanly on it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        self.http.close()
