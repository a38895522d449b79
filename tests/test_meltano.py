"""The TMS -> Catena pipeline, proven with real Meltano, tap-postgres and PostgreSQL.

The repo's meltano.yml is run as users run it: ``meltano install`` (tap-postgres from PyPI, the
target from this repo), then ``meltano run`` against a PostgreSQL database loaded with
``sample_data/tms_schema.sql`` and the sandbox on loopback, five times:

1. first run: Catena receives exactly the outbound rows of the TMS, each mapped by the stream
   maps of meltano.yml (recipient, sender, fleet -> connection, priority, provider thread and
   reply ids only where the TMS holds them); Meltano stores the tap's bookmark;
2. new rows and an edited, already sent row, run as the scheduled job: only the new rows are
   sent. The tap re-reads the boundary row (``updated_at >= bookmark``) and the edited row; the
   target reports both as duplicates with their first operation ids, from the ledger;
3. a blank message, one to a driver without a provider id and one for a fleet without a
   connection: three dead letters (never an empty message, never a fleet broadcast); the target
   exits 2, Meltano fails the run and still keeps the target's safe STATE, so the bookmark moves
   past them; ``meltano invoke target-catena-messages:ledger`` reports them;
4. the runbook's re-drives: the configuration fix through ``meltano config set`` and the
   ``redrive`` command piped into ``meltano invoke``, the data fixes in the TMS through the next
   run (their bodies changed);
5. the runbook's ``--full-refresh`` (with ``allow_dead_letters``): nothing is sent again, and an
   old row the incremental runs never saw is expired by the age guard, not sent.

The consistency checks (meltano.yml, the Hub definition and ``--about`` say the same about every
setting) need no Meltano and run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import psycopg
import pytest
import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the typing group
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

from target_catena_messages.sandbox.server import Sandbox
from tests.harness import run_target, sandbox_config, singer_lines
from tests.meltano.project import (
    REPO,
    MeltanoProject,
    ensure_meltano,
    json_event,
    load_meltano_yml,
    make_project,
    meltano_schema_path,
    require_success,
    summaries,
)

STREAM = "tms-driver_message_outbox"
STATE_ID = "dev:tap-tms-to-target-catena-messages"
LEDGER_NAMESPACE = "tms-dispatch-messages"  # ledger_namespace in meltano.yml
CLIENT_SECRET = "meltano-test-secret-5f2d9c1e7a"
CONNECTIONS = {  # the Catena connection of each fleet, as in sample_data/sandbox.json
    "PLF": "3b6f7f2e-5d0a-4c1b-9f8e-2a7c4d9e1b10",
    "BRC": "8d2e4c6a-1f3b-4a5d-8c7e-9b0a1d2c3e41",
    "GCH": "c5a1e9d7-2b4f-4e6a-a8c0-7d3f5b9e1a62",
}
PRIORITY = {"URG": "high", "HIGH": "high", "NORM": "medium", "LOW": "low"}
# Settings singer-sdk adds to --about that this target does not offer in Meltano, and why.
NOT_OFFERED = {
    "add_record_metadata": "_sdc_ fields are never part of a Catena body",
    "load_method": "a message is sent once; there is nothing to upsert or overwrite",
    "faker_config": "needs singer-sdk's faker extra, which the target does not install",
}
KINDS = {"string": "string", "integer": "integer", "number": "decimal", "boolean": "boolean"}


# -- what the files say about the settings (no Meltano needed) --------------------------------


@pytest.fixture(scope="module")
def about() -> dict[str, Any]:
    """``target-catena-messages --about --format json``: what Meltano and the Hub must mirror."""
    proc = subprocess.run(
        [sys.executable, "-m", "target_catena_messages", "--about", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    value: dict[str, Any] = json.loads(proc.stdout)
    return value


def _expected_kind(prop: Mapping[str, Any]) -> str:
    if "enum" in prop or "allowed_values" in prop:
        return "options"
    types = [t for t in prop["type"] if t != "null"] if isinstance(prop["type"], list) else []
    kind = types[0] if types else prop["type"]
    return "object" if kind == "object" else KINDS[kind]


def _loader_definition() -> dict[str, Any]:
    (loader,) = load_meltano_yml()["plugins"]["loaders"]
    assert isinstance(loader, dict)
    return loader


def _hub_definition() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "target-catena-messages.yml").read_text())
    return data


@pytest.mark.parametrize("source", ["meltano.yml", "target-catena-messages.yml"])
def test_plugin_settings_match_the_target(source: str, about: dict[str, Any]) -> None:
    definition = _loader_definition() if source == "meltano.yml" else _hub_definition()
    properties: dict[str, dict[str, Any]] = about["settings"]["properties"]
    settings = {s["name"]: s for s in definition["settings"]}
    assert set(settings) == set(properties) - set(NOT_OFFERED)
    assert definition["capabilities"] == about["capabilities"]
    for name, prop in properties.items():
        if name in NOT_OFFERED:
            continue
        setting = settings[name]
        assert setting["kind"] == _expected_kind(prop), name
        # ledger_url may carry a database password: hidden in Meltano although not a secret.
        secret = bool(prop.get("secret")) or name == "ledger_url"
        assert bool(setting.get("sensitive")) == secret, name
        assert setting.get("value") == prop.get("default"), name
        if setting["kind"] == "options":
            assert [o["value"] for o in setting["options"]] == prop["enum"], name
        assert setting["env"] == f"TARGET_CATENA_MESSAGES_{name.upper()}", name
        assert setting["description"], name


def test_hub_definition_is_the_meltano_yml_plugin() -> None:
    hub, loader = _hub_definition(), _loader_definition()
    keys = (
        "name",
        "namespace",
        "executable",
        "capabilities",
        "settings_group_validation",
        "commands",
    )
    for key in keys:
        assert hub[key] == loader[key], key
    by_name = {s["name"]: s for s in loader["settings"]}
    assert {s["name"]: s for s in hub["settings"]} == by_name
    # Installable as shipped: from the checkout the docs put in the project (not on PyPI yet).
    assert hub["pip_url"] == "$MELTANO_PROJECT_ROOT/plugins/target-catena-messages"
    for key in ("label", "description", "domain_url", "maintenance_status"):
        assert hub[key], key
    # variant and repo are the publisher's to add; no placeholder in the meantime.
    assert "variant" not in hub
    assert "repo" not in hub
    assert "OWNER" not in (REPO / "target-catena-messages.yml").read_text()


def test_settings_that_mean_nothing_here_are_not_offered(about: dict[str, Any]) -> None:
    properties = about["settings"]["properties"]
    assert "load_method" not in properties
    assert "faker_config" not in properties
    assert "stream_maps" in properties  # the rest of the SDK's built-ins stay


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("bodyy", "uses 'bodyy', which is not a field of the record (did you mean 'body'?)"),
        ("body.upper_case()", "failed: Attribute 'upper_case' does not exist"),
    ],
)
def test_a_map_expression_error_names_stream_setting_name_and_fields(
    tmp_path: Path, expression: str, expected: str
) -> None:
    maps = {STREAM: {"__key_properties__": ["message_id"], "message_text": expression}}
    row = {"message_id": 1, "body": "Gate 4", "fleet_code": "PLF"}
    result = run_target(
        tmp_path,
        {"dry_run": True, "default_connection_id": CONNECTIONS["PLF"], "stream_maps": maps},
        singer_lines(STREAM, [row], key_properties=["message_id"]),
    )
    assert result.returncode == 1
    (fatal,) = [line for line in result.stderr.splitlines() if "fatal:" in line]
    assert f"Stream '{STREAM}': the map expression stream_maps.{STREAM}.message_text" in fatal
    assert repr(expression) in fatal
    assert expected in fatal
    assert "body, fleet_code, message_id" in fatal  # the fields the record has
    assert "MapExpressionError" not in result.stderr


def test_an_unknown_fleet_ref_is_named_in_the_dead_letter(tmp_path: Path) -> None:
    rows = [
        {
            "message_id": 1,
            "message_text": "Gate 4",
            "fleet_ref": "NWX",
            "source_recipient_ids": ["PLF-D1"],
        }
    ]
    result = run_target(
        tmp_path,
        {"dry_run": True, "connection_id_by_fleet_ref": {"PLF": CONNECTIONS["PLF"]}},
        singer_lines(STREAM, rows, key_properties=["message_id"]),
    )
    (letter,) = result.dead_letters
    (error,) = [e for e in letter["errors"] if e["field"] == "connection_id"]
    assert error["message"] == (
        "no connection for fleet_ref 'NWX': add it to connection_id_by_fleet_ref "
        "(fleets configured: PLF) or set default_connection_id"
    )


def test_a_duplicate_whose_body_changed_says_so_and_what_to_do(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    def row(key: int, text: str) -> dict[str, Any]:
        return {"message_id": key, "message_text": text, "source_recipient_ids": ["PLF-D1"]}

    config = sandbox_config(sandbox.url, default_connection_id=CONNECTIONS["PLF"])
    first = run_target(
        tmp_path,
        config,
        singer_lines(STREAM, [row(1, "Dock 3"), row(2, "Dock 4")], key_properties=["message_id"]),
    )
    assert first.returncode == 0, first.stderr
    assert "not sent again" not in first.stderr
    edited = [row(1, "Dock 3, booked Thursday 07:30"), row(2, "Dock 4")]
    second = run_target(
        tmp_path, config, singer_lines(STREAM, edited, key_properties=["message_id"])
    )
    assert second.summary is not None
    assert second.summary["totals"]["duplicates"] == 2
    assert len(sandbox.accepted_bodies()) == 2
    (hint,) = [line for line in second.stderr.splitlines() if "not sent again" in line]
    assert f"1 duplicate in stream {STREAM} not sent again although the body changed" in hint
    assert "(keys 1)" in hint  # only the edited one
    assert "give it a new message (a new key)" in hint


def _shown_stream_map(text: str) -> dict[str, Any]:
    """The stream map for the TMS outbox that a document shows (its first yaml block with one)."""
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL):
        data = yaml.safe_load(textwrap.dedent(block))
        data = data.get("config", data) if isinstance(data, dict) else data
        if isinstance(data, dict) and STREAM in (data.get("stream_maps") or {}):
            found: dict[str, Any] = data["stream_maps"][STREAM]
            return found
    raise AssertionError("no stream map for " + STREAM)


def _readme_stream_map() -> dict[str, Any]:
    return _shown_stream_map((REPO / "README.md").read_text(encoding="utf-8"))


def test_sample_maps_broadcast_only_when_the_tms_row_asks(tmp_path: Path, sandbox: Sandbox) -> None:
    config = _loader_definition()["config"]
    maps = config["stream_maps"][STREAM]
    readme = _readme_stream_map()
    assert {name: maps.get(name) for name in readme} == readme  # README and meltano.yml agree
    hub = _shown_stream_map(_hub_definition()["usage"])
    assert {name: maps.get(name) for name in hub} == hub  # so does the Hub definition's usage
    for name in ("mode", "recipient_group", "source_recipient_ids"):
        assert readme[name] == maps[name] == hub[name], name

    def row(key: int, driver: int | None, to_all_drivers: bool) -> dict[str, Any]:
        # A row of tms.driver_message_outbox as tap-postgres emits it.
        return {
            "message_id": key,
            "fleet_code": "PLF",
            "load_number": None,
            "driver_id": driver,
            "to_all_drivers": to_all_drivers,
            "driver_eld_id": f"PLF-D{driver}" if driver else None,
            "dispatcher_eld_id": "PLF-DSP-1",
            "body": f"message {key}",
            "priority_code": "NORM",
            "provider_thread_id": None,
            "reply_to_provider_message_id": None,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "updated_at": datetime.now(timezone.utc).isoformat(),
        }

    rows = [row(1, 1041, False), row(2, None, False), row(3, None, True)]
    result = run_target(
        tmp_path,
        sandbox_config(sandbox.url, **config),
        singer_lines(STREAM, rows, key_properties=["message_id"]),
    )
    assert result.returncode == 2, result.stderr  # the driverless row is a dead letter
    (letter,) = result.dead_letters
    assert (letter["key"], letter["stage"]) == ("2", "validation")
    assert any(e["field"].startswith("source_recipient_ids") for e in letter["errors"])
    bodies = {b["message_text"]: b for b in sandbox.accepted_bodies()}
    assert set(bodies) == {"message 1", "message 3"}
    assert (bodies["message 1"]["mode"], bodies["message 1"]["source_recipient_ids"]) == (
        "direct",
        ["PLF-D1041"],
    )
    assert (bodies["message 3"]["mode"], bodies["message 3"]["recipient_group"]) == (
        "group",
        "driver",
    )
    assert "source_recipient_ids" not in bodies["message 3"]


def _demo(output: Path, *args: str) -> dict[str, Any]:
    """``scripts/demo ARGS`` writing to ``output``; its summary."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "demo"), *args],
        env={**os.environ, "DEMO_OUTPUT": str(output)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # the script's own status, not the target's
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith('{"summary":')]
    summary: dict[str, Any] = json.loads(line)["summary"]
    return summary


