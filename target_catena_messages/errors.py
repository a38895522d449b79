"""Errors that end a run.

Everything else that can go wrong with one record is an *outcome* (a dead letter), never an
exception: a run must not die because one driver message is bad.
"""

from __future__ import annotations


class FatalError(Exception):
    """The run cannot go on; the target writes the safe STATE and exits 1 with this one line."""


class ConfigError(FatalError):
    """Settings, credentials or stream configuration are wrong; nothing was or will be sent."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        text = message if not self.problems else message + ": " + "; ".join(self.problems)
        super().__init__(text)
