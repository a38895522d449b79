"""Is a body ready to send? The verdict for every record, every failing field for the rest.

Validation has two speeds: a compiled fastjsonschema check decides valid/invalid for every record;
only an invalid body pays for the jsonschema pass that lists *every* failing field, because a dead
letter naming one problem at a time costs one run per problem. The two agree by construction:
both use jsonschema's own ``uuid`` rule (fastjsonschema's stricter regex alone would let them
disagree on lax forms such as a trailing ``}``). The settings that fill body fields are checked by
the same rules (:func:`value_problems`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

import fastjsonschema
from jsonschema import Draft202012Validator, ValidationError

from target_catena_messages import jsonutil
from target_catena_messages.body import versions
from target_catena_messages.body.versions import BodyVersion

SchemaVersion = str  # a body version's name: one of versions.names()
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


def load_schema(version: SchemaVersion) -> Mapping[str, Any]:
    """The selected body schema from package data, read once (treat as read-only)."""
    return versions.get(version).schema


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
