"""The P2/P3 baseline: the least a Python process can do to post the same bodies as concurrently.

``concurrency`` threads, each with its own connection (no pool lock to share), post pre-built
bodies as JSON bytes and check for 202. No ledger, no STATE, no retries, no lanes: the HTTP stack
alone, either ``urllib3`` (the target's transport) or ``requests`` (a ``requests.Session`` per
thread, the stack the target used before). The bench runs it as its own process and reads its CPU
time from the kernel, exactly as it does for the target.

    .venv/bin/python bench/bare_client.py --url URL --bodies FILE.json --concurrency 8 \
        [--stack urllib3|requests]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

import requests
import urllib3

TOKEN_PATH = "/realms/catena/protocol/openid-connect/token"
MESSAGES_PATH = "/v2/telematics/messages"


def token(url: str) -> str:
    """A bearer token from the sandbox (the bench's own client credentials)."""
    form = {
        "grant_type": "client_credentials",
        "client_id": "bench",
        "client_secret": "bench",
        "scope": "organization",
    }
    answer = requests.post(f"{url}{TOKEN_PATH}", data=form, timeout=30)
    answer.raise_for_status()
    return str(answer.json()["access_token"])


def _headers(token: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }


def _post_requests(url: str, token: str, bodies: list[bytes], failures: list[int]) -> None:
    session = requests.Session()
    headers = _headers(token)
    for data in bodies:
        answer = session.post(f"{url}{MESSAGES_PATH}", data=data, headers=headers, timeout=30)
        answer.json()
        if answer.status_code != 202:
            failures.append(answer.status_code)
    session.close()


def _post_urllib3(url: str, token: str, bodies: list[bytes], failures: list[int]) -> None:
    pool = urllib3.PoolManager(maxsize=1, retries=False, timeout=30.0)
    headers = _headers(token)
    for data in bodies:
        answer = pool.request("POST", f"{url}{MESSAGES_PATH}", body=data, headers=headers)
        json.loads(answer.data)
        if answer.status != 202:
            failures.append(answer.status)
    pool.clear()


def post(url: str, bodies: list[Any], concurrency: int, stack: str) -> dict[str, int]:
    """Post every body once, spread round-robin over ``concurrency`` threads."""
    bearer = token(url)
    encoded = [json.dumps(body).encode() for body in bodies]
    failures: list[int] = []
    worker = _post_urllib3 if stack == "urllib3" else _post_requests
    threads = [
        threading.Thread(target=worker, args=(url, bearer, encoded[i::concurrency], failures))
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"sent": len(encoded), "failed": len(failures)}


def main() -> int:
    """Post, print one JSON line with the counts, exit 1 when any post failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", type=Path, required=True, help="a JSON array of bodies")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stack", choices=["urllib3", "requests"], default="urllib3")
    args = parser.parse_args()
    bodies = json.loads(args.bodies.read_text(encoding="utf-8"))
    result = post(args.url, bodies, args.concurrency, args.stack)
    sys.stdout.write(json.dumps(result) + "\n")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
