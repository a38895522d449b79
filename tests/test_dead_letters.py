from __future__ import annotations

import json
import os
import stat
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from target_catena_messages.dead_letters import (
    DeadLetterWriter,
    read_dead_letters,
)
from target_catena_messages.settings import default_paths

FIELDS = [
    "at",
    "run_id",
    "stream",
    "key",
    "stage",
    "errors",
    "status",
    "api_error",
    "operation_id",
    "attempts",
    "retryable",
    "record",
]


def letter(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "stream": "public-dispatch_messages",
        "key": "48211",
        "stage": "api",
        "errors": [
            {"field": "priority", "message": "'urgent' is not one of ['low', 'medium', 'high']"}
        ],
        "status": 422,
        "api_error": {"code": 422, "message": "Invalid Request Body", "detail": []},
        "operation_id": None,
        "attempts": 1,
        "retryable": False,
        "record": {"message_id": 48211, "message_text": "Dock 14 at 0600"},
    }
    args.update(overrides)
    return args


class Odd:
    """A value no JSON encoder knows."""

    def __str__(self) -> str:
        return "odd"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_fields_exactly_in_contract_order(tmp_path: Path) -> None:
    path = tmp_path / "out" / "nested" / "dead.jsonl"
    before = datetime.now(timezone.utc)
    with DeadLetterWriter(path, "run-1") as writer:
        writer.write(**letter())
        writer.write(**letter(key="48212", stage="validation", status=None, api_error=None))
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert list(first) == FIELDS
    at = datetime.fromisoformat(first["at"])
    assert at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= at <= datetime.now(timezone.utc)
    assert first["run_id"] == "run-1"
    assert first["stream"] == "public-dispatch_messages"
    assert first["key"] == "48211"
    assert first["stage"] == "api"
    assert first["errors"] == [
        {"field": "priority", "message": "'urgent' is not one of ['low', 'medium', 'high']"}
    ]
    assert first["status"] == 422
    assert first["api_error"] == {"code": 422, "message": "Invalid Request Body", "detail": []}
    assert first["operation_id"] is None
    assert first["attempts"] == 1
    assert first["retryable"] is False
    assert first["record"] == {"message_id": 48211, "message_text": "Dock 14 at 0600"}
    second = json.loads(lines[1])
    assert (second["key"], second["stage"], second["status"], second["api_error"]) == (
        "48212",
        "validation",
        None,
        None,
    )
    assert writer.count == 2
    assert writer.path == path


