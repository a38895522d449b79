"""Shared fixtures: the sandbox (real HTTP on loopback), PostgreSQL, and a target runner."""

from __future__ import annotations

pytest_plugins = ["target_catena_messages.sandbox.pytest_plugin", "tests.pg"]
