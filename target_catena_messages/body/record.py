"""From a mapped record to a Message's parts: its key, its time, its stream's checks.

Everything here is pure. The body itself is built in ``build.py`` and validated in
``validate.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from target_catena_messages import jsonutil
from target_catena_messages.body.validate import MESSAGE_TEXT, _show
from target_catena_messages.errors import ConfigError


def _key_text(value: Any) -> str:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (dict, list, tuple)):
        return jsonutil.canonical(value).decode()
    return str(value)


def _key_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (dt.datetime, dt.date, dt.time)) else value


def record_key(record: Mapping[str, Any], key_properties: Sequence[str]) -> str:
    """The record's ledger key: one property as text, several as a JSON array string."""
    if not key_properties:
        raise ValueError("no key properties: key the record by body_hash_key instead")
    values = []
    for name in key_properties:
        value = record.get(name)
        if value is None:
            raise ValueError(f"key property {name!r} is missing or null")
        values.append(value)
    if len(values) == 1:
        return _key_text(values[0])
    return jsonutil.dumps([_key_value(v) for v in values])


def body_hash_key(body: Mapping[str, Any]) -> str:
    """Key for streams without key properties: equal bodies, equal keys, across runs."""
    return jsonutil.sha256_hex(body)


KEY_FIELD = "_catena_key"
"""The field that carries a re-driven record's original key (its stream's only key property)."""


def is_redrive_schema(message: Mapping[str, Any]) -> bool:
    """Whether a SCHEMA message announces a re-drive stream (keyed by ``_catena_key`` alone).

    No tap keys a stream by that reserved name, so the target can tell a re-drive from the
    original stream of the same name and leave its records unmapped.
    """
    return message.get("key_properties") == [KEY_FIELD]


def check_stream_schema(
    stream: str,
    properties: Mapping[str, Any],
    key_properties: Sequence[str],
    *,
    allow_body_hash_keys: bool,
) -> None:
    """Refuse, at SCHEMA time, a stream that could only send empty or unkeyed messages.

    Raises:
        ConfigError: listing every problem found, each with its fix.
    """
    fields = sorted(properties)
    problems = []
    if MESSAGE_TEXT not in properties:
        problems.append(
            f"it has no {MESSAGE_TEXT!r} property (its fields: {', '.join(fields) or 'none'}); "
            "a stream map must produce message_text, e.g. stream_maps: "
            f'{{"{stream}": {{"message_text": "<expression>"}}}}'
        )
    if not key_properties and not allow_body_hash_keys:
        others = [name for name in fields if name != MESSAGE_TEXT]
        example = next(
            (name for name in others if name.endswith("id")), others[0] if others else "id"
        )
        problems.append(
            "it has no key properties; set them with __key_properties__ in stream_maps, e.g. "
            f'{{"{stream}": {{"__key_properties__": ["{example}"]}}}}, '
            "or set allow_body_hash_keys: true to key records by a hash of their body"
        )
    unknown = [name for name in key_properties if name not in properties]
    if unknown:
        problems.append(f"key properties not among its fields: {', '.join(unknown)}")
    if problems:
        raise ConfigError(f"Stream {stream!r} cannot be loaded", problems)


def message_time(record: Mapping[str, Any], field: str) -> dt.datetime | None:
    """The record's creation time as an aware datetime (naive input counts as UTC); None if absent.

    Raises:
        ValueError: the value is neither a datetime, an ISO-8601 string nor epoch seconds.
    """
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, dt.date):  # a `format: date` field parsed by the SDK
        parsed = dt.datetime.combine(value, dt.time())
    elif isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{field} is not an ISO-8601 time: {_show(value)}") from None
    elif isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        try:
            parsed = dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"{field} is not a usable epoch time: {_show(value)}") from None
    else:
        raise ValueError(f"{field} is not a time: {_show(value)}")  # noqa: TRY004 (a bad value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.timezone.utc)


def is_expired(created: dt.datetime, max_age_hours: float, now: dt.datetime) -> bool:
    """True when the message is strictly older than the limit (naive datetimes count as UTC)."""
    if created.tzinfo is None:
        created = created.replace(tzinfo=dt.timezone.utc)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    return now - created > dt.timedelta(hours=max_age_hours)
