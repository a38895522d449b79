"""Cursor pagination in the fastapi-pagination style Catena uses.

A cursor is an opaque token naming a position in a stable ordering (an integer key per item) and a
direction: ``next`` pages start after the position, ``previous`` pages end before it. Keys never
change once given, so a client that follows ``next_page`` never sees an item twice, even while new
items are appended.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class CursorError(ValueError):
    """The cursor was not one this server handed out."""


def encode_cursor(direction: str, position: int) -> str:
    """Opaque cursor text for ``direction`` (``n`` or ``p``) at ``position``."""
    return base64.urlsafe_b64encode(f"{direction}:{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, int]:
    """Inverse of ``encode_cursor``.

    Raises:
        CursorError: when the text is not a cursor.
    """
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        direction, position = text.split(":")
        if direction not in ("n", "p"):
            raise CursorError(cursor)
        return direction, int(position)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise CursorError(cursor) from exc


@dataclass(frozen=True)
class Page:
    """One page: the items and the cursors around it."""

    items: list[Any]
    current_page: str
    current_page_backwards: str
    previous_page: str | None
    next_page: str | None

    def as_dict(self, total: int | None = None) -> dict[str, Any]:
        """The response body; ``total`` only for telematics pages (integrations pages lack it)."""
        body: dict[str, Any] = {"items": self.items}
        if total is not None:
            body["total"] = total
        body.update(
            current_page=self.current_page,
            current_page_backwards=self.current_page_backwards,
            previous_page=self.previous_page,
            next_page=self.next_page,
        )
        return body


def paginate(items: Sequence[Any], keys: Sequence[int], cursor: str | None, size: int) -> Page:
    """Cut one page out of ``items`` ordered by ascending, unique ``keys``.

    Raises:
        CursorError: for a cursor this server did not make.
    """
    direction, position = decode_cursor(cursor) if cursor else ("n", -1)
    if direction == "n":
        start = bisect_right(keys, position)
        end = min(start + size, len(keys))
    else:
        end = bisect_left(keys, position)
        start = max(0, end - size)
    after = keys[end - 1] if end > 0 else -1
    before = keys[start] if start < len(keys) else after + 1
    return Page(
        items=list(items[start:end]),
        current_page=encode_cursor("n", keys[start - 1] if start > 0 else -1),
        current_page_backwards=encode_cursor("p", after + 1),
        previous_page=encode_cursor("p", before) if start > 0 else None,
        next_page=encode_cursor("n", after) if end < len(keys) else None,
    )
