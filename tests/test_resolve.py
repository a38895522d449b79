"""catena_ids from real TMS data: provider driver ids resolved to Catena user ids."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from target_catena_messages.body.validate import BodyValidator
from target_catena_messages.pipeline.users import Wanted, wanted
from tests.harness import run_target, sandbox_config, singer_lines

CONN = "33333333-3333-4333-8333-333333333333"
OTHER = "44444444-4444-4444-8444-444444444444"
DISPATCHER = "dispatcher-1"


def users(n: int, connection_id: str = CONN) -> list[dict[str, Any]]:
    seeded = [
        {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{connection_id}/{i}")),
            "source_id": f"drv-{i}",
            "connection_id": connection_id,
            "is_driver": True,
            "first_name": f"Driver{i}",
            "last_name": "Test",
        }
        for i in range(n)
    ]
    seeded.append(
        {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{connection_id}/dispatcher")),
            "source_id": DISPATCHER,
            "connection_id": connection_id,
            "is_driver": False,
            "first_name": "Dispatch",
            "last_name": "Desk",
        }
    )
    return seeded


def user_id(source_id: str, connection_id: str = CONN) -> str:
    suffix = "dispatcher" if source_id == DISPATCHER else source_id.removeprefix("drv-")
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{connection_id}/{suffix}"))


def record(i: int, driver: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": i,
        "connection_id": CONN,
        "sender_source_id": DISPATCHER,
        "recipient_source_id": driver,
        "message_text": f"message {i} for {driver}",
        **extra,
    }


def config(url: str, **extra: Any) -> dict[str, Any]:
    return sandbox_config(url, message_schema="catena_ids", **extra)


def test_wanted_is_pure_and_only_asks_for_missing_ids() -> None:
    body = {"connection_id": CONN, "sender_id": user_id(DISPATCHER), "message_text": "hi"}
    assert wanted({"recipient_source_id": "a"}, body) == Wanted(recipient="a")
    assert wanted({"recipient_source_id": "a"}, {"recipient_id": "x"}) == Wanted()
    assert wanted({"recipient_source_id": ["a"]}, body) == Wanted(recipient="a")
    many = wanted({"recipient_source_id": ["a", "b"]}, {})
    assert many.error is not None
    assert many.error["field"] == "recipient_source_id"
    # a provider id on the record beats default_sender_id, which build_body already applied
    assert wanted({"sender_source_id": "d"}, {"sender_id": "default"}).sender == "d"
    assert wanted({"sender_source_id": "d", "sender_id": "x"}, {"sender_id": "x"}).sender is None


def test_provider_ids_become_catena_user_ids(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory({"message_schema": "catena_ids", "users": users(5)})
    recs = [record(i, f"drv-{i % 5}") for i in range(1, 11)]
    result = run_target(tmp_path, config(sandbox.url), singer_lines("msgs", recs, state_every=10))
    assert result.returncode == 0, result.stderr
    bodies = sandbox.accepted_bodies()
    assert len(bodies) == 10
    for body in bodies:
        i = int(body["message_text"].split()[1])
        assert body["recipient_id"] == user_id(f"drv-{i % 5}")
        assert body["sender_id"] == user_id(DISPATCHER)
        assert "recipient_source_id" not in body
        assert "sender_source_id" not in body


def test_lookups_are_batched_by_100_and_cached_for_the_run(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory({"message_schema": "catena_ids", "users": users(250)})
    recs = [record(i, f"drv-{i % 250}") for i in range(1, 501)]  # every driver twice
    result = run_target(
        tmp_path,
        config(sandbox.url, batch_size_rows=500),
        singer_lines("msgs", recs, state_every=100),
    )
    assert result.returncode == 0, result.stderr
    assert len(sandbox.accepted_bodies()) == 500
    # 251 distinct ids (250 drivers + dispatcher) in one batch: 3 requests of at most 100 ids
    assert sandbox.stats()["requests"]["users"] == 3


def test_cache_spans_batches(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory({"message_schema": "catena_ids", "users": users(3)})
    recs = [record(i, f"drv-{i % 3}") for i in range(1, 41)]
    result = run_target(
        tmp_path,
        config(sandbox.url, batch_size_rows=5),
        singer_lines("msgs", recs, state_every=10),
    )
    assert result.returncode == 0, result.stderr
    assert sandbox.stats()["requests"]["users"] == 1  # 4 ids, asked once, in the first batch


def test_unknown_driver_is_a_dead_letter_naming_id_and_connection(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory(
        {"message_schema": "catena_ids", "users": users(2) + users(1, connection_id=OTHER)}
    )
    recs = [record(1, "drv-0"), record(2, "drv-9"), record(3, "drv-1")]
    result = run_target(tmp_path, config(sandbox.url), singer_lines("msgs", recs, state_every=3))
    assert result.returncode == 2
    [dead] = result.dead_letters
    assert dead["key"] == "2"
    assert dead["stage"] == "validation"
    [error] = dead["errors"]
    assert error["field"] == "recipient_source_id"
    assert "'drv-9'" in error["message"]
    assert CONN in error["message"]
    assert len(sandbox.accepted_bodies()) == 2


def test_more_than_one_recipient_is_a_validation_dead_letter(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory({"message_schema": "catena_ids", "users": users(3)})
    recs = [record(1, "drv-0"), record(2, "drv-0", recipient_source_id=["drv-1", "drv-2"])]
    result = run_target(tmp_path, config(sandbox.url), singer_lines("msgs", recs, state_every=2))
    assert result.returncode == 2
    [dead] = result.dead_letters
    assert dead["errors"][0]["field"] == "recipient_source_id"
    assert "one recipient_id" in dead["errors"][0]["message"]


def test_429_during_resolution_is_waited_out(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory(
        {
            "message_schema": "catena_ids",
            "users": users(4),
            "faults": {
                "seed": 1,
                "rules": [
                    {
                        "kind": "status",
                        "endpoint": "users",
                        "status": 429,
                        "retry_after_seconds": 1,
                        "match": {"requests": [1, 2]},
                    }
                ],
            },
        }
    )
    recs = [record(i, f"drv-{i % 4}") for i in range(1, 9)]
    result = run_target(tmp_path, config(sandbox.url), singer_lines("msgs", recs, state_every=8))
    assert result.returncode == 0, result.stderr
    assert len(sandbox.accepted_bodies()) == 8
    assert sandbox.stats()["requests"]["users"] == 3


def test_dry_run_validates_without_lookups(tmp_path: Path, sandbox_factory: Any) -> None:
    sandbox = sandbox_factory({"message_schema": "catena_ids", "users": users(2)})
    recs = [record(1, "drv-0"), record(2, "drv-1", priority="urgent")]
    result = run_target(
        tmp_path,
        {"dry_run": True, "message_schema": "catena_ids", "api_url": sandbox.url},
        singer_lines("msgs", recs),
    )
    assert result.returncode == 2
    assert [d["key"] for d in result.dead_letters] == ["2"]
    assert sandbox.stats()["requests"].get("users", 0) == 0


def test_wanted_validates_the_rest_of_the_body_before_any_lookup() -> None:
    body = {"connection_id": "not-a-uuid", "message_text": "hi", "priority": "urgent"}
    found = wanted({"recipient_source_id": "a", "sender_source_id": "b"}, body)
    assert found.recipient == "a"
    assert found.sender == "b"
    # the ids to resolve are not reported missing; everything else is, each field once
    assert [e["field"] for e in found.errors] == ["connection_id", "priority"]
    assert found.error == found.errors[0]
    assert "must be a uuid, got 'not-a-uuid'" in found.errors[0]["message"]
    # an unusable provider id comes first, then the body's own errors
    many = wanted({"recipient_source_id": ["a", "b"], "sender_source_id": "c"}, body)
    assert [e["field"] for e in many.errors] == ["recipient_source_id", "connection_id", "priority"]
    # the run's validator adds the message_text rule
    validator = BodyValidator("catena_ids")
    blank = {"connection_id": CONN, "sender_id": user_id(DISPATCHER), "message_text": " "}
    assert wanted({"recipient_source_id": "a"}, blank).errors == ()
    [text] = wanted({"recipient_source_id": "a"}, blank, validator=validator).errors
    assert text["field"] == "message_text"


def test_malformed_connection_is_a_validation_dead_letter_without_a_users_query(
    tmp_path: Path, sandbox_factory: Any
) -> None:
    sandbox = sandbox_factory({"message_schema": "catena_ids", "users": users(3)})
    bad = CONN.replace("-", "")  # looks like a uuid; the users endpoint answers it with a 422
    recs = [record(1, "drv-0", connection_id=bad), record(2, "drv-1", connection_id=bad)]
    result = run_target(tmp_path, config(sandbox.url), singer_lines("msgs", recs, state_every=2))
    assert result.returncode == 2, result.stderr[-2000:]
    assert sandbox.stats()["requests"].get("users", 0) == 0
    assert sandbox.stats()["requests"].get("messages", 0) == 0
    assert [d["key"] for d in result.dead_letters] == ["1", "2"]
    for dead in result.dead_letters:
        assert dead["stage"] == "validation"
        assert dead["retryable"] is False
        assert [e["field"] for e in dead["errors"]] == ["connection_id"]
    assert result.last_state is not None  # a record's own fault: STATE moves past it
    # the same records with a good connection are then sent, ids resolved by one lookup
    again = [record(3, "drv-0"), record(4, "drv-1")]
    result = run_target(tmp_path, config(sandbox.url), singer_lines("msgs", again, state_every=2))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sandbox.stats()["requests"]["users"] == 1
    assert [b["recipient_id"] for b in sandbox.accepted_bodies()] == [
        user_id("drv-0"),
        user_id("drv-1"),
    ]