def test_errors_normalised_to_field_and_message(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    with DeadLetterWriter(path, "run") as writer:
        writer.write(
            **letter(errors=[{"message": "blank text"}, {"field": 3, "message": "x", "extra": 1}])
        )
    (row,) = read_dead_letters(path)
    assert row["errors"] == [
        {"field": None, "message": "blank text"},
        {"field": "3", "message": "x"},
    ]


def test_unknown_stage_rejected(tmp_path: Path) -> None:
    writer = DeadLetterWriter(tmp_path / "dead.jsonl", "run")
    with pytest.raises(ValueError, match="stage"):
        writer.write(**letter(stage="network"))
    assert not (tmp_path / "dead.jsonl").exists()


def test_new_file_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    old_umask = os.umask(0)  # even a permissive umask must not widen it
    try:
        with DeadLetterWriter(path, "run") as writer:
            writer.write(**letter())
    finally:
        os.umask(old_umask)
    assert mode_of(path) == 0o600


def test_existing_wide_file_tightened_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    path.write_text('{"key": "from-last-run"}\n')
    path.chmod(0o644)
    with DeadLetterWriter(path, "run") as writer:
        writer.write(**letter())
    assert mode_of(path) == 0o600
    rows = list(read_dead_letters(path))
    assert [r["key"] for r in rows] == ["from-last-run", "48211"]


def test_nothing_created_when_nothing_dead_lettered(tmp_path: Path) -> None:
    path = tmp_path / "out" / "dead.jsonl"
    writer = DeadLetterWriter(path, "run")
    writer.flush()
    writer.close()
    assert not path.exists()
    assert not path.parent.exists()
    assert writer.count == 0


def test_secrets_scrubbed_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    secret = "s3cr3t-client-secret"
    token = 'eyJhbGciOi"quoted\\token'  # needs JSON escaping
    with DeadLetterWriter(path, "run", secrets=[secret, token, "abc", ""]) as writer:
        writer.write(
            **letter(
                errors=[{"field": None, "message": f"token request failed with {secret}"}],
                api_error={"detail": f"Bearer {token}", secret: "as a key"},
                record={"message_text": f"abc pasted {secret} here", "nested": [{"t": token}]},
            )
        )
    raw = path.read_bytes().decode()
    assert secret not in raw
    assert "eyJhbGciOi" not in raw
    (row,) = read_dead_letters(path)
    assert row["errors"][0]["message"] == "token request failed with ***"
    assert row["api_error"] == {"detail": "Bearer ***", "***": "as a key"}
    assert row["record"] == {"message_text": "abc pasted *** here", "nested": [{"t": "***"}]}


def test_decimal_datetime_and_odd_values_encoded(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    created = datetime(2026, 11, 27, 8, 30, tzinfo=timezone.utc)
    with DeadLetterWriter(path, "run") as writer:
        writer.write(
            **letter(
                record={
                    "weight": Decimal("12345.678901234567890"),
                    "created_at": created,
                    "tags": ("a", "b"),
                    "odd": Odd(),
                }
            )
        )
    raw = path.read_text()
    assert "12345.678901234567890" in raw  # exact, not rounded through float
    (row,) = read_dead_letters(path)
    assert row["record"]["weight"] == Decimal("12345.678901234567890")
    assert datetime.fromisoformat(row["record"]["created_at"].replace("Z", "+00:00")) == created
    assert row["record"]["tags"] == ["a", "b"]
    assert row["record"]["odd"] == "odd"


def test_flush_makes_bytes_visible_to_another_reader(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    writer = DeadLetterWriter(path, "run")
    writer.write(**letter(key="1"))
    writer.write(**letter(key="2"))
    assert path.exists()  # created on first write
    assert path.read_bytes() == b""  # still buffered
    writer.flush()
    with path.open("rb") as other:
        assert [json.loads(line)["key"] for line in other] == ["1", "2"]
    writer.write(**letter(key="3"))
    writer.flush()
    assert [r["key"] for r in read_dead_letters(path)] == ["1", "2", "3"]
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(**letter())


def test_large_buffer_written_without_waiting_for_flush(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    with DeadLetterWriter(path, "run") as writer:
        for i in range(400):
            writer.write(**letter(key=str(i), record={"text": "x" * 4000}))
        assert path.stat().st_size > 0
    assert writer.count == 400
    assert len(list(read_dead_letters(path))) == 400


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    writer = DeadLetterWriter(path, "run")

    def work(thread: int) -> None:
        for i in range(200):
            writer.write(**letter(key=f"{thread}-{i}", record={"text": "y" * 3000}))
            if i % 50 == 0:
                writer.flush()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    keys = [r["key"] for r in read_dead_letters(path)]
    assert sorted(keys) == sorted(f"{t}-{i}" for t in range(4) for i in range(200))


def test_reader_skips_blank_lines_and_names_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    path.write_text('{"key": "a", "n": 1.5}\n\n   \n{"key": "b"}\n')
    rows = list(read_dead_letters(path))
    assert rows == [{"key": "a", "n": Decimal("1.5")}, {"key": "b"}]
    path.write_text('{"key": "a"}\n\n{"key": "b", "rec\n')
    reader = read_dead_letters(path)
    assert next(reader) == {"key": "a"}
    with pytest.raises(ValueError, match=r"dead\.jsonl:3: not a JSON line"):
        next(reader)
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"dead\.jsonl:1: not a JSON object"):
        list(read_dead_letters(path))


def _default_path(env: dict[str, str]) -> Path:
    return default_paths(env).dead_letter_path


def test_default_path_follows_meltano_project_root(tmp_path: Path) -> None:
    assert _default_path({"MELTANO_PROJECT_ROOT": str(tmp_path)}) == (
        tmp_path / ".meltano" / "target-catena-messages" / "dead-letters.jsonl"
    )
    assert _default_path({}) == Path("catena-dead-letters.jsonl")
    assert _default_path({"MELTANO_PROJECT_ROOT": ""}) == Path("catena-dead-letters.jsonl")