def test_the_demo_run_again_sends_nothing_as_the_readme_says(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "`./scripts/demo --again`" in readme
    assert "reports 291 duplicates and the 9 bad rows" in readme
    output = tmp_path / "demo"
    first = _demo(output)
    assert (first["totals"]["accepted"], first["totals"]["dead_lettered"]) == (291, 9)
    again = _demo(output, "--again")
    assert again["totals"]["accepted"] == 0
    assert again["totals"]["duplicates"] == 291
    assert again["totals"]["previously_dead_lettered"] == 9
    assert again["exit_code"] == 0
    assert again["http"]["requests"] == 0
    fresh = _demo(output)  # without --again: a fresh start, the ledger wiped with output/
    assert fresh["totals"]["accepted"] == 291


# -- the pipeline with real Meltano -------------------------------------------------------------


@pytest.fixture(scope="module")
def meltano() -> Path:
    return ensure_meltano()


@pytest.fixture
def tms(pg_url: str) -> Iterator[str]:
    """The TMS database: the pg_url database with schema ``tms`` loaded fresh."""
    sql = (REPO / "sample_data" / "tms_schema.sql").read_text(encoding="utf-8")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql)  # a trusted file: several statements, no parameters
    yield pg_url
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS tms CASCADE")


def _tap_url(pg_url: str) -> str:
    # tap-postgres insists on a password in the URL; a trust-auth server ignores it.
    url = make_url(pg_url)
    return url.set(password=url.password or "unused").render_as_string(hide_password=False)


