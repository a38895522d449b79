"""Settings: the JSON Schema that Meltano and ``--about`` show, and the typed, checked view.

singer-sdk validates types against the schema; the rules a schema cannot say (the http/loopback
rule, uuids in a map, which settings require which) are checked here, all at once, so a user fixes
every mistake in one go instead of one per run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from singer_sdk import typing as th

from target_catena_messages import jsonutil
from target_catena_messages.body import versions
from target_catena_messages.body.validate import value_problems
from target_catena_messages.body.versions import BodyVersion
from target_catena_messages.catena.auth import require_safe_url
from target_catena_messages.catena.errors import ClientConfigError
from target_catena_messages.errors import ConfigError

DEFAULT_AUTH_URL = "https://auth.catenatelematics.com/realms/catena/protocol/openid-connect/token"
DEFAULT_API_URL = "https://api.catenatelematics.com"
STATE_DIR = Path(".meltano") / "target-catena-messages"


@dataclass(frozen=True)
class DefaultPaths:
    """Where the target's files live when the settings do not say."""

    dead_letter_path: Path
    ledger_url: str


def default_paths(env: Mapping[str, str]) -> DefaultPaths:
    """The default file locations for this environment (the one place that decides them).

    Inside a Meltano project (``MELTANO_PROJECT_ROOT`` set and not empty) the files live with
    Meltano's own state under ``.meltano/``; otherwise in the working directory.
    """
    root = env.get("MELTANO_PROJECT_ROOT")
    if not root:
        return DefaultPaths(Path("catena-dead-letters.jsonl"), "sqlite:///catena-ledger.sqlite")
    directory = Path(root) / STATE_DIR
    return DefaultPaths(
        directory / "dead-letters.jsonl", f"sqlite:///{directory / 'ledger.sqlite'}"
    )


def _p(name: str, kind: Any, description: str, **kwargs: Any) -> th.Property[Any]:
    return th.Property(name, kind, description=description, **kwargs)


def _only(setting: str, description: str) -> str:
    """A version-specific setting's description, naming the versions that use it."""
    return f"{' or '.join(versions.allowing(setting))} only: {description}"


