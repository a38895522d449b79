"""The P2 alternative-stack baseline: the same bodies posted by aiohttp tasks instead of threads.

Issue 9 asks, where requests cannot reach P2's goal, for an alternative measured on the same
sandbox: ``concurrency`` asyncio tasks on one ``aiohttp.ClientSession`` (one event loop, no
threads, no GIL hand-offs) post the pre-built bodies and check for 202. Run as its own process,
exactly like bare_client.py.

    .venv/bin/python bench/aio_client.py --url URL --bodies FILE.json --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

TOKEN_PATH = "/realms/catena/protocol/openid-connect/token"
MESSAGES_PATH = "/v2/telematics/messages"


async def _token(session: aiohttp.ClientSession, url: str) -> str:
    form = {
        "grant_type": "client_credentials",
        "client_id": "bench",
        "client_secret": "bench",
        "scope": "organization",
    }
    async with session.post(f"{url}{TOKEN_PATH}", data=form) as answer:
        answer.raise_for_status()
        return str((await answer.json())["access_token"])


async def _post_all(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], bodies: list[bytes]
) -> int:
    failed = 0
    for data in bodies:
        async with session.post(f"{url}{MESSAGES_PATH}", data=data, headers=headers) as answer:
            await answer.json()
            failed += answer.status != 202
    return failed


async def post(url: str, bodies: list[Any], concurrency: int) -> dict[str, int]:
    """Post every body once, spread round-robin over ``concurrency`` tasks."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        token = await _token(session, url)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        encoded = [json.dumps(body).encode() for body in bodies]
        tasks = [
            _post_all(session, url, headers, encoded[i::concurrency]) for i in range(concurrency)
        ]
        failed = sum(await asyncio.gather(*tasks))
    return {"sent": len(bodies), "failed": failed}


def main() -> int:
    """Post, print one JSON line with the counts, exit 1 when any post failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", type=Path, required=True, help="a JSON array of bodies")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    bodies = json.loads(args.bodies.read_text(encoding="utf-8"))
    result = asyncio.run(post(args.url, bodies, args.concurrency))
    sys.stdout.write(json.dumps(result) + "\n")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
