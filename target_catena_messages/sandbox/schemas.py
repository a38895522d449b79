"""The sandbox's own JSON Schemas of both Create Message bodies, and 422 details from them.

These are hand translations of the OpenAPI in catena-api.md §2a (``catena_ids``) and §2b
(``source_ids``): ``nullable: true`` becomes ``type: [X, "null"]``, nullable ``$ref`` enums accept
``null``, ``format: uuid`` is checked. They are deliberately independent of the target's own schema
files, so a mistake in one shows up as a disagreement with the other. Extra keys are allowed (the
Go SDK forwards them); the server reports them as ``unknown_fields``.

Validation has two speeds, because it was the largest cost of an accepted request: a compiled
fastjsonschema check (~5 us) decides valid/invalid; only an invalid body pays for the jsonschema
pass (~40 us) that lists every problem. Both use jsonschema's own ``uuid`` rule, so they agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator, ValidationError

from target_catena_messages import jsonutil

_UUID = {"type": "string", "format": "uuid"}
_GROUPS = ["admin", "driver", "dispatcher"]


def _nullable(type_name: str) -> dict[str, Any]:
    return {"type": [type_name, "null"]}


def _nullable_enum(values: list[str]) -> dict[str, Any]:
    return {"type": ["string", "null"], "enum": [*values, None]}


SOURCE_IDS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "MessageCreate (older, source ids)",
    "type": "object",
    "properties": {
        "connection_id": _UUID,
        "fleet_ref": _nullable("string"),
        "source_sender_id": _nullable("string"),
        "source_recipient_ids": {"type": ["array", "null"], "items": {"type": "string"}},
        "recipient_group": _nullable_enum(_GROUPS),
        "sender_group": _nullable_enum(_GROUPS),
        "message_text": _nullable("string"),
        "mode": _nullable_enum(["group", "bulk", "direct"]),
        "priority": _nullable_enum(["low", "medium", "high"]),
        "source_thread_id": _nullable("string"),
        "source_reply_to_message_id": _nullable("string"),
    },
    "required": ["connection_id"],
    "additionalProperties": True,
}

CATENA_IDS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "MessageCreate (current, Catena user ids)",
    "type": "object",
    "properties": {
        "connection_id": _UUID,
        "sender_id": _UUID,
        "recipient_id": _UUID,
        "message_text": _nullable("string"),
        "priority": _nullable_enum(["low", "medium", "high"]),
        "reply_to_message_id": {"type": ["string", "null"], "format": "uuid"},
    },
    "required": ["connection_id", "recipient_id", "sender_id"],
    "additionalProperties": True,
}

SCHEMAS = {"source_ids": SOURCE_IDS_SCHEMA, "catena_ids": CATENA_IDS_SCHEMA}

_VALIDATORS = {
    name: Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    for name, schema in SCHEMAS.items()
}

_FORMATS = Draft202012Validator.FORMAT_CHECKER


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def _is_uuid(value: object) -> bool:
    """The ``uuid`` format rule of jsonschema, for fastjsonschema (a bool, never an exception).

    The canonical form, which that rule accepts, is matched first; anything else asks the rule.
    """
    if isinstance(value, str) and _CANONICAL_UUID.fullmatch(value):
        return True
    return bool(_FORMATS.conforms(value, "uuid"))


def _compile(schema: dict[str, Any]) -> Callable[[object], bool]:
    """The valid/invalid verdict of ``schema``, compiled (no error details)."""
    compiled = fastjsonschema.compile(schema, formats={"uuid": _is_uuid}, use_default=False)
    invalid = fastjsonschema.JsonSchemaValueException

    def valid(body: object) -> bool:
        try:
            compiled(body)
        except invalid:
            return False
        return True

    return valid


_FAST = {name: _compile(schema) for name, schema in SCHEMAS.items()}
_KNOWN = {name: frozenset(schema["properties"]) for name, schema in SCHEMAS.items()}

_TYPE_ERRORS = {
    "string": ("string_type", "Input should be a valid string"),
    "array": ("list_type", "Input should be a valid list"),
    "object": ("dict_type", "Input should be a valid dictionary"),
    "boolean": ("bool_type", "Input should be a valid boolean"),
    "integer": ("int_type", "Input should be a valid integer"),
}


def known_fields(message_schema: str) -> frozenset[str]:
    """The property names of a body version (anything else is an unknown field)."""
    return _KNOWN[message_schema]


def validate_body(message_schema: str, body: object) -> list[dict[str, str]]:
    """Every problem of ``body`` as UnprocessableEntity ``detail`` entries (empty when valid).

    Each entry is ``{"path", "input", "message", "error_type"}`` in the style of Catena's
    FastAPI/pydantic errors (``missing``, ``string_type``, ``enum``, ``uuid_parsing``, ...), sorted
    by path so the answer is the same for the same body.
    """
    details: list[dict[str, str]] = []
    if _FAST[message_schema](body):
        return details
    for error in _VALIDATORS[message_schema].iter_errors(body):
        details.extend(_details(error))
    details.sort(key=lambda d: (d["path"], d["error_type"]))
    return details


def detail(path: str, value: object, message: str, error_type: str) -> dict[str, str]:
    """One ValidationErrorDetail; ``input`` is a string in the spec, so non-strings become JSON."""
    text = value if isinstance(value, str) else jsonutil.dumps(value)
    return {"path": path, "input": text, "message": message, "error_type": error_type}


def _path(parts: Any) -> str:
    return ".".join(str(part) for part in parts) or "body"


def _details(error: ValidationError) -> list[dict[str, str]]:
    path = _path(error.absolute_path)
    value = error.instance
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in value]
        # jsonschema reports each missing property as its own error; keep only the one it names.
        names = [name for name in missing if error.message.startswith(repr(name))] or missing[:1]
        prefix = "" if path == "body" else path + "."
        return [detail(prefix + name, value, "Field required", "missing") for name in names]
    if error.validator == "type":
        wanted = error.validator_value
        first = wanted[0] if isinstance(wanted, list) else wanted
        error_type, message = _TYPE_ERRORS.get(first, (f"{first}_type", error.message))
        return [detail(path, value, message, error_type)]
    if error.validator == "enum":
        choices = [repr(v) for v in error.validator_value if v is not None]
        text = ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
        return [detail(path, value, f"Input should be {text}", "enum")]
    if error.validator == "format" and error.validator_value == "uuid":
        return [detail(path, value, "Input should be a valid UUID", "uuid_parsing")]
    return [detail(path, value, error.message, str(error.validator))]
