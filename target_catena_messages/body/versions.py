"""Body versions as values: everything that differs between Catena's Create Message bodies.

Catena's API is provisional and its body has changed once already, so a version is data, not a
set of ``if`` branches: one :class:`BodyVersion` subclass here plus one JSON schema in
``schemas/``. Building, validation, settings, the users lookup and the delivery lanes ask the
version they were given; nothing else compares version names (docs/body-versions.md).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from target_catena_messages import jsonutil

CONNECTION_SETTINGS = ("default_connection_id", "connection_id_by_fleet_ref")
SYNC_SETTING = "is_sync"

_REGISTRY: dict[str, BodyVersion] = {}  # filled by BodyVersion.__init_subclass__, in order


@dataclass(frozen=True)
class UserIdField:
    """A body field holding a Catena user id that the record may give as a provider id instead.

    The record's ``source_field`` (read, never sent) carries the telematics provider's id; the
    users endpoint turns it into the Catena user id for ``body_field``.
    """

    source_field: str
    body_field: str
    role: Literal["sender", "recipient"]


class BodyVersion:
    """One Create Message body version; a subclass with a ``name`` registers itself.

    The class attributes are the whole entry; the instance only caches its schema. The
    defaults describe a body without user ids to resolve, sync or lane fields.
    """

    name: ClassVar[str]
    #: A few words for the ``message_schema`` setting's description.
    summary: ClassVar[str] = ""
    #: The body field filled from ``connection_id_by_fleet_ref[record's fleet_ref]``, then from
    #: ``default_connection_id``, when the record leaves it missing or null.
    connection_field: ClassVar[str] = "connection_id"
    #: The record field whose value picks a connection from ``connection_id_by_fleet_ref``.
    fleet_field: ClassVar[str] = "fleet_ref"
    #: Further fallbacks: body field -> the setting whose value fills it when the record has none.
    setting_defaults: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: Body fields that take Catena user ids, resolved from provider ids through the users
    #: endpoint when the record gives those instead.
    user_ids: ClassVar[tuple[UserIdField, ...]] = ()
    #: The recipient fields that make a driver's lane (one message at a time, in input order),
    #: the first one present wins; a list is sorted so its order does not matter.
    lane_fields: ClassVar[tuple[str, ...]] = ()
    #: Whether Catena accepts ``?is_sync=true`` with this body.
    supports_sync: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in _REGISTRY:
                raise ValueError(f"body version {cls.name!r} is defined twice")
            _REGISTRY[cls.name] = cls()

    def __repr__(self) -> str:
        return f"<body version {self.name}>"

    @property
    def resolves_user_ids(self) -> bool:
        """Whether records may need a users lookup before their body can be sent."""
        return bool(self.user_ids)

    @functools.cached_property
    def schema(self) -> Mapping[str, Any]:
        """The body's JSON schema from package data, read once (treat as read-only)."""
        text = resources.files("target_catena_messages.body.schemas").joinpath(f"{self.name}.json")
        schema: dict[str, Any] = json.loads(text.read_text())
        return schema

    @functools.cached_property
    def field_order(self) -> tuple[str, ...]:
        """The names a body may contain, in the schema's order; other record fields stay home."""
        return tuple(self.schema["properties"])

    @functools.cached_property
    def allowed_settings(self) -> frozenset[str]:
        """The version-specific settings this version gives a meaning to."""
        return frozenset(
            (*CONNECTION_SETTINGS, *self.setting_defaults.values())
            + ((SYNC_SETTING,) if self.supports_sync else ())
        )

    def lane(self, body: Mapping[str, Any]) -> str:
        """The ordering lane: same (connection, recipient), same lane, one message at a time."""
        connection = body.get(self.connection_field) or ""
        for name in self.lane_fields:
            value = body.get(name)
            if isinstance(value, list):
                if value:
                    return f"{connection}|{jsonutil.dumps(sorted(value, key=str))}"
            elif value is not None and value != "":
                return f"{connection}|{value}"
        return f"{connection}|"


class SourceIds(BodyVersion):
    """The original specification's body: the TMS's own (TSP) ids, a list of recipients."""

    name = "source_ids"
    summary = "the original specification's body, with TSP ids"
    lane_fields = ("source_recipient_ids", "recipient_group")


class CatenaIds(BodyVersion):
    """The current body: Catena user ids for sender and recipient, and ``?is_sync``."""

    name = "catena_ids"
    summary = "the current body, with Catena user ids"
    setting_defaults = MappingProxyType({"sender_id": "default_sender_id"})
    user_ids = (
        UserIdField("recipient_source_id", "recipient_id", "recipient"),
        UserIdField("sender_source_id", "sender_id", "sender"),
    )
    lane_fields = ("recipient_id",)
    supports_sync = True


def names() -> tuple[str, ...]:
    """Every version's name, the default first (the ``message_schema`` setting's values)."""
    return tuple(_REGISTRY)


def all_versions() -> tuple[BodyVersion, ...]:
    """Every registered version, the default first."""
    return tuple(_REGISTRY.values())


def default() -> BodyVersion:
    """The version a run uses unless ``message_schema`` says otherwise."""
    return _REGISTRY[SourceIds.name]


def get(name: str) -> BodyVersion:
    """The version called ``name``.

    Raises:
        ValueError: no such version.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown message_schema {name!r} (one of: {', '.join(_REGISTRY)})"
        ) from None


def version_settings() -> frozenset[str]:
    """The settings some version gives a meaning to; another version must leave them unset."""
    return frozenset().union(*(v.allowed_settings for v in _REGISTRY.values()))


def allowing(setting: str) -> tuple[str, ...]:
    """The names of the versions that give ``setting`` a meaning."""
    return tuple(v.name for v in _REGISTRY.values() if setting in v.allowed_settings)
