"""From a mapped record to a Create Message body: build it, validate it, key it, time it.

Everything here is pure (each body version's schema file is read once), so the sink can call it
per record and the tests can try every combination. Validation has two speeds: a compiled
fastjsonschema check decides valid/invalid for every record; only an invalid body pays for the
jsonschema pass that lists *every* failing field, because a dead letter naming one problem at a
time costs one run per problem.
The two agree by construction: both use jsonschema's own ``uuid`` rule (fastjsonschema's stricter
regex alone would let them disagree on lax forms such as a trailing ``}``).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

import fastjsonschema
from jsonschema import Draft202012Validator, ValidationError

from target_catena_messages import jsonutil
from target_catena_messages.body import versions
from target_catena_messages.body.versions import BodyVersion
from target_catena_messages.errors import ConfigError

SchemaVersion = str  # a body version's name: one of versions.names()
SCHEMA_VERSIONS: tuple[SchemaVersion, ...] = versions.names()
MESSAGE_TEXT = "message_text"
_SHOW_LIMIT = 80
_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


@dataclass(frozen=True)
class FieldError:
    """One problem with one body field (``field`` None: the body as a whole)."""

    field: str | None
    message: str

    def as_dict(self) -> dict[str, str | None]:
        """The dead-letter ``errors`` item."""
        return {"field": self.field, "message": self.message}


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


def load_schema(version: SchemaVersion) -> Mapping[str, Any]:
    """The selected body schema from package data, read once (treat as read-only)."""
    return versions.get(version).schema


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


@functools.lru_cache(maxsize=4096)  # a stream repeats its few connection and user ids
def is_uuid(value: str) -> bool:
    """The ``uuid`` format rule of jsonschema, with the canonical form as a fast first try.

    The one uuid check of the project: bodies and the settings that fill them agree.
    """
    if _UUID_RE.fullmatch(value):
        return True
    try:
        UUID(value)
    except ValueError:
        return False
    return all(value[position] == "-" for position in (8, 13, 18, 23))


def _text_problem(body: Mapping[str, Any]) -> str | None:
    """The project's rule: message_text present and not blank; None when it holds (or is no str)."""
    hint = "(set allow_empty_message_text to send messages without text)"
    if MESSAGE_TEXT not in body or body[MESSAGE_TEXT] is None:
        return f"message_text is {'null' if MESSAGE_TEXT in body else 'missing'} {hint}"
    text = body[MESSAGE_TEXT]
    if isinstance(text, str) and not text.strip():
        return f"message_text is blank, got {_show(text)}"
    return None


@functools.cache
def _fast_check(version: SchemaVersion, allow_empty: bool) -> Callable[[dict[str, Any]], bool]:
    """The valid/invalid verdict: the schema's rules table when it has one, else fastjsonschema."""
    schema = load_schema(version)
    plan = _rules_table(schema)
    if plan is not None:
        schema_check = _table_check(*plan)
    else:
        compiled = fastjsonschema.compile(
            dict(schema), formats={"uuid": is_uuid}, use_default=False
        )
        invalid = fastjsonschema.JsonSchemaValueException

        def schema_check(body: dict[str, Any]) -> bool:
            try:
                compiled(body)
            except invalid:
                return False
            return True

    if allow_empty:
        return schema_check

    def check(body: dict[str, Any]) -> bool:
        if not schema_check(body):
            return False
        text = body.get(MESSAGE_TEXT)
        return isinstance(text, str) and bool(text.strip())

    return check


# The rules table: what fastjsonschema's code does for the few keywords the two body schemas use,
# without its per-call sets and exceptions (half the cost per record). A schema using anything
# else gets fastjsonschema itself. Types map to Python exactly as fastjsonschema maps them.
_ANNOTATIONS = frozenset({"$schema", "$comment", "title", "description", "examples", "default"})
_PY_TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,),
    "null": (type(None),),
    "array": (list, tuple),
    "object": (dict,),
}
# (types allowed, extra check for a non-None value or None, whether None passes the extra check)
_Rule = tuple[tuple[type, ...], Callable[[Any], bool] | None, bool]


