"""From a mapped record to a Create Message body: the version's fields plus its fallbacks.

Pure, and on the per-record path: :class:`BodyRules` works out once what the version makes of
the settings, so :func:`build_body` only reads plain attributes per record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from target_catena_messages.body import versions
from target_catena_messages.body.validate import SchemaVersion
from target_catena_messages.body.versions import BodyVersion


@dataclass(frozen=True)
class BodyRules:
    """The settings that shape a body; equal rules and records give equal bodies.

    What the version makes of them is worked out once here, so :func:`build_body` only reads
    plain attributes per record.
    """

    message_schema: SchemaVersion = field(default_factory=lambda: versions.default().name)
    default_connection_id: str | None = None
    connection_id_by_fleet_ref: Mapping[str, str] = field(default_factory=dict)
    default_sender_id: str | None = None
    allow_empty_message_text: bool = False
    version: BodyVersion = field(init=False, repr=False, compare=False)
    # (body field, value): the version's setting fallbacks that are set
    fills: tuple[tuple[str, Any], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        version = versions.get(self.message_schema)
        object.__setattr__(self, "version", version)
        fills = tuple(
            (name, value)
            for name, setting in version.setting_defaults.items()
            if (value := getattr(self, setting)) is not None
        )
        object.__setattr__(self, "fills", fills)


def _fleet_key(value: Any) -> str | None:
    # fleet_ref may arrive as a number (a Decimal from JSON); the map's keys are always strings.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        return str(value)
    return None


def build_body(record: Mapping[str, Any], rules: BodyRules) -> dict[str, Any]:
    """The request body: the record's schema fields (None left out) plus the version's fallbacks.

    Values pass through untouched, so validation sees exactly what would be sent.
    """
    version = rules.version
    body = {name: value for name in version.field_order if (value := record.get(name)) is not None}
    if (connection_field := version.connection_field) not in body:
        fleet = _fleet_key(record.get(version.fleet_field))
        mapped = rules.connection_id_by_fleet_ref.get(fleet) if fleet is not None else None
        connection_id = mapped if mapped is not None else rules.default_connection_id
        if connection_id is not None:
            body[connection_field] = connection_id
    for name, value in rules.fills:  # empty for most versions
        if name not in body:
            body[name] = value
    return body
