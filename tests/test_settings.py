"""Settings: one URL rule shared with the client, one function for the default file locations."""

from __future__ import annotations

from pathlib import Path

import pytest

from target_catena_messages.catena.auth import require_safe_url
from target_catena_messages.catena.errors import ClientConfigError
from target_catena_messages.errors import ConfigError
from target_catena_messages.settings import Settings, default_paths


def url_problems(url: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Settings.from_config({"dry_run": True, "api_url": url}, {})
    return caught.value.problems


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1",
        "http://localhost.10.0.0.1.nip.io",
        "ftp://api.example.com",
        "https://",
        "https://user:pw@api.example.com",
        "https://api.example.com:99999",
    ],
)
def test_settings_refuse_exactly_what_the_client_refuses(url: str) -> None:
    with pytest.raises(ClientConfigError) as caught:
        require_safe_url(url, "api_url")
    assert url_problems(url) == [str(caught.value)]
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["https://api.example.com", "http://127.0.0.2:8080", "http://[::1]:1", "http://localhost"],
)
def test_settings_take_what_the_client_takes(url: str) -> None:
    assert require_safe_url(url, "api_url") == url
    assert Settings.from_config({"dry_run": True, "api_url": url}, {}).api_url == url


def test_plain_http_names_loopback() -> None:
    [problem] = url_problems("http://api.example.com")
    assert problem.startswith("api_url must be an https:// URL")
    assert "loopback" in problem


def test_default_paths_inside_and_outside_a_meltano_project(tmp_path: Path) -> None:
    state = tmp_path / ".meltano" / "target-catena-messages"
    inside = default_paths({"MELTANO_PROJECT_ROOT": str(tmp_path)})
    assert inside.dead_letter_path == state / "dead-letters.jsonl"
    assert inside.ledger_url == f"sqlite:///{state / 'ledger.sqlite'}"
    for env in ({}, {"MELTANO_PROJECT_ROOT": ""}):
        outside = default_paths(env)
        assert outside.dead_letter_path == Path("catena-dead-letters.jsonl")
        assert outside.ledger_url == "sqlite:///catena-ledger.sqlite"
    for env in ({}, {"MELTANO_PROJECT_ROOT": str(tmp_path)}):
        s = Settings.from_config({"dry_run": True}, env)
        assert (s.dead_letter_path, s.ledger_url) == (
            default_paths(env).dead_letter_path,
            default_paths(env).ledger_url,
        )
    assert (Settings().dead_letter_path, Settings().ledger_url) == (
        outside.dead_letter_path,
        outside.ledger_url,
    )


def test_configured_paths_win(tmp_path: Path) -> None:
    s = Settings.from_config(
        {"dry_run": True, "dead_letter_path": "~/dl.jsonl", "ledger_url": "sqlite:///x.sqlite"},
        {"MELTANO_PROJECT_ROOT": str(tmp_path)},
    )
    assert s.dead_letter_path == Path("~/dl.jsonl").expanduser()
    assert s.ledger_url == "sqlite:///x.sqlite"
