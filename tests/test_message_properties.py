"""Property tests: BodyValidator agrees with an independent reading of the schema files.

The oracle knows nothing of body/validate.py internals: it loads the schema file itself, judges the
whole body with a plain jsonschema validator and each field alone with that field's subschema.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from target_catena_messages.body import validate, versions
from target_catena_messages.body.build import BodyRules, build_body
from target_catena_messages.body.validate import BodyValidator

SCHEMAS = Path(validate.__file__).parent / "schemas"
VERSIONS: tuple[validate.SchemaVersion, ...] = ("source_ids", "catena_ids")
SCHEMA = {v: json.loads((SCHEMAS / f"{v}.json").read_text()) for v in VERSIONS}
CHECKER = FormatChecker()
WHOLE = {v: Draft202012Validator(SCHEMA[v], format_checker=CHECKER) for v in VERSIONS}
PER_FIELD = {
    v: {
        name: Draft202012Validator(sub, format_checker=CHECKER)
        for name, sub in SCHEMA[v]["properties"].items()
    }
    for v in VERSIONS
}
MISSING = object()
ALL_FIELDS = sorted(
    set(SCHEMA["source_ids"]["properties"]) | set(SCHEMA["catena_ids"]["properties"])
)
UUID_FIELDS = {"connection_id", "sender_id", "recipient_id", "reply_to_message_id"}
ENUMS = {
    "priority": ["low", "medium", "high"],
    "mode": ["group", "bulk", "direct"],
    "recipient_group": ["admin", "driver", "dispatcher"],
    "sender_group": ["admin", "driver", "dispatcher"],
}
GOOD = "019ddd87-eedd-710f-967c-1c6cc72ac985"

uuids = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()))
TRICKY_UUIDS = [
    "",
    "nope",
    GOOD[:-1],
    GOOD + "0",
    GOOD.replace("-", ""),
    "{" + GOOD + "}",
    GOOD + "}",  # lax: jsonschema accepts it
    "urn:uuid:" + GOOD,
    GOOD[:30] + "-" + GOOD[30:],  # lax: an extra dash
    GOOD[:35] + "g",
    GOOD.replace("0", "\u0660"),  # lax: Arabic-Indic zero, int() reads it, regexes do not
    " " + GOOD[1:],
    GOOD[:9] + "+" + GOOD[10:],
]
BLANKS = ["", " ", "\t\n", "\u3000\x1f", "\xa0", "\u2028"]
bad_uuids = st.one_of(st.sampled_from(TRICKY_UUIDS), st.text(max_size=40))
wrong_types = st.one_of(
    st.integers(),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
    st.booleans(),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
texts = st.one_of(st.text(max_size=20), st.sampled_from([*BLANKS, "hi", " x "]))


OPTIONAL = set(ALL_FIELDS) - {"connection_id", "sender_id", "recipient_id", "message_text"}


def valid_for(name: str) -> st.SearchStrategy[Any]:
    if name in UUID_FIELDS:
        return uuids
    if name in ENUMS:
        return st.sampled_from(ENUMS[name])
    if name == "source_recipient_ids":
        return st.lists(st.text(max_size=5), max_size=4)
    if name == "message_text":
        return st.text(max_size=20).filter(str.strip)
    return st.text(max_size=20)


def faulty_for(name: str) -> st.SearchStrategy[Any]:
    if name in UUID_FIELDS:
        invalid: st.SearchStrategy[Any] = bad_uuids
    elif name in ENUMS:
        invalid = st.one_of(st.text(max_size=10), st.sampled_from([v.upper() for v in ENUMS[name]]))
    elif name == "source_recipient_ids":
        invalid = st.lists(st.one_of(st.text(max_size=5), st.none(), wrong_types), max_size=4)
    else:
        invalid = texts  # blank message_text; any text for other fields (maybe not a fault)
    # the near misses get their own share, or a few hundred examples would rarely meet them
    tricky = {"message_text": BLANKS, **dict.fromkeys(UUID_FIELDS, TRICKY_UUIDS)}.get(name)
    near_misses = st.sampled_from(tricky) if tricky else invalid
    return st.one_of(st.just(MISSING), st.none(), invalid, wrong_types, near_misses, near_misses)


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly good records with up to three faulty fields, plus fields foreign to both schemas."""
    faulty = draw(st.sets(st.sampled_from(ALL_FIELDS), max_size=3))
    record: dict[str, Any] = {}
    for name in ALL_FIELDS:
        if name in faulty:
            value = draw(faulty_for(name))
        elif name in OPTIONAL and draw(st.booleans()):
            value = draw(st.sampled_from([MISSING, None]))
        else:
            value = draw(valid_for(name))
        if value is not MISSING:
            record[name] = value
    extras = draw(
        st.dictionaries(st.sampled_from(["order_id", "is_sync", "body", "id"]), wrong_types)
    )
    return {**extras, **record}