SETTINGS_SCHEMA: dict[str, Any] = th.PropertiesList(
    _p(
        "client_id",
        th.StringType,
        "OAuth2 client-credentials id. Required unless access_token or dry_run.",
    ),
    _p(
        "client_secret",
        th.StringType,
        "OAuth2 client secret. Never logged or written.",
        secret=True,
    ),
    _p(
        "access_token",
        th.StringType,
        "A ready bearer token; no token request is made.",
        secret=True,
    ),
    _p("auth_url", th.StringType, "Token endpoint.", default=DEFAULT_AUTH_URL),
    _p("api_url", th.StringType, "Catena API base URL.", default=DEFAULT_API_URL),
    _p("scope", th.StringType, "Scope sent with the token request.", default="organization"),
    _p(
        "message_schema",
        th.StringType,
        "Create Message body to build: "
        + "; ".join(f"{v.name} ({v.summary})" for v in versions.all_versions())
        + ".",
        default=versions.default().name,
        allowed_values=list(versions.names()),
    ),
    _p("default_connection_id", th.UUIDType, "connection_id when a record has none."),
    _p(
        "connection_id_by_fleet_ref",
        th.ObjectType(additional_properties=th.UUIDType),
        "Map fleet_ref -> connection_id, used when a record has no connection_id.",
    ),
    _p(
        "default_sender_id",
        th.UUIDType,
        _only("default_sender_id", "sender_id when a record has none."),
    ),
    _p("is_sync", th.BooleanType, _only("is_sync", "send ?is_sync=true."), default=False),
    _p("max_concurrency", th.IntegerType, "Hard cap on requests in flight.", default=8),
    _p(
        "max_requests_per_second",
        th.NumberType,
        "Client-side ceiling on request starts per second.",
    ),
    _p("request_timeout_seconds", th.NumberType, "Timeout per HTTP request.", default=30),
    _p("max_retries", th.IntegerType, "Retries of one message before dead-lettering.", default=6),
    _p(
        "max_retry_seconds",
        th.NumberType,
        "Cap on the time one message waits for retries.",
        default=900,
    ),
    _p(
        "max_ambiguous_resends",
        th.IntegerType,
        "Resends of an ambiguous send when no earlier operation is found, per key across runs.",
        default=3,
    ),
    _p(
        "max_consecutive_rejections",
        th.IntegerType,
        "That many rejections in a row with one status on one connection are fatal.",
        default=20,
    ),
    _p(
        "operation_lookup_lag_seconds",
        th.NumberType,
        "How long a new operation may take to appear in Catena's operation list; an ambiguous "
        "send is looked up only after this.",
        default=30,
    ),
    _p("message_time_field", th.StringType, "Record field with the message's creation time."),
    _p("max_message_age_hours", th.NumberType, "Older messages are never sent.", default=24),
    _p("allow_empty_message_text", th.BooleanType, "Send messages without text.", default=False),
    _p(
        "on_invalid_record",
        th.StringType,
        "dead_letter (default) or fail.",
        default="dead_letter",
        allowed_values=["dead_letter", "fail"],
    ),
    _p(
        "allow_dead_letters",
        th.BooleanType,
        "Exit 0 instead of 2 with dead letters.",
        default=False,
    ),
    _p("dead_letter_path", th.StringType, "JSON Lines file of records not delivered."),
    _p("ledger_url", th.StringType, "sqlite:///PATH or postgresql://... for delivered keys."),
    _p(
        "ledger_namespace", th.StringType, "Ledger name for a stream's keys (default: stream name)."
    ),
    _p("allow_body_hash_keys", th.BooleanType, "Key streams without key properties by body hash."),
    _p("dry_run", th.BooleanType, "Validate and dead-letter, send nothing.", default=False),
    _p(
        "confirm_operations",
        th.BooleanType,
        "After sending, poll Catena until each accepted message's operation succeeded or failed.",
        default=False,
    ),
    _p(
        "confirm_timeout_seconds",
        th.NumberType,
        "How long confirm_operations polls before leaving operations pending.",
        default=300,
    ),
).to_dict()


