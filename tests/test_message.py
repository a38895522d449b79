"""Bodies, validation, keys, lanes, schema checks and message times (body/)."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import fastjsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from target_catena_messages import jsonutil
from target_catena_messages.body import validate, versions
from target_catena_messages.body.build import BodyRules, build_body
from target_catena_messages.body.record import (
    body_hash_key,
    check_stream_schema,
    is_expired,
    message_time,
    record_key,
)
from target_catena_messages.body.validate import BodyValidator, FieldError
from target_catena_messages.errors import ConfigError

SCHEMAS = Path(validate.__file__).parent / "schemas"
CONN = "019ddd87-eedd-710f-967c-1c6cc72ac985"
CONN2 = "3c90c3cc-0d44-4b50-8888-8dd25736052a"
SENDER = "f9c7ee1c-2e16-5858-9b7e-ff7c89a4dd04"
RECIPIENT = "b224f322-b3d2-57e0-b245-cda313f68a1d"
UTC = dt.timezone.utc

SOURCE_BODY = {
    "connection_id": CONN,
    "fleet_ref": "fleet-1",
    "source_sender_id": "disp-7",
    "source_recipient_ids": ["drv-2", "drv-1"],
    "recipient_group": "driver",
    "sender_group": "dispatcher",
    "message_text": "Load 42 ready at dock 3",
    "mode": "direct",
    "priority": "high",
    "source_thread_id": "t-1",
    "source_reply_to_message_id": "m-9",
}
CATENA_BODY = {
    "connection_id": CONN,
    "sender_id": SENDER,
    "recipient_id": RECIPIENT,
    "message_text": "Delivery confirmed at warehouse B",
    "priority": "low",
    "reply_to_message_id": CONN2,
}


def fields_of(errors: list[FieldError]) -> list[str | None]:
    return [e.field for e in errors]


def only(errors: list[FieldError], field: str) -> FieldError:
    matching = [e for e in errors if e.field == field]
    assert len(matching) == 1, errors
    return matching[0]


# --- schemas ---------------------------------------------------------------------------------


def test_schema_files_mirror_the_spec() -> None:
    source = json.loads((SCHEMAS / "source_ids.json").read_text())
    catena = json.loads((SCHEMAS / "catena_ids.json").read_text())
    assert source["$schema"] == catena["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert source["required"] == ["connection_id"]
    assert catena["required"] == ["connection_id", "recipient_id", "sender_id"]
    assert catena["properties"]["priority"]["enum"] == ["low", "medium", "high", None]
    assert source["properties"]["mode"]["enum"] == ["group", "bulk", "direct", None]
    assert source["properties"]["source_recipient_ids"]["type"] == ["array", "null"]
    assert catena["properties"]["reply_to_message_id"]["format"] == "uuid"
    assert source["properties"]["connection_id"]["title"] == "Connection Id"
    for schema in (source, catena):
        assert "additionalProperties" not in schema
        for prop in schema["properties"].values():
            assert not {"maxLength", "minLength", "pattern"} & set(prop)
    assert frozenset(versions.get("source_ids").field_order) == frozenset(SOURCE_BODY)
    assert frozenset(versions.get("catena_ids").field_order) == frozenset(CATENA_BODY)


@pytest.mark.parametrize("version", ["source_ids", "catena_ids"])
def test_spec_examples_and_full_bodies_are_valid(version: validate.SchemaVersion) -> None:
    schema = json.loads((SCHEMAS / f"{version}.json").read_text())
    validator = BodyValidator(version)
    assert validator.errors(schema["examples"][0]) == []
    full = SOURCE_BODY if version == "source_ids" else CATENA_BODY
    assert validator.errors(full) == []
    assert validator.is_valid(full)
    assert validator.explain(full) == []


def test_minimal_and_nullable_bodies_are_valid() -> None:
    source = BodyValidator("source_ids")
    assert source.errors({"connection_id": CONN, "message_text": "hi"}) == []
    nulls = {name: None for name in SOURCE_BODY if name not in ("connection_id", "message_text")}
    assert source.errors({"connection_id": CONN, "message_text": "hi", **nulls}) == []
    catena = BodyValidator("catena_ids")
    minimal = {"connection_id": CONN, "sender_id": SENDER, "recipient_id": RECIPIENT}
    assert catena.errors({**minimal, "message_text": "x", "priority": None}) == []
    # uppercase uuids are uuids; unknown extra fields are not restricted by the spec
    assert catena.errors({**minimal, "message_text": "x", "sender_id": SENDER.upper()}) == []
    assert catena.errors({**minimal, "message_text": "x", "is_sync": True}) == []


def test_unknown_version_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown message_schema"):
        BodyValidator("v3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown message_schema"):
        BodyRules(message_schema="v3")  # type: ignore[arg-type]


# --- validation: each kind of invalid field ---------------------------------------------------


@pytest.mark.parametrize(
    ("version", "field", "value", "words"),
    [
        ("source_ids", "priority", "urgent", ["one of low, medium, high", "'urgent'"]),
        ("source_ids", "mode", "broadcast", ["group, bulk, direct", "'broadcast'"]),
        ("source_ids", "recipient_group", "drivers", ["admin, driver, dispatcher"]),
        ("source_ids", "sender_group", "boss", ["admin, driver, dispatcher", "'boss'"]),
        ("catena_ids", "priority", "HIGH", ["one of low, medium, high", "'HIGH'"]),
        ("source_ids", "connection_id", "not-a-uuid", ["uuid", "'not-a-uuid'"]),
        ("catena_ids", "sender_id", "019ddd87eedd710f967c1c6cc72ac985", ["uuid"]),
        ("catena_ids", "recipient_id", CONN[:-1] + "g", ["uuid"]),
        ("catena_ids", "reply_to_message_id", "", ["uuid", "''"]),
        ("source_ids", "fleet_ref", Decimal("12"), ["a string or null", "Decimal 12"]),
        ("source_ids", "source_sender_id", 12, ["a string or null", "int 12"]),
        ("source_ids", "source_thread_id", True, ["boolean true"]),
        ("source_ids", "source_reply_to_message_id", {"id": 1}, ['dict {"id":1}']),
        ("source_ids", "source_recipient_ids", "drv-1", ["an array or null", "'drv-1'"]),
        ("source_ids", "message_text", ["hi"], ["a string or null", 'list ["hi"]']),
        ("catena_ids", "connection_id", 42, ["must be a string", "int 42"]),
        ("catena_ids", "connection_id", None, ["must be a string", "null"]),
        ("catena_ids", "sender_id", None, ["must be a string", "null"]),
    ],
)
def test_each_invalid_field_is_named(
    version: validate.SchemaVersion, field: str, value: object, words: list[str]
) -> None:
    body = {**(SOURCE_BODY if version == "source_ids" else CATENA_BODY), field: value}
    errors = BodyValidator(version).errors(body)
    assert fields_of(errors) == [field]
    for word in words:
        assert word in errors[0].message


def test_wrong_type_on_an_enum_reports_the_type_once() -> None:
    errors = BodyValidator("source_ids").errors({**SOURCE_BODY, "priority": 3})
    assert errors == [FieldError("priority", "must be a string or null, got int 3")]


@pytest.mark.parametrize(
    ("version", "missing"),
    [("source_ids", ["connection_id"]), ("catena_ids", ["connection_id", "recipient_id"])],
)
def test_missing_required_fields_are_named(
    version: validate.SchemaVersion, missing: list[str]
) -> None:
    body = {**(SOURCE_BODY if version == "source_ids" else CATENA_BODY)}
    for name in missing:
        del body[name]
    errors = BodyValidator(version).errors(body)
    assert fields_of(errors) == missing
    assert all(f"{e.field} is required" in e.message for e in errors)


def test_array_items_must_be_strings() -> None:
    body = {**SOURCE_BODY, "source_recipient_ids": ["drv-1", 7, None, Decimal("3")]}
    errors = BodyValidator("source_ids").errors(body)
    assert fields_of(errors) == ["source_recipient_ids"] * 3
    assert [e.message.split(":")[0] for e in errors] == ["item 1", "item 2", "item 3"]
    assert "Decimal 3" in errors[2].message


@pytest.mark.parametrize("version", ["source_ids", "catena_ids"])
@pytest.mark.parametrize(
    ("text", "word"), [(None, "null"), ("", "blank"), ("  \t\n\u3000", "blank"), (..., "missing")]
)
def test_message_text_rule(version: validate.SchemaVersion, text: object, word: str) -> None:
    body: dict[str, object] = {**(SOURCE_BODY if version == "source_ids" else CATENA_BODY)}
    if text is ...:
        del body["message_text"]
    else:
        body["message_text"] = text
    errors = BodyValidator(version).errors(body)
    assert errors == [only(errors, "message_text")]
    assert word in errors[0].message
    assert BodyValidator(version, allow_empty_message_text=True).errors(body) == []


def test_allow_empty_does_not_allow_a_wrong_type() -> None:
    errors = BodyValidator("catena_ids", allow_empty_message_text=True).errors(
        {**CATENA_BODY, "message_text": 5}
    )
    assert errors == [FieldError("message_text", "must be a string or null, got int 5")]


def test_several_errors_are_all_listed_sorted_by_field() -> None:
    body = {
        "sender_id": "nope",
        "priority": "urgent",
        "message_text": "   ",
        "reply_to_message_id": 5,
        "fleet_ref": 7,  # not a catena_ids field: not restricted
    }
    errors = BodyValidator("catena_ids").errors(body)
    assert fields_of(errors) == [
        "connection_id",
        "message_text",
        "priority",
        "recipient_id",
        "reply_to_message_id",
        "sender_id",
    ]
    assert errors[0].as_dict() == {
        "field": "connection_id",
        "message": "connection_id is required (missing or null)",
    }


def test_long_values_are_truncated_in_messages() -> None:
    errors = BodyValidator("source_ids").errors({**SOURCE_BODY, "mode": "x" * 5000})
    assert len(errors) == 1
    assert len(errors[0].message) < 200
    assert errors[0].message.endswith("…")


def test_lax_uuid_forms_follow_jsonschema_in_both_paths() -> None:
    # jsonschema's uuid rule (dash positions + uuid.UUID) is the definition of valid; the
    # compiled check must agree with it, also on forms its regex alone would refuse.
    validator = BodyValidator("catena_ids")
    lax = {**CATENA_BODY, "reply_to_message_id": CONN2 + "}"}
    assert validator.is_valid(lax)
    assert validator.explain(lax) == []
    braced = {**CATENA_BODY, "reply_to_message_id": "{" + CONN2 + "}"}
    assert not validator.is_valid(braced)
    assert fields_of(validator.errors(braced)) == ["reply_to_message_id"]


def test_validator_accepts_any_mapping() -> None:
    assert BodyValidator("catena_ids").errors(MappingProxyType(CATENA_BODY)) == []
    bad = MappingProxyType({**CATENA_BODY, "sender_id": 1})
    assert fields_of(BodyValidator("catena_ids").errors(bad)) == ["sender_id"]


_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(["low", "high", "admin", "group", "LOW", CONN, CONN.upper(), CONN + "}"]),
    st.lists(st.one_of(st.text(max_size=3), st.integers(), st.none()), max_size=3),
    st.tuples(st.text(max_size=3)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@pytest.mark.parametrize("version", ["source_ids", "catena_ids"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_rules_table_agrees_with_fastjsonschema(version: validate.SchemaVersion, data: Any) -> None:
    # The table replaces fastjsonschema's compiled code on the per-record path: same verdicts.
    schema = dict(validate.load_schema(version))
    table = validate._rules_table(schema)
    assert table is not None  # both body schemas take the fast table
    check = validate._table_check(*table)
    compiled = fastjsonschema.compile(schema, formats={"uuid": validate.is_uuid})
    names = [*schema["properties"], "not_in_schema"]
    body = data.draw(st.dictionaries(st.sampled_from(names), _ANY_VALUE, max_size=len(names)))
    try:
        compiled(body)
        expected = True
    except fastjsonschema.JsonSchemaValueException:
        expected = False
    assert check(body) is expected


def test_a_schema_beyond_the_table_falls_back_to_fastjsonschema() -> None:
    assert validate._rules_table({"properties": {"n": {"type": "integer"}}}) is None
    assert validate._rules_table({"properties": {"s": {"type": "string", "maxLength": 3}}}) is None
    assert validate._rules_table({"properties": {}, "additionalProperties": False}) is None
    assert validate._rules_table({"properties": {"e": {"type": "string", "enum": [1]}}}) is None
    enum_without_null = {"properties": {"e": {"type": ["string", "null"], "enum": ["a"]}}}
    table = validate._rules_table(enum_without_null)
    assert table is not None
    check = validate._table_check(*table)
    assert check({"e": "a"})
    assert not check({"e": None})  # null is a type it allows, but not a value of the enum
    assert not check({"e": "b"})


# --- building bodies --------------------------------------------------------------------------


def test_build_body_keeps_only_schema_fields_and_drops_none() -> None:
    record = {**SOURCE_BODY, "priority": None, "order_id": 42, "sender_id": SENDER, "is_sync": True}
    before = dict(record)
    body = build_body(record, BodyRules())
    assert record == before  # never mutated
    assert "priority" not in body
    assert set(body) == set(SOURCE_BODY) - {"priority"}
    assert list(body) == [name for name in SOURCE_BODY if name != "priority"]  # schema order
    assert body["source_recipient_ids"] is record["source_recipient_ids"]  # passed through
    catena = build_body(
        {**CATENA_BODY, "fleet_ref": "f", "mode": "direct"}, BodyRules("catena_ids")
    )
    assert catena == CATENA_BODY


def test_build_body_passes_values_through_uncoerced() -> None:
    body = build_body({"connection_id": CONN, "message_text": Decimal("12")}, BodyRules())
    assert body["message_text"] == Decimal("12")
    assert fields_of(BodyValidator("source_ids").errors(body)) == ["message_text"]


def test_connection_id_fallbacks() -> None:
    rules = BodyRules(default_connection_id=CONN2, connection_id_by_fleet_ref={"fleet-1": CONN})
    assert build_body({"fleet_ref": "fleet-1"}, rules)["connection_id"] == CONN
    assert build_body({"fleet_ref": "fleet-9"}, rules)["connection_id"] == CONN2
    assert build_body({}, rules)["connection_id"] == CONN2
    assert (
        build_body({"connection_id": None, "fleet_ref": "fleet-1"}, rules)["connection_id"] == CONN
    )
    # the record's value wins, even a bad one (validation reports it)
    assert build_body({"connection_id": "x", "fleet_ref": "fleet-1"}, rules)["connection_id"] == "x"
    assert "connection_id" not in build_body({"fleet_ref": "fleet-1"}, BodyRules())
    # catena_ids: fleet_ref is read from the record but never sent
    catena = build_body(
        {"fleet_ref": "fleet-1"},
        BodyRules("catena_ids", connection_id_by_fleet_ref={"fleet-1": CONN}),
    )
    assert catena == {"connection_id": CONN}
    # a numeric fleet_ref still finds its (string) map entry; unhashable ones don't crash
    numeric = BodyRules(connection_id_by_fleet_ref={"12": CONN})
    assert build_body({"fleet_ref": Decimal("12")}, numeric)["connection_id"] == CONN
    assert "connection_id" not in build_body({"fleet_ref": ["12"]}, numeric)


def test_sender_id_fallback_is_catena_only() -> None:
    catena = BodyRules("catena_ids", default_sender_id=SENDER)
    assert build_body({}, catena) == {"sender_id": SENDER}
    assert build_body({"sender_id": None}, catena) == {"sender_id": SENDER}
    assert build_body({"sender_id": RECIPIENT}, catena) == {"sender_id": RECIPIENT}
    assert build_body({}, BodyRules("source_ids", default_sender_id=SENDER)) == {}


# --- keys and lanes ---------------------------------------------------------------------------


def test_record_key_one_property() -> None:
    assert record_key({"id": "m-1", "x": 1}, ["id"]) == "m-1"
    assert record_key({"id": 42}, ["id"]) == "42"
    assert record_key({"id": Decimal("12")}, ["id"]) == "12"
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert record_key({"id": when}, ["id"]) == "2025-01-02T03:04:05+00:00"
    assert record_key({"id": {"b": 1, "a": 2}}, ["id"]) == '{"a":2,"b":1}'


def test_record_key_several_properties() -> None:
    assert record_key({"fleet": "fleet-1", "n": 42}, ["fleet", "n"]) == '["fleet-1",42]'
    assert record_key({"fleet": "f", "n": Decimal("4.50")}, ["fleet", "n"]) == '["f",4.50]'
    when = dt.datetime(2025, 1, 2, tzinfo=UTC)
    assert record_key({"a": when, "b": "x"}, ["a", "b"]) == '["2025-01-02T00:00:00+00:00","x"]'
    assert record_key({"a": 1, "b": 2}, ["b", "a"]) == "[2,1]"  # order of key_properties


@pytest.mark.parametrize("record", [{"fleet": "f"}, {"fleet": "f", "n": None}])
def test_record_key_missing_value_names_the_property(record: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="'n'"):
        record_key(record, ["fleet", "n"])
    with pytest.raises(ValueError, match="no key properties"):
        record_key(record, [])


def test_body_hash_key_is_canonical() -> None:
    a = body_hash_key({"connection_id": CONN, "message_text": "hi"})
    b = body_hash_key({"message_text": "hi", "connection_id": CONN})
    assert a == b == jsonutil.sha256_hex({"connection_id": CONN, "message_text": "hi"})
    assert len(a) == 64
    assert a != body_hash_key({"connection_id": CONN, "message_text": "hi!"})


def test_recipient_lanes() -> None:
    catena_lane, source_lane = versions.get("catena_ids").lane, versions.get("source_ids").lane
    assert catena_lane(CATENA_BODY) == f"{CONN}|{RECIPIENT}"
    assert source_lane(SOURCE_BODY) == f'{CONN}|["drv-1","drv-2"]'
    shuffled = {**SOURCE_BODY, "source_recipient_ids": ["drv-1", "drv-2"]}
    assert source_lane(shuffled) == source_lane(SOURCE_BODY)
    group = {"connection_id": CONN, "recipient_group": "driver", "source_recipient_ids": []}
    assert source_lane(group) == f"{CONN}|driver"
    assert source_lane({"connection_id": CONN}) == f"{CONN}|"
    assert source_lane({}) == "|"
    assert source_lane({**SOURCE_BODY, "connection_id": CONN2}) != source_lane(SOURCE_BODY)


# --- SCHEMA-time checks -----------------------------------------------------------------------


def test_stream_without_message_text_lists_its_fields() -> None:
    with pytest.raises(ConfigError) as caught:
        check_stream_schema(
            "orders", {"zeta": {}, "body": {}, "id": {}}, ["id"], allow_body_hash_keys=False
        )
    text = str(caught.value)
    assert "'orders'" in text
    assert "body, id, zeta" in text
    assert "stream map must produce message_text" in text
    assert "key properties" not in text


def test_stream_without_keys_names_the_fix() -> None:
    props: dict[str, object] = {"message_text": {}, "order_id": {}}
    with pytest.raises(ConfigError) as caught:
        check_stream_schema("orders", props, [], allow_body_hash_keys=False)
    text = str(caught.value)
    assert '"__key_properties__": ["order_id"]' in text
    assert "allow_body_hash_keys" in text
    check_stream_schema("orders", props, [], allow_body_hash_keys=True)
    check_stream_schema("orders", props, ["order_id"], allow_body_hash_keys=False)


def test_stream_checks_report_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        check_stream_schema("s", {"id": {}}, [], allow_body_hash_keys=False)
    assert len(caught.value.problems) == 2
    with pytest.raises(ConfigError, match="key properties not among its fields: oops"):
        check_stream_schema("s", {"message_text": {}}, ["oops"], allow_body_hash_keys=False)


# --- message time and expiry ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.datetime(2025, 3, 1, 12, 0), dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
        (dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC), dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
        ("2025-03-01T12:00:00Z", dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
        ("2025-03-01T12:00:00.5z", dt.datetime(2025, 3, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2025-03-01T14:00:00+02:00", dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
        ("2025-03-01T12:00:00", dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
        ("2025-03-01", dt.datetime(2025, 3, 1, tzinfo=UTC)),
        (dt.date(2025, 3, 1), dt.datetime(2025, 3, 1, tzinfo=UTC)),
        (1740830400, dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
        (1740830400.25, dt.datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)),
        (Decimal("1740830400"), dt.datetime(2025, 3, 1, 12, 0, tzinfo=UTC)),
    ],
)
def test_message_time_parses(value: object, expected: dt.datetime) -> None:
    parsed = message_time({"created_at": value}, "created_at")
    assert parsed == expected
    assert parsed is not None
    assert parsed.tzinfo is not None


def test_message_time_absent_is_none() -> None:
    assert message_time({}, "created_at") is None
    assert message_time({"created_at": None}, "created_at") is None


@pytest.mark.parametrize(
    "value",
    ["yesterday", "", "2025-13-01T00:00:00Z", True, [1], float("nan"), 1e20, Decimal("Infinity")],
)
def test_message_time_unparseable_names_the_field(value: object) -> None:
    with pytest.raises(ValueError, match="created_at"):
        message_time({"created_at": value}, "created_at")


def test_is_expired_edges() -> None:
    now = dt.datetime(2025, 3, 2, 12, 0, tzinfo=UTC)
    assert not is_expired(now - dt.timedelta(hours=24), 24, now)  # exactly the limit: still sent
    assert is_expired(now - dt.timedelta(hours=24, microseconds=1), 24, now)
    assert not is_expired(now + dt.timedelta(hours=5), 24, now)  # from the future
    assert is_expired(now - dt.timedelta(minutes=31), 0.5, now)
    assert not is_expired(now, 0, now)
    naive = dt.datetime(2025, 3, 1, 11, 59)  # naive counts as UTC
    assert is_expired(naive, 24, now)
    assert not is_expired(naive, 24, now.replace(tzinfo=None) - dt.timedelta(minutes=2))
    offset = dt.datetime(2025, 3, 2, 13, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))  # 11:00Z
    assert is_expired(offset, 0.9, now)
    assert not is_expired(offset, 1, now)
