"""Resolve a TMS's provider driver ids to the Catena user ids a body version needs.

A version with ``user_ids`` (body/versions.py) wants Catena user ids for its sender and
recipient, but a TMS holds the telematics provider's ids. Record fields carry them (e.g.
``sender_source_id`` and ``recipient_source_id``, read, never sent); Catena maps them through
``GET /v2/telematics/users?source_ids=…&connection_id=…``. Lookups are batched per connection
(100 ids a request, every page), cached for the run — one lookup per id per run — and patient
with 429s.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from target_catena_messages.body import versions
from target_catena_messages.body.validate import BodyValidator
from target_catena_messages.body.versions import BodyVersion, UserIdField
from target_catena_messages.catena.client import CatenaClient
from target_catena_messages.catena.errors import CatenaApiError
from target_catena_messages.catena.retry import GiveUp, RetryPolicy
from target_catena_messages.delivery.availability import Availability
from target_catena_messages.delivery.throttle import Throttle

logger = logging.getLogger(__name__)

# Stands in for a user id not yet resolved, so the rest of a body can be validated before any
# lookup (and a dry run can validate without one); a v4 uuid no Catena user has.
PLACEHOLDER_USER_ID = "00000000-0000-4000-8000-000000000000"
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
    """What one record needs resolved (pure result of :func:`wanted`).

    ``errors`` not empty: the record cannot be sent whatever the lookup finds (unusable provider
    ids, or body errors besides the missing user ids), so it must not be looked up.
    """

    sender: str | None = None
    recipient: str | None = None
    errors: tuple[dict[str, Any], ...] = ()  # dead-letter errors, provider id errors first

    @property
    def error(self) -> dict[str, Any] | None:
        """The first of :attr:`errors`, or None when the record may be looked up."""
        return self.errors[0] if self.errors else None

    @property
    def any(self) -> bool:
        """Whether anything must be looked up."""
        return bool(self.sender or self.recipient)

    def source_id(self, field: UserIdField) -> str | None:
        """The provider id to resolve for ``field``, if any."""
        return self.sender if field.role == "sender" else self.recipient


def _one_id(
    record: Mapping[str, Any], field: UserIdField, version: BodyVersion
) -> tuple[str | None, dict[str, Any] | None]:
    name = field.source_field
    value = record.get(name)
    if isinstance(value, list):
        if len(value) > 1:
            return None, {
                "field": name,
                "message": f"{len(value)} {field.role}s, but the {version.name} body has one "
                f"{field.body_field}: split the message per driver (or use message_schema "
                f"{_list_versions()})",
            }
        value = value[0] if value else None
    if value is None or value == "":
        return None, None
    return str(value), None


@functools.cache
def _list_versions() -> str:
    """The body versions whose recipient field takes a list, named for the error's fix."""
    names = []
    for v in versions.all_versions():
        props = v.schema.get("properties", {})
        for name in v.lane_fields:
            kind = props.get(name, {}).get("type")
            if kind == "array" or (isinstance(kind, list) and "array" in kind):
                names.append(v.name)
                break
    return " or ".join(names) or "with a list of recipients"


def _resolving_version() -> BodyVersion:
    return next(v for v in versions.all_versions() if v.resolves_user_ids)


@functools.cache
def _schema_validator(version: BodyVersion) -> BodyValidator:
    # The schema alone: without the run's settings, the message_text rule is left to the caller.
    return BodyValidator(version, allow_empty_message_text=True)


def wanted(
    record: Mapping[str, Any],
    body: Mapping[str, Any],
    version: BodyVersion | None = None,
    validator: BodyValidator | None = None,
) -> Wanted:
    """Which provider ids a record needs resolved: only where the body has no Catena id.

    A record that needs some is validated first, with placeholders for the ids to resolve, so
    that only a record whose body can be sent is ever looked up: the users query carries the
    record's connection_id, and a malformed one is the record's fault (a validation dead
    letter), not a refusal by Catena. ``version`` defaults to the registry's first version with
    user ids to resolve; ``validator`` (the run's) to that version's schema alone.
    """
    version = version or _resolving_version()
    found: dict[str, str | None] = {}
    errors: list[dict[str, Any]] = []
    pending: list[str] = []  # body fields whose user id comes from a provider id
    for field in version.user_ids:
        # A provider id on the record beats a setting's default (which build_body applied).
        if field.body_field not in body or (
            field.body_field in version.setting_defaults
            and field.source_field in record
            and record.get(field.body_field) is None
        ):
            source_id, field_error = _one_id(record, field, version)
            if field_error is not None:
                errors.append(field_error)
            elif source_id is None:
                continue
            found[field.role] = source_id
            pending.append(field.body_field)
    if not pending:  # nothing to look up: the caller validates the body as it is
        return Wanted()
    probe = dict(body)
    for name in pending:
        probe[name] = PLACEHOLDER_USER_ID
    check = validator or _schema_validator(version)
    errors.extend(e.as_dict() for e in check.errors(probe))
    return Wanted(found.get("sender"), found.get("recipient"), tuple(errors))


class UserResolver:
    """Provider id -> Catena user id, per connection, cached for the run."""

    def __init__(
        self,
        client: CatenaClient,
        *,
        sleep: Callable[[float], None] = time.sleep,
        policy: RetryPolicy = USERS_POLICY,
        throttle: Throttle | None = None,
        availability: Availability | None = None,
    ) -> None:
        self._client = client
        self._sleep = sleep
        # While Catena is down a failed lookup counts nothing and the next one waits for it.
        self._availability = availability or Availability.unmonitored()
        self._policy = replace(policy, available=self._availability.available)
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
        available = self._availability
        while True:
            available.wait()
            if self._throttle is not None:
                self._throttle.wait_turn()
            try:
                users = self._client.list_users(connection_id, source_ids)
            except CatenaApiError as exc:
                available.failed(exc.status)
                step = state.increment(exc.kind, exc.status, exc.retry_after)
                if isinstance(step, GiveUp):
                    if available.holds(exc.status) and available.wait():
                        state = self._policy  # Catena was down, not this lookup: start afresh
                        continue
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
