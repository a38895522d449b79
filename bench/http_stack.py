"""CPU per request of each HTTP stack, bare and under the Catena client, against catena-sandbox.

Why it exists: the Catena client moved from requests to urllib3 because requests' per-request
overhead (settings merging, proxy and ``.netrc`` lookups, hooks) was most of the target's CPU per
message. This measures that claim and keeps measuring it: every stack posts the same pre-built
bodies to the same ``catena-sandbox`` process (its own process, 0 ms latency, so the client's CPU
is the whole story) from ``threads`` threads sharing one client object, as the target does.

Stacks (bare loops, one shared object per run):
    requests          requests.Session, pool sized to the threads, max_retries=0
    requests-noenv    the same with trust_env=False (no proxy/netrc lookups)
    u3-poolmanager    urllib3.PoolManager
    u3-pool           urllib3.HTTPConnectionPool (one origin, no URL routing)
    transport         target_catena_messages' HttpTransport (what the client now uses)
Through ``CatenaClient.create_message`` (token provider, auth retry, parsing, classification):
    client-requests   the client on a requests.Session adapter: the code before the move
    client-urllib3    the client on make_session(): the code now

CPU is ``time.process_time()`` of this process around the measured loop (the sandbox's CPU is
not in it); each cell is the median over ``--rounds`` rounds, stacks interleaved per round.

    .venv/bin/python -m bench.http_stack [--requests 3000] [--threads 8 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from bench.procs import TOKEN_PATH, SandboxProcess
from target_catena_messages.catena import (
    Accepted,
    CatenaClient,
    ClientCredentialsTokenProvider,
    Response,
    make_session,
)

MESSAGES_PATH = "/v2/telematics/messages"
CONNECTION = "0b6f5a4e-1c2d-4e3f-8a9b-0c1d2e3f4a5b"

#: A poster sends one body and returns the HTTP status (202 when accepted).
Poster = Callable[[int], int]


def _body(i: int) -> dict[str, Any]:
    return {
        "connection_id": CONNECTION,
        "source_sender_id": "dispatch-1",
        "source_recipient_ids": [f"drv-{i % 500}"],
        "message_text": f"Load {i} is ready at dock {i % 7}",
        "mode": "direct",
    }


class RequestsTransport:
    """The client's transport as it was: a requests.Session configured like the old make_session."""

    def __init__(self, pool_size: int) -> None:
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        for prefix in ("https://", "http://"):
            self.session.mount(prefix, adapter)
        self.session.headers["User-Agent"] = "target-catena-messages"
        self.session.headers["Accept"] = "application/json"

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Any = None,
        body: bytes | None = None,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Response:
        answer = self.session.request(
            method,
            url,
            params=params,
            data=form if form is not None else body,
            headers=dict(headers or {}),
            timeout=timeout,
            allow_redirects=False,
        )
        return Response(answer.status_code, answer.content, answer.headers, answer.reason or "")

    def close(self) -> None:
        self.session.close()


def bare_posters(
    url: str, token: str, threads: int
) -> dict[str, tuple[Poster, Callable[[], None]]]:
    """One poster per bare stack (with its close), all sending pre-encoded bodies."""
    bodies = [json.dumps(_body(i)).encode() for i in range(1000)]
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    target = url + MESSAGES_PATH
    parts = urlsplit(url)
    stacks: dict[str, tuple[Poster, Callable[[], None]]] = {}

    for name, trust_env in (("requests", True), ("requests-noenv", False)):
        session = requests.Session()
        session.trust_env = trust_env
        session.mount("http://", HTTPAdapter(pool_maxsize=threads, max_retries=0))

        def post_requests(i: int, s: requests.Session = session) -> int:
            answer = s.post(
                target, data=bodies[i % 1000], headers=headers, timeout=30, allow_redirects=False
            )
            return answer.status_code

        stacks[name] = (post_requests, session.close)

    manager = urllib3.PoolManager(maxsize=threads, block=True, retries=False)

    def post_manager(i: int) -> int:
        answer = manager.request(
            "POST", target, body=bodies[i % 1000], headers=headers, redirect=False, timeout=30.0
        )
        return answer.status

    stacks["u3-poolmanager"] = (post_manager, manager.clear)
    pool = urllib3.HTTPConnectionPool(
        parts.hostname or "127.0.0.1", parts.port, maxsize=threads, block=True, retries=False
    )

    def post_pool(i: int) -> int:
        answer = pool.urlopen(
            "POST", MESSAGES_PATH, body=bodies[i % 1000], headers=headers, redirect=False,
            timeout=30.0, preload_content=True,
        )  # fmt: skip
        return answer.status

    stacks["u3-pool"] = (post_pool, pool.close)
    transport = make_session(threads)

    def post_transport(i: int) -> int:
        return transport.request("POST", target, body=bodies[i % 1000], headers=headers).status_code

    stacks["transport"] = (post_transport, transport.close)
    return stacks