def _py_types(sub: Mapping[str, Any]) -> tuple[type, ...] | None:
    names = sub.get("type")
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(name in _PY_TYPES for name in names):
        return None
    return tuple(t for name in names for t in _PY_TYPES[name])


def _field_rule(sub: Mapping[str, Any]) -> _Rule | None:
    """One property's rule, or None when it uses a keyword the table does not know."""
    types = _py_types(sub)
    extras = set(sub) - _ANNOTATIONS - {"type"}
    if types is None or len(extras) > 1:
        return None
    if not extras:
        return types, None, True
    (keyword,) = extras
    if keyword == "enum" and all(v is None or isinstance(v, str) for v in sub["enum"]):
        allowed = frozenset(v for v in sub["enum"] if v is not None)
        return types, lambda v: isinstance(v, str) and v in allowed, None in sub["enum"]
    if keyword == "format" and sub["format"] == "uuid":
        return types, lambda v: not isinstance(v, str) or is_uuid(v), True
    if keyword == "items" and isinstance(sub["items"], dict) and set(sub["items"]) == {"type"}:
        item_types = _py_types(sub["items"])
        if item_types is None:
            return None
        return (
            types,
            lambda v: not isinstance(v, (list, tuple)) or all(isinstance(i, item_types) for i in v),
            True,
        )
    return None


def _rules_table(schema: Mapping[str, Any]) -> tuple[tuple[str, ...], dict[str, _Rule]] | None:
    """(required names, rule per property), or None when the schema needs fastjsonschema."""
    if set(schema) - _ANNOTATIONS - {"properties", "required"}:
        return None
    rules = {}
    for name, sub in schema["properties"].items():
        rule = _field_rule(sub)
        if rule is None:
            return None
        rules[name] = rule
    return tuple(schema.get("required", ())), rules


def _table_check(
    required: tuple[str, ...], rules: dict[str, _Rule]
) -> Callable[[dict[str, Any]], bool]:
    rule_for = rules.get

    def check(body: dict[str, Any]) -> bool:
        for name in required:
            if name not in body:
                return False
        for name, value in body.items():
            rule = rule_for(name)
            if rule is None:  # not a schema property: allowed, as without additionalProperties
                continue
            types, extra, none_passes = rule
            if not isinstance(value, types):
                return False
            if value is None:
                if not none_passes:
                    return False
            elif extra is not None and not extra(value):
                return False
        return True

    return check


@functools.cache
def _full_validator(version: SchemaVersion) -> Draft202012Validator:
    return Draft202012Validator(
        load_schema(version), format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def _show(value: Any) -> str:
    """A short, typed rendering of a bad value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        text = f"boolean {str(value).lower()}"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (int, float, Decimal)):
        text = f"{type(value).__name__} {value}"
    else:
        try:
            text = f"{type(value).__name__} {jsonutil.dumps(value)}"
        except (TypeError, ValueError):
            text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 1] + "…"


def _expected(types: str | Sequence[str]) -> str:
    names = [types] if isinstance(types, str) else list(types)
    article = {"array": "an", "object": "an", "integer": "an"}
    return " or ".join(
        "null" if name == "null" else f"{article.get(name, 'a')} {name}" for name in names
    )


def _describe(error: ValidationError) -> tuple[str | None, str, list[FieldError]]:
    """(field, validator kind, errors) for one jsonschema error, in this project's words."""
    path = list(error.absolute_path)
    name = str(path[0]) if path else None
    prefix = f"item {path[1]}: " if len(path) > 1 else ""
    kind = str(error.validator)
    value = error.instance
    if kind == "required":
        missing = [p for p in error.validator_value if p not in value]
        return None, kind, [FieldError(p, f"{p} is required (missing or null)") for p in missing]
    if kind == "type":
        message = f"must be {_expected(error.validator_value)}, got {_show(value)}"
    elif kind == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value if v is not None)
        message = f"must be one of {allowed} (or null), got {_show(value)}"
    elif kind == "format":
        message = f"must be a {error.validator_value}, got {_show(value)}"
    else:
        message = error.message[:_SHOW_LIMIT]
    return name, kind if not prefix else "item", [FieldError(name, prefix + message)]


