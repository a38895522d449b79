"""How many create-message requests per second the sandbox answers, and what latency adds.

Runs ``catena-sandbox`` as a subprocess on loopback (so the client threads here do not share a GIL
with the server), then drives POST /v2/telematics/messages with plain ``requests.Session`` loops:
one client, then 8/16/32 concurrent threads, then one client with a 50 ms latency rule. Every loop
is bounded in time and count; the server is stopped at the end.

Those clients saturate first (~1,000 requests/s from one Python process), so the sandbox idles
between requests and pays a wake-up per request. The last row is the sandbox under the heaviest
load the bench puts on it: bench/aio_client.py (8 aiohttp tasks, its own process, P3's fastest
baseline) posting ``--aio-requests`` bodies; there its CPU per request is the figure that bounds
its ceiling (see the ``cap`` rows of ``python -m bench``).

    .venv/bin/python bench/sandbox_capacity.py [--seconds 3] [--threads 8 16 32] [--aio-requests N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import requests

if __package__ in (None, ""):  # run as a file: make the ``bench`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bare_client import token

ROOT = Path(__file__).resolve().parent.parent
CONNECTION = str(uuid.uuid4())
MAX_REQUESTS_PER_CLIENT = 200_000


def start_server() -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "target_catena_messages.sandbox", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def client(url: str, bearer: str, until: float, limit: int, latencies: list[float]) -> None:
    session = requests.Session()
    headers = {"Authorization": f"Bearer {bearer}"}
    body = {"connection_id": CONNECTION, "source_recipient_ids": ["d1"], "message_text": "x"}
    for _ in range(limit):
        started = time.perf_counter()
        if started >= until:
            break
        answer = session.post(f"{url}/v2/telematics/messages", json=body, headers=headers)
        if answer.status_code != 202:
            raise RuntimeError(f"unexpected {answer.status_code}: {answer.text[:200]}")
        latencies.append(time.perf_counter() - started)


def run(url: str, bearer: str, threads: int, seconds: float, limit: int) -> dict[str, float]:
    until = time.perf_counter() + seconds
    per_thread: list[list[float]] = [[] for _ in range(threads)]
    workers = [
        threading.Thread(target=client, args=(url, bearer, until, limit, per_thread[i]))
        for i in range(threads)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    latencies = sorted(x for chunk in per_thread for x in chunk)
    return {
        "requests": len(latencies),
        "per_second": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process (Linux /proc), to show how much of a core the server used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(
    pid: int, url: str, bearer: str, threads: int, seconds: float, limit: int
) -> dict[str, float]:
    before = cpu_seconds(pid)
    result = run(url, bearer, threads, seconds, limit)
    result["server_cpu_ms"] = 1000 * (cpu_seconds(pid) - before) / result["requests"]
    return result


def aio_measured(pid: int, url: str, requests_count: int, concurrency: int) -> dict[str, float]:
    """The aiohttp client posting ``requests_count`` bodies: rate and sandbox CPU per request."""
    body = {"connection_id": CONNECTION, "source_recipient_ids": ["d1"], "message_text": "x"}
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "bodies.json"
        path.write_text(json.dumps([body] * requests_count), encoding="utf-8")
        cmd = [sys.executable, str(ROOT / "bench" / "aio_client.py"), "--url", url]
        cmd += ["--bodies", str(path), "--concurrency", str(concurrency)]
        before = cpu_seconds(pid)
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=60 + requests_count / 200)
        elapsed = time.perf_counter() - started  # includes the client's startup: a lower bound
        cpu = cpu_seconds(pid) - before
    return {
        "requests": requests_count,
        "per_second": requests_count / elapsed,
        "server_cpu_ms": 1000 * cpu / requests_count,
    }


def show(name: str, result: dict[str, float]) -> None:
    latency = (
        f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms"
        if "p50_ms" in result
        else f"{'':31}"
    )
    print(
        f"{name:<26} {result['requests']:>6.0f} req {result['per_second']:>7.1f} req/s  "
        f"{latency}  server CPU {result['server_cpu_ms']:.3f} ms/req "
        f"(= {1000 / result['server_cpu_ms']:,.0f} req per CPU-s)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each run")
    parser.add_argument("--threads", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--aio-requests", type=int, default=10_000, help="last row's size")
    args = parser.parse_args()
    proc, url = start_server()
    try:
        bearer = token(url)
        run(url, bearer, 1, 0.5, 1000)  # warm-up
        pid, most = proc.pid, MAX_REQUESTS_PER_CLIENT
        show("1 client, 0 ms", measured(pid, url, bearer, 1, args.seconds, most))
        for threads in args.threads:
            show(
                f"{threads} threads, 0 ms", measured(pid, url, bearer, threads, args.seconds, most)
            )
        plan: dict[str, Any] = {"faults": {"rules": [{"kind": "latency", "ms": 50}]}}
        requests.post(f"{url}/_sandbox/config", json=plan).raise_for_status()
        show("1 client, 50 ms latency", measured(pid, url, bearer, 1, args.seconds, 100))
        requests.post(f"{url}/_sandbox/config", json={}).raise_for_status()
        requests.post(f"{url}/_sandbox/reset").raise_for_status()
        show("aiohttp client, 8 tasks", aio_measured(pid, url, args.aio_requests, 8))
        stats = requests.get(f"{url}/_sandbox/stats").json()
        print(
            f"sandbox: {stats['operations']} operations, peak in flight {stats['peak_in_flight']}"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
