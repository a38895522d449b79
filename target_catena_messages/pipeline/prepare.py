"""Record → Message: body, validation, key, fingerprint, age. Reader thread only.

Pure but for numbering: each record takes the checkpointer's next number and raises the
backlog under the run lock, so STATE can later tell which records a tap state covers. The
second half of preparing a ``catena_ids`` body (provider ids → Catena user ids) needs a lookup
per batch, so admission calls :meth:`Preparer.apply_users` once the ids are known.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from target_catena_messages import jsonutil
from target_catena_messages.body.build import BodyRules, build_body
from target_catena_messages.body.record import body_hash_key, is_expired, message_time, record_key
from target_catena_messages.body.validate import BodyValidator
from target_catena_messages.outcome import Message
from target_catena_messages.pipeline.backlog import Backlog
from target_catena_messages.pipeline.checkpoint import Checkpointer
from target_catena_messages.pipeline.users import wanted
from target_catena_messages.settings import Settings


class Preparer:
    """Turns records into Messages for one run.

    Args:
        settings: The run's settings (body rules, key and age settings).
        lock: The run lock, held while numbering (the recorder reads the numbering too).
        checkpointer: Numbers records in input order.
        backlog: Counts the record as unresolved.
        lanes: Whether to compute the delivery lane (a dry run has no delivery to order).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        lock: threading.RLock,
        checkpointer: Checkpointer,
        backlog: Backlog,
        lanes: bool,
    ) -> None:
        self._settings = settings
        self._lock = lock
        self._next_seq = checkpointer.next_seq
        self._backlog = backlog
        self._lanes = lanes
        self._rules = BodyRules(
            message_schema=settings.message_schema,
            default_connection_id=settings.default_connection_id,
            connection_id_by_fleet_ref=dict(settings.connection_id_by_fleet_ref),
            default_sender_id=settings.default_sender_id,
            allow_empty_message_text=settings.allow_empty_message_text,
        )
        self._version = version = settings.body_version
        self._validator = BodyValidator(
            version, allow_empty_message_text=settings.allow_empty_message_text
        )
        self._shape_tail = b"," + jsonutil.canonical(settings.shape_fingerprint()) + b"]"
        self._is_valid = self._validator.check_dict
        self._namespace = settings.ledger_namespace
        self._resolve_ids = version.resolves_user_ids

    def prepare(
        self,
        stream: str,
        key_properties: Sequence[str],
        record: dict[str, Any],
        namespace: str | None = None,
    ) -> Message:
        """Turn one record into a Message (the per-record path of every run: P1 in the bench).

        It avoids work a run can skip: a single str or int key is its own text (``record_key``
        gives the same), the lane is only computed when there is a delivery to order, and the
        fingerprint hashes the same canonical bytes as ``sha256_hex([body, shape])`` without
        building the list.
        """
        with self._lock:
            seq = self._next_seq()
            self._backlog.unresolved += 1
        body = build_body(record, self._rules)
        unresolved = (
            wanted(record, body, self._version, self._validator) if self._resolve_ids else None
        )
        if unresolved is not None and unresolved.errors:
            errors = list(unresolved.errors)
        elif unresolved is not None and unresolved.any:
            errors = []  # validated once the provider ids are resolved (per batch)
        else:
            unresolved = None
            errors = [] if self._is_valid(body) else self.body_errors(body)
        key = _simple_key(record, key_properties)
        if key is None:
            try:
                key = record_key(record, key_properties) if key_properties else body_hash_key(body)
            except ValueError as exc:
                key = body_hash_key(body)
                errors.append({"field": None, "message": str(exc)})
        expired = False
        field = self._settings.message_time_field
        if field:
            try:
                created = message_time(record, field)
            except ValueError as exc:
                errors.append({"field": field, "message": str(exc)})
            else:
                if created is None:
                    errors.append({"field": field, "message": f"{field} is missing: age unknown"})
                else:
                    expired = is_expired(created, self._settings.max_message_age_hours, _utcnow())
        return Message(
            seq=seq,
            stream=stream,
            namespace=namespace or self._namespace or stream,
            key=key,
            record=record,
            body=body,
            fingerprint=self.fingerprint(body),
            lane=self._version.lane(body) if self._lanes else "",
            errors=errors,
            expired=expired and not errors,
            unresolved=unresolved if not errors else None,
        )

    def apply_users(self, m: Message, found: Mapping[str, str | None]) -> None:
        """Finish a message whose provider ids were looked up (before claiming).

        Fills the Catena user ids into the body, then validates, fingerprints and lanes it as
        :meth:`prepare` would have.
        """
        need, m.unresolved = m.unresolved, None
        errors = []
        for field in self._version.user_ids:
            source_id = need.source_id(field)
            if source_id is None:
                continue
            user_id = found.get(source_id)
            if user_id is None:
                errors.append(
                    {
                        "field": field.source_field,
                        "message": f"no Catena user with provider id {source_id!r} on "
                        f"connection {m.connection_id}",
                    }
                )
            else:
                m.body[field.body_field] = user_id
        m.errors = errors or self.body_errors(m.body)
        m.expired = m.expired and not m.errors
        m.fingerprint = self.fingerprint(m.body)
        m.lane = self._version.lane(m.body)

    def body_errors(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The body's validation errors, in the dead letters' form.

        A missing connection_id next to a fleet_ref means that fleet has no connection
        configured: the error says so, since "connection_id is required" alone does not.
        """
        errors = [e.as_dict() for e in self._validator.errors(body)]
        fleet = body.get("fleet_ref")
        if fleet is not None and "connection_id" not in body:
            known = ", ".join(sorted(self._rules.connection_id_by_fleet_ref)) or "none"
            for error in errors:
                if error.get("field") == "connection_id":
                    error["message"] = (
                        f"no connection for fleet_ref {fleet!r}: add it to "
                        f"connection_id_by_fleet_ref (fleets configured: {known}) or set "
                        "default_connection_id"
                    )
        return errors

    def fingerprint(self, body: dict[str, Any]) -> str:
        """``jsonutil.sha256_hex([body, shape])``, byte for byte, without the list."""
        return hashlib.sha256(b"[" + jsonutil.canonical(body) + self._shape_tail).hexdigest()


def _simple_key(record: Mapping[str, Any], key_properties: Sequence[str]) -> str | None:
    """The key of a record keyed by one str or int property (the usual case), else None.

    Exactly what ``record_key`` returns for these (``str(value)``); anything else, a missing
    or null value included, is left to ``record_key``.
    """
    if len(key_properties) != 1:
        return None
    value = record.get(key_properties[0])
    kind = type(value)
    if kind is str:
        return value
    if kind is int:
        return str(value)
    return None


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)
