"""Resolve a TMS's provider driver ids to the Catena user ids the current body needs.

The ``catena_ids`` body wants Catena user ids for ``sender_id`` and ``recipient_id``, but a TMS
holds the telematics provider's ids. Two record fields carry them, ``sender_source_id`` and
``recipient_source_id`` (read, never sent); Catena maps them through
``GET /v2/telematics/users?source_ids=…&connection_id=…``. Lookups are batched
per connection (100 ids a request, every page), cached for the run — one lookup per id per run —
and patient with 429s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from target_catena_messages.catena.client import CatenaClient
from target_catena_messages.catena.errors import CatenaApiError
from target_catena_messages.retry import GiveUp, RetryPolicy
from target_catena_messages.throttle import Throttle

logger = logging.getLogger(__name__)

SENDER_SOURCE_ID = "sender_source_id"
RECIPIENT_SOURCE_ID = "recipient_source_id"
#: How a users lookup is retried (docs/retry.md): 5 attempts, 1, 2, 4 then 8 s apart (or as the
#: server asks), never for a rejection.
USERS_POLICY = RetryPolicy(
    max_retries=4,
    max_retry_seconds=float("inf"),
    base_seconds=1.0,
    jitter=False,
    idempotent=True,
    count_throttled=True,
)


@dataclass(frozen=True)
class Wanted:
    """What one record needs resolved (pure result of :func:`wanted`)."""

    sender: str | None = None
    recipient: str | None = None
    error: dict[str, Any] | None = None  # a contract §5 error when the record's ids are unusable

    @property
    def any(self) -> bool:
        """Whether anything must be looked up."""
        return bool(self.sender or self.recipient)


def _one_id(record: Mapping[str, Any], name: str) -> tuple[str | None, dict[str, Any] | None]:
    value = record.get(name)
    if isinstance(value, list):
        if len(value) > 1:
            return None, {
                "field": name,
                "message": f"{len(value)} recipients, but the catena_ids body has one "
                "recipient_id: split the message per driver (or use message_schema source_ids)",
            }
        value = value[0] if value else None
    if value is None or value == "":
        return None, None
    return str(value), None


def wanted(record: Mapping[str, Any], body: Mapping[str, Any]) -> Wanted:
    """Which provider ids a record needs resolved: only where the body has no Catena id."""
    sender, sender_error = (None, None)
    # A provider id on the record beats default_sender_id (which build_body already applied).
    if "sender_id" not in body or (SENDER_SOURCE_ID in record and record.get("sender_id") is None):
        sender, sender_error = _one_id(record, SENDER_SOURCE_ID)
    recipient, recipient_error = (None, None)
    if "recipient_id" not in body:
        recipient, recipient_error = _one_id(record, RECIPIENT_SOURCE_ID)
    return Wanted(sender, recipient, recipient_error or sender_error)


class UserResolver:
    """Provider id -> Catena user id, per connection, cached for the run."""

    def __init__(
        self,
        client: CatenaClient,
        *,
        sleep: Callable[[float], None] = time.sleep,
        policy: RetryPolicy = USERS_POLICY,
        throttle: Throttle | None = None,
    ) -> None:
        self._client = client
        self._sleep = sleep
        self._policy = policy
        self._throttle = throttle  # delivery's: lookups share its 429 pauses and rate
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], str | None] = {}

    def resolve(self, connection_id: str, source_ids: Iterable[str]) -> dict[str, str | None]:
        """Map each provider id to its Catena user id (None: unknown on that connection).

        Raises:
            CatenaApiError: The users list could not be read (after waiting out 429s).
        """
        ids = list(dict.fromkeys(source_ids))
        with self._lock:
            missing = [s for s in ids if (connection_id, s) not in self._cache]
            if missing:
                found = self._look_up(connection_id, missing)
                for s in missing:
                    self._cache[(connection_id, s)] = found.get(s)
            return {s: self._cache[(connection_id, s)] for s in ids}

    def _look_up(self, connection_id: str, source_ids: list[str]) -> dict[str, str]:
        state = self._policy
        while True:
            if self._throttle is not None:
                self._throttle.wait_turn()
            try:
                users = self._client.list_users(connection_id, source_ids)
            except CatenaApiError as exc:
                step = state.increment(exc.kind, exc.status, exc.retry_after)
                if isinstance(step, GiveUp):
                    raise
                if step.shared_pause and self._throttle is not None:
                    self._throttle.pause(step.wait)
                logger.info("users lookup: %s; retrying in %.1f s", exc, step.wait)
                self._sleep(step.wait)
                state = step
                continue
            return {
                str(u["source_id"]): str(u["id"])
                for u in users
                if u.get("source_id") is not None
                and u.get("id")
                and u.get("connection_id") in (None, connection_id)
            }