rules_strategy = st.builds(
    BodyRules,
    message_schema=st.sampled_from(VERSIONS),
    default_connection_id=st.one_of(st.none(), uuids, bad_uuids),
    connection_id_by_fleet_ref=st.dictionaries(
        st.text(max_size=3), st.one_of(uuids, bad_uuids), max_size=3
    ),
    default_sender_id=st.one_of(st.none(), uuids, bad_uuids),
    allow_empty_message_text=st.booleans(),
)


def truly_wrong_fields(
    version: validate.SchemaVersion, body: dict[str, Any], allow_empty: bool
) -> set[str]:
    """Fields the spec (judged field by field) or the message_text rule rejects."""
    schema = SCHEMA[version]
    wrong = {name for name in schema["required"] if name not in body}
    wrong |= {
        name
        for name, value in body.items()
        if name in PER_FIELD[version] and not PER_FIELD[version][name].is_valid(value)
    }
    text = body.get("message_text")
    if not allow_empty and (text is None or (isinstance(text, str) and not text.strip())):
        wrong.add("message_text")
    return wrong


def check(version: validate.SchemaVersion, body: dict[str, Any], allow_empty: bool) -> None:
    validator = BodyValidator(version, allow_empty_message_text=allow_empty)
    errors = validator.errors(body)
    event(f"{version} {'refused' if errors else 'accepted'}")
    wrong = truly_wrong_fields(version, body, allow_empty)
    valid_by_oracle = WHOLE[version].is_valid(body) and "message_text" not in wrong
    if not errors:
        # (a) accepted: the independent validator and the text rule accept it too
        assert valid_by_oracle, (body, wrong)
        assert not wrong
    else:
        # (b) refused: every error names a field that really is wrong, and none is forgotten
        assert not valid_by_oracle
        named = {e.field for e in errors}
        assert None not in named, errors
        assert named == wrong, (errors, wrong)
        assert all(e.message for e in errors)
    # the fast path and the full path agree on validity
    assert validator.is_valid(body) == (validator.explain(body) == [])


@settings(max_examples=200, deadline=None)
@given(record=records(), rules=rules_strategy)
def test_built_bodies_are_valid_exactly_when_the_spec_says_so(
    record: dict[str, Any], rules: BodyRules
) -> None:
    before = json.dumps(record, default=str, sort_keys=True)
    body = build_body(record, rules)
    assert json.dumps(record, default=str, sort_keys=True) == before  # record untouched
    assert set(body) <= set(rules.version.field_order)
    assert None not in body.values()
    check(rules.message_schema, body, rules.allow_empty_message_text)


@settings(max_examples=200, deadline=None)
@given(record=records(), version=st.sampled_from(VERSIONS), allow_empty=st.booleans())
def test_raw_bodies_with_nulls_and_extras_too(
    record: dict[str, Any], version: validate.SchemaVersion, allow_empty: bool
) -> None:
    # Bodies not built by build_body: nulls in required fields, foreign fields left in.
    check(version, record, allow_empty)


GOOD_BODY: dict[str, dict[str, Any]] = {
    "source_ids": {"connection_id": GOOD, "message_text": "hi", "source_recipient_ids": ["d1"]},
    "catena_ids": {
        "connection_id": GOOD,
        "sender_id": GOOD,
        "recipient_id": GOOD,
        "message_text": "hi",
    },
}


@st.composite
def one_fault(draw: st.DrawFn) -> tuple[validate.SchemaVersion, dict[str, Any]]:
    """A good body with exactly one field replaced, so no other fault can hide a disagreement."""
    version = draw(st.sampled_from(VERSIONS))
    name = draw(st.sampled_from(sorted(SCHEMA[version]["properties"])))
    value = draw(faulty_for(name))
    body = {k: v for k, v in GOOD_BODY[version].items() if k != name}
    if value is not MISSING:
        body[name] = value
    return version, body


@settings(max_examples=300, deadline=None)
@given(case=one_fault(), allow_empty=st.booleans())
def test_one_faulty_field_in_a_good_body(
    case: tuple[validate.SchemaVersion, dict[str, Any]], allow_empty: bool
) -> None:
    version, body = case
    check(version, body, allow_empty)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.text(max_size=4), min_size=1, max_size=5),
    connection=uuids,
    data=st.data(),
)
def test_lane_ignores_recipient_order(ids: list[str], connection: str, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(ids))
    a = {"connection_id": connection, "source_recipient_ids": ids, "message_text": "x"}
    b = {"connection_id": connection, "source_recipient_ids": shuffled, "priority": "low"}
    lane = versions.get("source_ids").lane
    assert lane(a) == lane(b)
    assert lane(a).startswith(connection + "|")


def test_decimal_is_never_a_string() -> None:
    body = {"connection_id": GOOD, "message_text": Decimal("1")}
    assert [e.field for e in BodyValidator("source_ids").errors(body)] == ["message_text"]
