"""Errors that end a run.

Everything else that can go wrong with one record is an *outcome* (a dead letter), never an
exception: a run must not die because one driver message is bad.
"""

from __future__ import annotations

from enum import Enum


class FatalKind(str, Enum):
    """Why a run ended early, as the summary's ``fatal`` field names it.

    A scheduler reads it to tell "retry later" (``catena_unavailable``, ``interrupted``) from
    "page someone" (``configuration``, ``rejections``, ``input``, ``invalid_record``).
    """

    CATENA_UNAVAILABLE = "catena_unavailable"
    CONFIGURATION = "configuration"
    INPUT = "input"
    REJECTIONS = "rejections"
    INTERRUPTED = "interrupted"
    INVALID_RECORD = "invalid_record"


class FatalError(Exception):
    """The run cannot go on; the target writes the safe STATE and exits 1 with this one line.

    ``kind`` says why; a subclass may fix it, a raise site names it where the subclass cannot.
    """

    kind: FatalKind = FatalKind.CONFIGURATION

    def __init__(self, message: str, *, kind: FatalKind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class Interrupted(FatalError):
    """SIGTERM or SIGINT: stop taking records, finish what is in flight, write the safe STATE."""

    kind = FatalKind.INTERRUPTED


class ConfigError(FatalError):
    """Settings, credentials or stream configuration are wrong; nothing was or will be sent."""

    kind = FatalKind.CONFIGURATION

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        text = message if not self.problems else message + ": " + "; ".join(self.problems)
        super().__init__(text)