def _outbox(pg_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(pg_url, row_factory=dict_row) as conn:
        rows = conn.execute("SELECT * FROM tms.driver_message_outbox ORDER BY updated_at")
        return list(rows)


def _body(row: Mapping[str, Any]) -> dict[str, Any]:
    """The Catena body a TMS outbox row must become (the stream maps, written out by hand)."""
    body = {
        "connection_id": CONNECTIONS[row["fleet_code"]],
        "fleet_ref": row["fleet_code"],
        "source_sender_id": row["dispatcher_eld_id"],
        "sender_group": "dispatcher",
        "message_text": row["body"],
        "priority": PRIORITY[row["priority_code"]],
    }
    if row["to_all_drivers"]:
        body |= {"mode": "group", "recipient_group": "driver"}
    else:
        body |= {"mode": "direct", "source_recipient_ids": [row["driver_eld_id"]]}
    if row["provider_thread_id"]:
        body["source_thread_id"] = row["provider_thread_id"]
    if row["reply_to_provider_message_id"]:
        body["source_reply_to_message_id"] = row["reply_to_provider_message_id"]
    return body


def _by_text(bodies: list[Any]) -> dict[str, dict[str, Any]]:
    texts = {body["message_text"]: body for body in bodies}
    assert len(texts) == len(bodies), "a message was sent twice"
    return texts


def _bookmark(state: Mapping[str, Any]) -> datetime:
    value = state["singer_state"]["bookmarks"][STREAM]
    assert value["replication_key"] == "updated_at"
    return datetime.fromisoformat(value["replication_key_value"])


def _operations(project: MeltanoProject, state: Mapping[str, Any]) -> dict[str, str]:
    """Every accepted key's operation id, from the ledger (README: finding out what happened).

    Meltano keeps only the target's last STATE line, whose ``operations`` list what resolved
    since the line before it; the ledger has them all. The stored list must agree with it.
    """
    with sqlite3.connect(project.target_dir / "ledger.sqlite") as ledger:
        rows = ledger.execute(
            "SELECT key, operation_id FROM catena_message_ledger"
            " WHERE namespace = ? AND status = 'accepted'",
            (LEDGER_NAMESPACE,),
        ).fetchall()
    accepted = dict(rows)
    for stream, key, op in state["singer_state"]["target_catena_messages"]["operations"]:
        assert (stream, accepted.get(key)) == (STREAM, op), (key, op)
    return accepted


def _execute(pg_url: str, sql: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql)


def _run(
    project: MeltanoProject,
    *args: str,
    env: Mapping[str, str] | None = None,
    exit_code: int = 0,
    output: list[str] | None = None,
) -> dict[str, Any]:
    """``meltano ARGS``; the target's summary for the stream, after checking the exit codes.

    ``output``, when given, receives Meltano's whole output.
    """
    proc = project.run(*args, env=env)
    text = proc.stdout + proc.stderr
    if exit_code == 0:
        require_success(proc, args)
    else:
        assert proc.returncode != 0, text  # Meltano fails the run when the loader does
    assert CLIENT_SECRET not in text
    (summary,) = summaries(text)
    assert summary["exit_code"] == exit_code, text
    if output is not None:
        output.append(text)
    stream: dict[str, Any] = summary["streams"][STREAM]
    return stream


def _summary_lines(output: str) -> list[str]:
    """The summary's human lines as Meltano's text log format shows them, without the prefix."""
    lines = output.splitlines()
    (start,) = [i for i, line in enumerate(lines) if "Catena delivery summary, run" in line]
    shown = []
    for line in lines[start:]:
        if '{"summary":' in line:
            return shown
        shown.append(re.sub(r"^\S+ \[[^\]]*\] \S+ ", "", line).strip())  # time [level] plugin
    raise AssertionError('no {"summary": ...} line after the summary')


@pytest.mark.meltano
def test_meltano_yml_is_valid_meltano_4(meltano: Path, tmp_path: Path) -> None:
    schema = json.loads(meltano_schema_path().read_text())
    jsonschema.validate(load_meltano_yml(), schema)
    project = make_project(tmp_path / "project", meltano, {})
    listed = project.run("schedule", "list", "--format=json")
    require_success(listed, ["schedule", "list"])
    (schedule,) = json.loads(listed.stdout)["schedules"]["job"]
    assert schedule["job"] == {"name": "tms-to-catena", "tasks": ["tap-tms target-catena-messages"]}


def _documented_add_command() -> list[str]:
    """The `meltano add` line for the loader, as docs/meltano.md shows it (README must agree)."""
    prefix = "meltano add --plugin-type loader target-catena-messages --from-ref "
    docs = (REPO / "docs" / "meltano.md").read_text(encoding="utf-8")
    (line,) = [x.strip() for x in docs.splitlines() if x.strip().startswith(prefix)]
    assert line in (REPO / "README.md").read_text(encoding="utf-8")
    return shlex.split(line)[1:]


def _checkout(destination: Path) -> None:
    """This working tree's files as a clone would have them (no venvs, no ignored files)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.mark.meltano
def test_meltano_add_as_documented_gives_one_loader_that_installs(
    meltano: Path, tmp_path: Path
) -> None:
    """A fresh `meltano init` project, the docs' commands verbatim, the definition as shipped."""
    env = make_project(tmp_path / "unused", meltano, {}).env
    init = subprocess.run(
        [str(meltano), "init", "tms-pipeline", "--no_usage_stats"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    fresh = MeltanoProject(tmp_path / "tms-pipeline", meltano, env)
    _checkout(fresh.root / "plugins" / "target-catena-messages")  # the docs' `git clone`
    require_success(fresh.run(*_documented_add_command()), ["add"])

    plugins = load_meltano_yml(fresh.root / "meltano.yml")["plugins"]
    assert list(plugins) == ["loaders"], plugins.keys()  # no stray utility, nothing else
    (loader,) = plugins["loaders"]
    assert loader["name"] == "target-catena-messages"
    assert {s["name"] for s in loader["settings"]} == {
        s["name"] for s in _hub_definition()["settings"]
    }
    assert "OWNER" not in (fresh.root / "meltano.yml").read_text()

    require_success(fresh.run("install"), ["install"])  # pip_url as shipped, nothing rewritten
    about = fresh.run("invoke", "target-catena-messages", "--about", "--format", "json")
    require_success(about, ["invoke", "--about"])
    assert json.loads(about.stdout)["name"] == "target-catena-messages"


NEW_ROWS = """
INSERT INTO tms.dispatch_messages
    (message_id, fleet_id, load_id, direction, driver_id, dispatcher_id, body, priority_code,
     thread_root_id, in_reply_to_id, provider_message_id, provider_thread_id, to_all_drivers)
VALUES
    (90120, 3, 5004, 'inbound', 311, 301, 'Dock 3 is blocked by a yard truck.', 'NORM',
     90012, 90013, 'pm-gch-5d77', 'pt-gch-3f02', false),
    (90121, 3, 5004, 'outbound', 311, 301, 'Use dock 5, the receiver knows you are coming.',
     'HIGH', 90012, 90120, NULL, NULL, false),
    (90122, 2, NULL, 'outbound', NULL, 201,
     'Roanoke yard gate closes at 22:00 tonight for paving; park on Shenandoah Ave.', 'LOW',
     NULL, NULL, NULL, NULL, true);
-- A dispatcher edits a message the driver already has: the trigger moves updated_at.
UPDATE tms.dispatch_messages SET body = body || ' Booked: Thursday 07:30.' WHERE message_id = 90011;
"""

# Three bad rows and a good one: a blank message (a UI bug in the TMS), one to a driver the
# telematics provider has no account for yet (Nadia: no eld_driver_id; a dead letter, never a
# broadcast) and one for a fleet just onboarded, whose Catena connection is not configured yet.
BAD_ROWS = """
INSERT INTO tms.fleets VALUES (4, 'NWX', 'Northwest Express LLC', 'Spokane, WA', '4410021');
INSERT INTO tms.dispatchers VALUES (401, 4, 'Carl Jensen', 'cjensen@nwx.example', 'NWX-DSP-1');
INSERT INTO tms.drivers VALUES (501, 4, 'N-501', 'Dana', 'Pryor', '501', 'NWX-501', 'active');
INSERT INTO tms.dispatch_messages
    (message_id, fleet_id, direction, driver_id, dispatcher_id, body, priority_code)
VALUES (90140, 1, 'outbound', 1047, 101, '   ', 'NORM'),
       (90141, 1, 'outbound', 1047, 101, 'Tom, fuel at the Lincoln terminal, not on the road.',
        'NORM'),
       (90142, 1, 'outbound', 1050, 102, 'Nadia, orientation ride-along Monday 06:00, gate 2.',
        'NORM'),
       (90143, 4, 'outbound', 501, 401, 'Welcome to NWX, Dana: first load Monday from Spokane.',
        'NORM');
"""
NWX_CONNECTION = "d2b7c1a4-5e6f-4a8b-9c0d-1e2f3a4b5c6d"
# Data fixes in the TMS: the message itself; the driver, then a touch of the message.
FIXES = """
UPDATE tms.dispatch_messages SET body = 'Tom, truck 1430 is booked at the shop Monday 07:00.'
WHERE message_id = 90140;
UPDATE tms.drivers SET eld_driver_id = 'PLF-D1050' WHERE driver_id = 1050;
UPDATE tms.dispatch_messages SET body = body WHERE message_id = 90142;
"""

# A row migrated into the TMS with its old times: below every bookmark, so only a full refresh
# reads it, and three days old, so the age guard must expire it instead of sending it.
OLD_ROW = """
INSERT INTO tms.dispatch_messages
    (message_id, fleet_id, direction, driver_id, dispatcher_id, body, created_at, updated_at)
VALUES (90130, 1, 'outbound', 1047, 101, 'Reminder: log your pre-trip inspection.',
        now() - interval '3 days', now() - interval '3 days');
"""


def _first_run(project: MeltanoProject, tms: str, sandbox: Sandbox) -> dict[str, str]:
    """Every outbound row, mapped as the stream maps say, exactly once; the bookmark stored."""
    output: list[str] = []
    first = _run(project, "run", "tap-tms", "target-catena-messages", output=output)
    # Meltano's text format: one event per summary line, each readable without its indentation.
    shown = _summary_lines(output[0])
    assert shown[0].endswith("exit code 0 (finished)")
    assert f"stream {STREAM}:" in shown
    assert [line.split()[-1] for line in shown if line.startswith("accepted")] == ["12"]
    rows = _outbox(tms)
    assert len(rows) == 12
    received = _by_text(sandbox.accepted_bodies())
    assert received == {row["body"]: _body(row) for row in rows}
    assert first["accepted"] == 12
    # The cases the stream maps exist for, spelled out.
    body = {row["message_id"]: received[row["body"]] for row in rows}
    assert body[90005]["source_thread_id"] == "pt-plf-1b07"  # a reply to a driver's message
    assert body[90005]["source_reply_to_message_id"] == "pm-plf-7f31c9"
    assert body[90005]["priority"] == "high"
    assert body[90007]["mode"] == "group"  # to every PLF driver
    assert "source_recipient_ids" not in body[90007]
    assert "source_thread_id" not in body[90013]  # a thread the dispatcher started: no provider id
    assert body[90013]["connection_id"] == CONNECTIONS["GCH"]

    state = project.state(STATE_ID)
    assert _bookmark(state) == rows[-1]["updated_at"]
    operations = _operations(project, state)
    assert set(operations) == {str(row["message_id"]) for row in rows}
    assert set(operations.values()) == {op["id"] for op in sandbox.operations()}
    assert (project.target_dir / "ledger.sqlite").exists()  # under $MELTANO_PROJECT_ROOT
    return operations


def _incremental_run(
    project: MeltanoProject, tms: str, sandbox: Sandbox, first_ops: Mapping[str, str]
) -> None:
    """New rows are sent; the re-read boundary row and an edited row are duplicates."""
    boundary = str(_outbox(tms)[-1]["message_id"])
    _execute(tms, NEW_ROWS)
    output: list[str] = []
    second = _run(project, "run", "tms-to-catena", output=output)  # the job, as scheduled
    # The edited row is a duplicate, and the target says its body changed and what to do.
    (hint,) = [line for line in output[0].splitlines() if "not sent again although" in line]
    assert "1 duplicate in stream" in hint
    assert "(keys 90011)" in hint
    assert "a new key" in hint
    rows = _outbox(tms)
    new = {row["message_id"]: _body(row) for row in rows if row["message_id"] in (90121, 90122)}
    received = _by_text(sandbox.accepted_bodies())
    assert len(received) == 14
    assert [received[body["message_text"]] for body in new.values()] == list(new.values())
    assert new[90121]["source_thread_id"] == "pt-gch-3f02"  # the driver's reply opened it
    assert new[90121]["source_reply_to_message_id"] == "pm-gch-5d77"
    assert (second["accepted"], second["duplicates"]) == (2, 2)  # duplicates: boundary, edited
    state = project.state(STATE_ID)
    assert _bookmark(state) == rows[-1]["updated_at"]
    operations = _operations(project, state)
    assert len(operations) == 14
    assert operations[boundary] == first_ops[boundary]
    assert operations["90011"] == first_ops["90011"]


def _failed_run_and_redrive(project: MeltanoProject, tms: str, sandbox: Sandbox) -> None:
    """Dead letters fail the run, Meltano keeps the safe state; both re-drives of the runbook."""
    _execute(tms, BAD_ROWS)
    output: list[str] = []
    failed = _run(project, "--log-format=json", "run", "tms-to-catena", exit_code=2, output=output)
    assert (failed["accepted"], failed["dead_lettered"]) == (1, 3)
    # With --log-format=json the summary is one event whose fields a log pipeline can read.
    events = [e for e in map(json_event, output[0].splitlines()) if e is not None]
    (headline,) = [e for e in events if str(e["event"]).startswith("Catena delivery summary")]
    assert (headline["exit_code"], headline["accepted"], headline["dead_lettered"]) == (2, 1, 3)
    assert headline["dead_letters_written"] == 3
    assert (
        headline["catena_summary"]["streams"][STREAM]["dead_lettered_by_stage"]["validation"] == 3
    )
    assert headline["level"] == "warning"
    stage_rows = [str(e["event"]).strip() for e in events if "(validation)" in str(e["event"])]
    assert [row.split()[-1] for row in stage_rows] == ["3"]
    assert stage_rows[0].startswith("dead-lettered, invalid record (validation)")
    assert len(sandbox.accepted_bodies()) == 15
    assert _bookmark(project.state(STATE_ID)) == _outbox(tms)[-1]["updated_at"]
    letters = {letter["key"]: letter for letter in _dead_letters(project)}
    assert sorted(letters) == ["90140", "90142", "90143"]
    assert {letters[key]["stage"] for key in letters} == {"validation"}
    assert letters["90140"]["errors"][0]["field"] == "message_text"
    assert letters["90142"]["errors"][0]["field"].startswith("source_recipient_ids")
    assert letters["90143"]["errors"][0]["field"] == "connection_id"
    report = project.run("invoke", "target-catena-messages:ledger", "--json")
    require_success(report, ["invoke", "target-catena-messages:ledger"])
    assert json.loads(report.stdout)["counts"][LEDGER_NAMESPACE]["dead_lettered"] == 3

    # A configuration cause: fix meltano.yml, re-drive the dead letter through Meltano.
    fix = ("config", "set", "target-catena-messages", "connection_id_by_fleet_ref.NWX")
    require_success(project.run(*fix, NWX_CONNECTION), fix)
    redrive = project.run("invoke", "target-catena-messages:redrive", "--key", "90143")
    require_success(redrive, ["invoke", "target-catena-messages:redrive"])
    # As the runbook says: straight into the target, stream maps and all (not applied to it).
    target = project.run("invoke", "target-catena-messages", stdin=redrive.stdout)
    require_success(target, ["invoke", "target-catena-messages"])
    (summary,) = summaries(target.stderr)
    assert summary["streams"][STREAM]["accepted"] == 1
    dana = _by_text(sandbox.accepted_bodies())[
        "Welcome to NWX, Dana: first load Monday from Spokane."
    ]
    assert dana["connection_id"] == NWX_CONNECTION

    # Data causes: fix the rows in the TMS; the next run reads and sends them.
    _execute(tms, FIXES)
    redriven = _run(project, "run", "tms-to-catena")
    assert (redriven["accepted"], redriven["duplicates"]) == (2, 2)  # the boundary rows
    received = _by_text(sandbox.accepted_bodies())
    assert len(received) == 18
    nadia = received["Nadia, orientation ride-along Monday 06:00, gate 2."]
    assert nadia["source_recipient_ids"] == ["PLF-D1050"]
    assert "Tom, truck 1430 is booked at the shop Monday 07:00." in received


def _full_refresh(project: MeltanoProject, tms: str, sandbox: Sandbox) -> None:
    """As in the runbook: nothing resent; an old row never seen before is expired, not sent."""
    _execute(tms, OLD_ROW)
    third = _run(
        project,
        "run",
        "--full-refresh",
        "tms-to-catena",
        env={"TARGET_CATENA_MESSAGES_ALLOW_DEAD_LETTERS": "true"},
    )
    assert len(sandbox.accepted_bodies()) == 18
    assert (third["accepted"], third["duplicates"], third["expired"]) == (0, 18, 1)
    assert [(d["key"], d["stage"]) for d in _dead_letters(project)][3:] == [("90130", "expired")]
    assert _bookmark(project.state(STATE_ID)) == _outbox(tms)[-1]["updated_at"]


def _dead_letters(project: MeltanoProject) -> list[dict[str, Any]]:
    path = project.target_dir / "dead-letters.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.meltano
@pytest.mark.postgres
def test_tms_to_catena_with_meltano_tap_postgres_and_postgresql(
    meltano: Path, tms: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    project = make_project(
        tmp_path / "project",
        meltano,
        {
            "TAP_TMS_SQLALCHEMY_URL": _tap_url(tms),
            "TARGET_CATENA_MESSAGES_API_URL": sandbox.url,
            "TARGET_CATENA_MESSAGES_AUTH_URL": (
                f"{sandbox.url}/realms/catena/protocol/openid-connect/token"
            ),
            "TARGET_CATENA_MESSAGES_CLIENT_ID": "meltano-test",
            "TARGET_CATENA_MESSAGES_CLIENT_SECRET": CLIENT_SECRET,
        },
    )
    try:
        require_success(project.run("install"), ["install"])
        first_ops = _first_run(project, tms, sandbox)
        _incremental_run(project, tms, sandbox, first_ops)
        _failed_run_and_redrive(project, tms, sandbox)
        _full_refresh(project, tms, sandbox)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n(every Meltano command's output: {project.root / 'commands.log'})"
        ) from exc