def client_poster(url: str, threads: int, *, old: bool) -> tuple[Poster, Callable[[], None]]:
    """``CatenaClient.create_message`` over the old (requests) or the new transport."""
    transport: Any = RequestsTransport(threads + 2) if old else make_session(threads + 2)
    tokens = ClientCredentialsTokenProvider(transport, url + TOKEN_PATH, "bench", "bench-secret")
    client = CatenaClient(url, tokens, transport, timeout=30.0)
    bodies = [_body(i) for i in range(1000)]

    def post(i: int) -> int:
        result = client.create_message(bodies[i % 1000])
        return result.status if isinstance(result, Accepted) else -1

    return post, transport.close


def measure(post: Poster, total: int, threads: int) -> dict[str, float]:
    """Send ``total`` requests from ``threads`` threads; wall, CPU and failures of this process."""
    for i in range(threads * 2):  # warm-up: connections, token, caches
        post(i)
    failures: list[int] = []
    barrier = threading.Barrier(threads + 1)

    def work(start: int) -> None:
        barrier.wait()
        for i in range(start, total, threads):
            status = post(i)
            if status != 202:
                failures.append(status)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.join()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"rps": total / wall, "cpu_us": cpu / total * 1e6, "failed": float(len(failures))}


def run(total: int, thread_counts: list[int], rounds: int, only: set[str]) -> list[dict[str, Any]]:
    """Every stack at every thread count, ``rounds`` times; the median of each cell."""
    with tempfile.TemporaryDirectory(prefix="http-stack-") as tmp:
        sandbox = SandboxProcess(Path(tmp))
        try:
            samples: dict[tuple[str, int], list[dict[str, float]]] = {}
            for _ in range(rounds):
                for threads in thread_counts:
                    sandbox.latency(0)
                    stacks = bare_posters(sandbox.url, sandbox.token(), threads)
                    stacks["client-requests"] = client_poster(sandbox.url, threads, old=True)
                    stacks["client-urllib3"] = client_poster(sandbox.url, threads, old=False)
                    for name, (post, close) in stacks.items():
                        if not only or name in only:
                            sandbox.latency(0)  # forget earlier requests: a flat memory profile
                            samples.setdefault((name, threads), []).append(
                                measure(post, total, threads)
                            )
                        close()
        finally:
            sandbox.close()
    rows = []
    for (name, threads), runs in samples.items():
        rows.append(
            {
                "stack": name,
                "threads": threads,
                "requests": total,
                "rps": statistics.median(r["rps"] for r in runs),
                "cpu_us": statistics.median(r["cpu_us"] for r in runs),
                "failed": max(r["failed"] for r in runs),
            }
        )
    return rows


def main() -> int:
    """Measure, print a table (and one JSON line per row with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per stack and round")
    parser.add_argument("--threads", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=[], help="stack names to run (default all)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per row")
    args = parser.parse_args()
    rows = run(args.requests, args.threads, args.rounds, set(args.only))
    print(f"{'stack':<16} {'threads':>7} {'req/s':>8} {'CPU us/req':>11} {'failed':>6}")
    for row in sorted(rows, key=lambda r: (r["threads"], -r["cpu_us"])):
        print(
            f"{row['stack']:<16} {row['threads']:>7} {row['rps']:>8.0f} "
            f"{row['cpu_us']:>11.0f} {row['failed']:>6.0f}"
        )
        if args.json:
            print(json.dumps(row))
    return 1 if any(row["failed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
