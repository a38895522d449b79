"""singer-sdk's private API as the product uses it: an SDK upgrade that moves it fails here first.

Each hook in ``sdk_compat.HOOKS`` must exist in the installed SDK with the parameters it had when
it was checked; the installed SDK must be one the hooks were checked against. The reader and the
environment parser are then exercised through the SDK for real.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from singer_sdk.singerlib.exceptions import InvalidInputLine

from target_catena_messages.settings import SETTINGS_SCHEMA
from target_catena_messages.singer import sdk_compat
from target_catena_messages.singer.reader import MessageReader


def _resolve(dotted: str) -> Any:
    """A module, or a class inside one, by its dotted path."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise AssertionError(f"{dotted} not importable")


def test_the_installed_sdk_is_one_the_hooks_were_checked_against() -> None:
    installed = Version(importlib.metadata.version("singer-sdk"))
    assert installed in SpecifierSet(sdk_compat.SDK_CHECKED), (
        f"singer-sdk {installed} is outside {sdk_compat.SDK_CHECKED}: re-check every hook in "
        "target_catena_messages/singer/sdk_compat.py against the new SDK, then widen SDK_CHECKED"
    )


@pytest.mark.parametrize("hook", sdk_compat.HOOKS, ids=lambda h: f"{h.owner}.{h.name}")
def test_each_hooked_name_exists_with_the_parameters_it_was_checked_with(
    hook: sdk_compat.Hook,
) -> None:
    owner = _resolve(hook.owner)
    if hook.parameters is None:
        # An attribute: on the class or module, or assigned to self in the class's code.
        assert hasattr(owner, hook.name) or (
            inspect.isclass(owner) and f"self.{hook.name}" in inspect.getsource(owner)
        ), f"{hook.owner}.{hook.name} is gone ({hook.relies_on})"
        return
    found = getattr(owner, hook.name, None)
    assert callable(found), f"{hook.owner}.{hook.name} is gone ({hook.relies_on})"
    assert tuple(inspect.signature(found).parameters) == hook.parameters, (
        f"{hook.owner}.{hook.name} changed its signature; it was relied on for: {hook.relies_on}"
    )


def test_the_lean_read_loop_keeps_the_sdks_steps_and_errors() -> None:
    seen: list[dict[str, Any]] = []
    callbacks: dict[str, Callable[[dict[str, Any]], None]] = {"RECORD": seen.append}
    reader = MessageReader()
    lines = ['{"type": "RECORD", "record": {"n": 1.5}}\n', '{"type": "RECORD", "record": {}}\n']
    counts = reader.process_lines(iter(lines), callbacks)  # type: ignore[arg-type]
    assert counts == {"RECORD": 2}
    assert [type(m["record"].get("n")).__name__ for m in seen] == ["Decimal", "NoneType"]
    assert reader.line_number == 2
    with pytest.raises(InvalidInputLine, match="type"):
        reader.process_lines(iter(['{"record": {}}\n']), callbacks)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown message type 'NOPE'"):
        reader.process_lines(iter(['{"type": "NOPE"}\n']), callbacks)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputLine, match="input line 5 is not valid JSON"):
        reader.process_lines(iter(["{not json\n"]), callbacks)  # type: ignore[arg-type]


def test_environment_config_reads_typed_settings_like_the_target_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TCM_TEST_LEDGER_URL", "sqlite:///x.sqlite")
    monkeypatch.setenv("TCM_TEST_MAX_CONCURRENCY", "7")
    monkeypatch.setenv("TCM_TEST_DRY_RUN", "true")
    config = sdk_compat.environment_config(SETTINGS_SCHEMA, "TCM_TEST_")
    assert config["ledger_url"] == "sqlite:///x.sqlite"
    assert config["max_concurrency"] == 7
    assert config["dry_run"] is True
