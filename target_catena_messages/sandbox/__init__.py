"""A local, faithful stand-in for the Catena API that misbehaves on purpose (docs/sandbox.md)."""

from __future__ import annotations

from target_catena_messages.sandbox.config import SandboxConfig, SandboxConfigError
from target_catena_messages.sandbox.server import Sandbox

__all__ = ["Sandbox", "SandboxConfig", "SandboxConfigError"]
