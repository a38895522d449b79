"""The two 429 shapes the throttle is tested against, as the sandbox serves them over HTTP.

A storm is ``from`` + ``times``: N consecutive requests refused with a retry-after, then none. A
rate-free 429 is ``every``: one request in N refused, whether they come in a burst or slowly.
The existing match conditions express both, so these tests pin that they do, end to end.
"""

from __future__ import annotations

import time
from typing import Any

import requests

TOKEN_PATH = "/realms/catena/protocol/openid-connect/token"
BODY = {
    "connection_id": "0b6f1b7e-3a51-4c1e-9d61-1f0c2b7a9e01",
    "source_recipient_ids": ["drv-7"],
    "message_text": "Load 42",
}


def statuses(url: str, count: int, gap: float = 0.0) -> list[tuple[int, Any]]:
    """POST ``count`` messages one after another: (status, retry_after_seconds or None)."""
    with requests.Session() as http:
        form = {
            "grant_type": "client_credentials",
            "client_id": "cid",
            "client_secret": "s3cret-value",
            "scope": "organization",
        }
        token = http.post(url + TOKEN_PATH, data=form, timeout=5).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        seen = []
        for _ in range(count):
            answer = http.post(
                url + "/v2/telematics/messages", json=BODY, headers=headers, timeout=5
            )
            wait = None
            if answer.status_code == 429:
                wait = answer.json().get("detail", {}).get("retry_after_seconds")
            seen.append((answer.status_code, wait))
            time.sleep(gap)
        return seen


def storm_rule(start: int, count: int) -> dict[str, Any]:
    return {
        "kind": "status",
        "status": 429,
        "retry_after_seconds": 1,
        "match": {"from": start, "times": count},
    }


def test_a_storm_is_n_consecutive_429s_with_a_wait_then_none(sandbox_factory: Any) -> None:
    sandbox = sandbox_factory({"faults": {"rules": [storm_rule(6, 8)]}})
    seen = statuses(sandbox.url, 25)
    assert seen[:5] == [(202, None)] * 5
    assert seen[5:13] == [(429, 1)] * 8
    assert seen[13:] == [(202, None)] * 12
    assert sandbox.stats()["faults_fired"] == [8]


def test_a_storm_ends_even_when_the_client_waits_between_requests(sandbox_factory: Any) -> None:
    # ``times`` counts refusals, not time: a client that slows down meets the same storm.
    sandbox = sandbox_factory({"faults": {"rules": [storm_rule(3, 4)]}})
    seen = statuses(sandbox.url, 10, gap=0.05)
    assert [status for status, _ in seen] == [202, 202, 429, 429, 429, 429, 202, 202, 202, 202]


def test_one_in_n_refused_does_not_depend_on_the_rate(sandbox_factory: Any) -> None:
    rule = {"kind": "status", "status": 429, "retry_after_seconds": 1, "match": {"every": 4}}
    fast = sandbox_factory({"faults": {"rules": [rule]}})
    slow = sandbox_factory({"faults": {"rules": [rule]}})
    burst = statuses(fast.url, 16)
    paced = statuses(slow.url, 16, gap=0.1)
    assert burst == paced
    assert [i for i, (status, _) in enumerate(burst, 1) if status == 429] == [4, 8, 12, 16]
    assert {wait for status, wait in burst if status == 429} == {1}
