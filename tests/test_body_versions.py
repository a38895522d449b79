"""Body versions as values: the registry, and settings checked with the body's own rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.body import versions
from target_catena_messages.body.build import BodyRules, build_body
from target_catena_messages.body.validate import BodyValidator, is_uuid
from target_catena_messages.errors import ConfigError
from target_catena_messages.settings import SETTINGS_SCHEMA, Settings
from tests.harness import run_target, sandbox_config, singer_lines

CONN = "019ddd87-eedd-710f-967c-1c6cc72ac985"
SENDER = "f9c7ee1c-2e16-5858-9b7e-ff7c89a4dd04"


def settings(**config: Any) -> Settings:
    return Settings.from_config({"dry_run": True, **config}, {})


def problems(**config: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings(**config)
    return caught.value.problems


def test_every_version_has_its_schema_and_the_setting_lists_them_all() -> None:
    names = versions.names()
    assert names[0] == versions.default().name == Settings().message_schema
    assert SETTINGS_SCHEMA["properties"]["message_schema"]["enum"] == list(names)
    for version in versions.all_versions():
        assert versions.get(version.name) is version
        assert version.schema["properties"]  # its JSON schema file is package data
        assert version.connection_field in version.field_order
        for field in version.user_ids:
            assert field.body_field in version.field_order
            assert field.source_field not in version.field_order  # read, never sent
        for field in version.setting_defaults:
            assert field in version.field_order
        for name in version.lane_fields:
            assert name in version.field_order
    with pytest.raises(ValueError, match="unknown message_schema 'v3'"):
        versions.get("v3")


def test_a_new_version_is_one_class() -> None:
    class Sketch(versions.BodyVersion):  # no name: an abstract helper, not registered
        lane_fields = ("recipient_id",)

    assert "Sketch" not in versions.names()
    assert Sketch().lane({"connection_id": "c", "recipient_id": "r"}) == "c|r"
    with pytest.raises(ValueError, match="defined twice"):

        class Again(versions.BodyVersion):
            name = versions.default().name


def test_version_specific_fallbacks_fill_only_their_version() -> None:
    for version in versions.all_versions():
        rules = BodyRules(version.name, default_connection_id=CONN, default_sender_id=SENDER)
        body = build_body({}, rules)
        expected = {version.connection_field: CONN}
        expected.update(dict.fromkeys(version.setting_defaults, SENDER))
        assert body == expected


def test_sync_and_user_ids_come_from_the_registry() -> None:
    by_sync = {v.name: v.supports_sync for v in versions.all_versions()}
    by_ids = {v.name: v.resolves_user_ids for v in versions.all_versions()}
    assert by_sync == {"source_ids": False, "catena_ids": True}
    assert by_ids == {"source_ids": False, "catena_ids": True}


@pytest.mark.parametrize(
    "value",
    [
        CONN.replace("-", ""),  # uuid.UUID takes it; the body's uuid format does not
        "{" + CONN + "}",
        "urn:uuid:" + CONN,
        "nope",
    ],
)
def test_settings_use_the_body_uuid_rule(value: str) -> None:
    assert not is_uuid(value)
    assert not BodyValidator("source_ids").is_valid({"connection_id": value, "message_text": "x"})
    assert problems(default_connection_id=value) == [
        f"default_connection_id must be a uuid, got {value!r}"
    ]
    assert problems(connection_id_by_fleet_ref={"f1": CONN, "f2": value}) == [
        f"connection_id_by_fleet_ref['f2'] must be a uuid, got {value!r}"
    ]
    assert problems(message_schema="catena_ids", default_sender_id=value) == [
        f"default_sender_id must be a uuid, got {value!r}"
    ]


def test_good_uuids_pass_in_any_case() -> None:
    s = settings(
        message_schema="catena_ids",
        default_connection_id=CONN.upper(),
        connection_id_by_fleet_ref={"f1": CONN},
        default_sender_id=SENDER,
        is_sync=True,
    )
    assert s.body_version is versions.get("catena_ids")


def test_a_setting_of_another_version_is_refused_naming_it() -> None:
    found = problems(default_sender_id=SENDER, is_sync=True)
    assert found == [
        "default_sender_id applies to message_schema catena_ids only (message_schema is "
        "source_ids)",
        "is_sync applies to message_schema catena_ids only (message_schema is source_ids)",
    ]
    assert settings(is_sync=False).message_schema == "source_ids"  # the default is not "set"


def test_an_unknown_version_is_one_problem() -> None:
    assert problems(message_schema="v3") == [
        "message_schema must be one of source_ids, catena_ids, got 'v3'"
    ]


def test_a_dashless_default_connection_is_one_error_at_start(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory({})
    bad = CONN.replace("-", "")
    records = [{"id": i, "message_text": f"m{i}", "source_recipient_ids": ["d"]} for i in (1, 2)]
    result = run_target(
        tmp_path,
        sandbox_config(sandbox.url, default_connection_id=bad),
        singer_lines("msgs", records, state_every=2),
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"default_connection_id must be a uuid, got {bad!r}" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.dead_letters == []
    assert result.states == []
    assert sandbox.stats()["requests"].get("messages", 0) == 0
