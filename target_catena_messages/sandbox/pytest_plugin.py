"""pytest fixtures that hand a test a started sandbox and always stop it afterwards.

Load with ``pytest_plugins = ["target_catena_messages.sandbox.pytest_plugin"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from target_catena_messages.sandbox.server import ConfigSource, Sandbox

SandboxFactory = Callable[..., Sandbox]


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A started sandbox with the default config (a well-behaved Catena)."""
    with Sandbox() as started:
        yield started


@pytest.fixture
def sandbox_factory() -> Iterator[SandboxFactory]:
    """Call with a config (dict, SandboxConfig or file path) to get a started sandbox.

    Every sandbox made this way is stopped at teardown, even when the test fails.
    """
    started: list[Sandbox] = []

    def make(config: ConfigSource = None, **kwargs: Any) -> Sandbox:
        box = Sandbox(config, **kwargs)
        box.start()
        started.append(box)
        return box

    yield make
    for box in started:
        box.stop()