@dataclass(frozen=True)
class Settings:
    """The validated settings, with the documented defaults applied."""

    client_id: str | None = None
    client_secret: str | None = None
    access_token: str | None = None
    auth_url: str = DEFAULT_AUTH_URL
    api_url: str = DEFAULT_API_URL
    scope: str = "organization"
    message_schema: str = field(default_factory=lambda: versions.default().name)
    default_connection_id: str | None = None
    connection_id_by_fleet_ref: Mapping[str, str] = field(default_factory=dict)
    default_sender_id: str | None = None
    is_sync: bool = False
    max_concurrency: int = 8
    max_requests_per_second: float | None = None
    request_timeout_seconds: float = 30.0
    max_retries: int = 6
    max_retry_seconds: float = 900.0
    max_ambiguous_resends: int = 3
    max_consecutive_rejections: int = 20
    operation_lookup_lag_seconds: float = 30.0
    message_time_field: str | None = None
    max_message_age_hours: float = 24.0
    allow_empty_message_text: bool = False
    on_invalid_record: Literal["dead_letter", "fail"] = "dead_letter"
    allow_dead_letters: bool = False
    dead_letter_path: Path = field(default_factory=lambda: default_paths({}).dead_letter_path)
    ledger_url: str = field(default_factory=lambda: default_paths({}).ledger_url)
    ledger_namespace: str | None = None
    allow_body_hash_keys: bool = False
    dry_run: bool = False
    confirm_operations: bool = False
    confirm_timeout_seconds: float = 300.0

    @property
    def body_version(self) -> BodyVersion:
        """The body version ``message_schema`` names (checked by :meth:`from_config`)."""
        return versions.get(self.message_schema)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in any output."""
        return tuple(s for s in (self.client_secret, self.access_token) if s)

    def shape_fingerprint(self) -> str:
        """Hash of the settings that decide what is sent, beyond the body itself.

        A dead-lettered key is retried only when its body or these changed.
        """
        return jsonutil.sha256_hex(
            [
                self.message_schema,
                self.is_sync,
                self.allow_empty_message_text,
                self.message_time_field,
                self.max_message_age_hours,
            ]
        )

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> Settings:
        """Apply defaults and check every rule; raise one ConfigError listing all problems."""
        env = os.environ if env is None else env
        known = {k: v for k, v in config.items() if k in cls.__dataclass_fields__ and v is not None}
        problems: list[str] = []
        defaults = default_paths(env)
        if "dead_letter_path" in known:
            known["dead_letter_path"] = Path(str(known["dead_letter_path"])).expanduser()
        else:
            known["dead_letter_path"] = defaults.dead_letter_path
        known.setdefault("ledger_url", defaults.ledger_url)
        for name in (
            "request_timeout_seconds",
            "max_retry_seconds",
            "max_message_age_hours",
            "operation_lookup_lag_seconds",
            "confirm_timeout_seconds",
        ):
            if name in known:
                known[name] = float(known[name])
        if "max_requests_per_second" in known:
            known["max_requests_per_second"] = float(known["max_requests_per_second"])
        settings = cls(**known)
        problems.extend(settings._problems())
        if problems:
            raise ConfigError("invalid settings", problems)
        return settings

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if self.message_schema not in versions.names():
            problems.append(
                f"message_schema must be one of {', '.join(versions.names())}, "
                f"got {self.message_schema!r}"
            )
        if (
            not (self.client_id and self.client_secret)
            and not self.access_token
            and not self.dry_run
        ):
            problems.append(
                "client_id and client_secret are required (or access_token, or dry_run: true)"
            )
        for name in ("api_url", "auth_url"):
            try:
                require_safe_url(getattr(self, name), name)
            except ClientConfigError as exc:
                problems.append(str(exc))
        if self.message_schema in versions.names():
            problems.extend(self._body_problems(self.body_version))
        for name, low, inclusive in _BOUNDS:
            value = getattr(self, name)
            if value is not None and (value < low or (value == low and not inclusive)):
                relation = "at least" if inclusive else "more than"
                problems.append(f"{name} must be {relation} {low}, got {value}")
        if not self.ledger_url.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://")):
            problems.append("ledger_url must start with sqlite:/// or postgresql://")
        return problems

    def _body_problems(self, version: BodyVersion) -> list[str]:
        """The settings that fill body fields, checked with the body's own rules."""
        problems = [
            f"{setting} applies to message_schema {' or '.join(versions.allowing(setting))} "
            f"only (message_schema is {version.name})"
            for setting in sorted(versions.version_settings() - version.allowed_settings)
            if getattr(self, setting)
        ]
        fills: list[tuple[str, str, Any]] = [
            (f"connection_id_by_fleet_ref[{ref!r}]", version.connection_field, value)
            for ref, value in self.connection_id_by_fleet_ref.items()
        ]
        fills.append(
            ("default_connection_id", version.connection_field, self.default_connection_id)
        )
        fills.extend(
            (setting, field, getattr(self, setting))
            for field, setting in version.setting_defaults.items()
        )
        problems.extend(
            f"{setting} {problem}"
            for setting, field, value in fills
            if value is not None
            for problem in value_problems(version, field, value)
        )
        return problems


# (setting, lowest value, whether the lowest value itself is allowed)
_BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("max_concurrency", 1, True),
    ("max_retries", 0, True),
    ("max_ambiguous_resends", 0, True),
    ("max_consecutive_rejections", 1, True),
    ("request_timeout_seconds", 0, False),
    ("max_message_age_hours", 0, False),
    ("max_retry_seconds", 0, True),
    ("operation_lookup_lag_seconds", 0, True),
    ("confirm_timeout_seconds", 0, True),
    ("max_requests_per_second", 0, False),
)