def value_problems(version: SchemaVersion | BodyVersion, field: str, value: Any) -> list[str]:
    """What the version's schema says is wrong with ``value`` as the body's ``field``.

    For a setting that fills a body field: it is checked at start by the very rule each body
    will meet, so a bad value is one configuration error, not a dead letter per record.
    """
    version = version if isinstance(version, BodyVersion) else versions.get(version)
    sub = version.schema["properties"][field]
    validator = Draft202012Validator(sub, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [item.message for error in validator.iter_errors(value) for item in _describe(error)[2]]


class BodyValidator:
    """Validates bodies of one version against the spec plus the message_text rule."""

    __slots__ = ("_allow_empty", "_check", "version")

    def __init__(
        self, version: SchemaVersion | BodyVersion, *, allow_empty_message_text: bool = False
    ) -> None:
        version = version.name if isinstance(version, BodyVersion) else versions.get(version).name
        self.version = version
        self._allow_empty = allow_empty_message_text
        self._check = _fast_check(version, allow_empty_message_text)

    def is_valid(self, body: Mapping[str, Any]) -> bool:
        """The fast verdict alone (compiled schema + message_text rule)."""
        return self._check(body if isinstance(body, dict) else dict(body))

    @property
    def check_dict(self) -> Callable[[dict[str, Any]], bool]:
        """:meth:`is_valid` as a plain function of a ``dict`` body, for per-record callers."""
        return self._check

    def errors(self, body: Mapping[str, Any]) -> list[FieldError]:
        """Every problem with the body, sorted by field; [] when it may be sent."""
        if self.is_valid(body):
            return []
        found = self.explain(body)
        # Never let a disagreement pass an invalid body: report it as a whole-body error.
        return found or [FieldError(None, "body rejected by the compiled schema check")]

    def explain(self, body: Mapping[str, Any]) -> list[FieldError]:
        """The full jsonschema pass, always run: each failing field once per problem.

        A wrong-typed enum field reports its type only (the enum miss says nothing new).
        """
        body = body if isinstance(body, dict) else dict(body)
        typed: set[str | None] = set()
        pending: list[tuple[str | None, str, FieldError]] = []
        for error in _full_validator(self.version).iter_errors(body):
            name, kind, found = _describe(error)
            if kind == "type":
                typed.add(name)
            pending.extend((name, kind, item) for item in found)
        result = {item for name, kind, item in pending if not (kind == "enum" and name in typed)}
        if not self._allow_empty and (problem := _text_problem(body)) is not None:
            result.add(FieldError(MESSAGE_TEXT, problem))
        return sorted(result, key=lambda e: (e.field is not None, e.field or "", e.message))


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


def recipient_lane(body: Mapping[str, Any], version: BodyVersion | None = None) -> str:
    """The ordering lane: same (connection, recipient), same lane, one message at a time.

    Prefer ``version.lane``; without a version the lane fields of every version are tried (a
    body holds the fields of one version only, so the result is the same).
    """
    return (version or _ANY_VERSION).lane(body)


class _AnyVersion(BodyVersion):
    """Lanes for a caller that does not say its version (not registered: it has no name)."""

    lane_fields = tuple(
        dict.fromkeys(name for v in map(versions.get, SCHEMA_VERSIONS) for name in v.lane_fields)
    )


_ANY_VERSION = _AnyVersion()


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
