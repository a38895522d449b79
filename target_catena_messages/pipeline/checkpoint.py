"""Decide which tap STATE is safe to emit, given records that resolve out of order.

A tap STATE promises the tap it may resume *after* every record read before it. Records are sent
concurrently by several sinks, so they finish in any order; emitting the newest tap state as the
SDK does would skip records still in flight if the process died. The checkpointer numbers records
as they are read, ties each tap state to the highest number seen so far, and hands out the newest
state whose records are all resolved (docs/design.md, "STATE rules").

Bookkeeping is a *watermark* (every record numbered at or below it is resolved) plus the set of
resolved numbers above it, so each record costs amortised O(1) and memory is bounded by the window
between the oldest unresolved record and the newest one read. Pure logic, no I/O, not thread-safe:
the target owns one instance and calls it from one thread.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from target_catena_messages.outcome import Resolution, Stage

logger = logging.getLogger(__name__)

STATE_KEY = "target_catena_messages"
"""The one top-level key of the tap's state value that the target owns and always replaces."""

_ACCEPTED = Resolution.ACCEPTED
_DUPLICATE = Resolution.DUPLICATE
_DEAD_LETTERED = Resolution.DEAD_LETTERED
_EXPIRED = Resolution.EXPIRED
IN_STATE: tuple[Resolution, ...] = (_ACCEPTED, _DUPLICATE, _DEAD_LETTERED, _EXPIRED)
"""Outcomes STATE counts and lists; the others that resolve a record go to ``resolve_silently``."""


@dataclass
class Totals:
    """Whole-run counts of resolved records, as written under ``totals`` in every STATE line."""

    accepted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    expired: int = 0


class Checkpointer:
    """Tracks record resolution and tap states; produces the STATE values that are safe to write.

    Args:
        run_id: Identifies this run in every STATE line (and in the dead letters and ledger).
        list_cap: Most entries each of ``operations`` and ``dead_letters`` may hold in one line;
            the rest are only in the ledger, which keeps Meltano's state store small.
    """

    def __init__(self, run_id: str, *, list_cap: int = 1000) -> None:
        if list_cap < 0:
            raise ValueError("list_cap must not be negative")
        self._run_id = run_id
        self._list_cap = list_cap
        self._last_seq = 0
        self._watermark = 0
        self._resolved_ahead: set[int] = set()
        # Tap states not yet safe, oldest first, each tied to the last record numbered before it.
        self._waiting: deque[tuple[int, dict[str, Any]]] = deque()
        self._safe: dict[str, Any] | None = None
        self._safe_is_new = False
        self._operations: list[list[str]] = []
        self._dead_letters: list[list[str]] = []
        self._resolved_since_line = 0
        self._dropped_since_line = 0
        self._totals = Totals()

    def next_seq(self) -> int:
        """Number the next record read: 1, 2, 3, ... with no gaps."""
        self._last_seq += 1
        return self._last_seq

    def add_tap_state(self, value: dict[str, Any]) -> None:
        """Tie a tap STATE value to every record numbered so far.

        The value is deep-copied: the caller (or the SDK) may reuse or mutate its dict later.
        """
        entry = (self._last_seq, copy.deepcopy(value))
        if self._last_seq <= self._watermark:
            self._make_safe(entry[1])
        elif self._waiting and self._waiting[-1][0] == self._last_seq:
            # No record between two tap states: the newer one supersedes the older outright.
            self._waiting[-1] = entry
        else:
            self._waiting.append(entry)

    def resolve(
        self,
        seq: int,
        stream: str,
        key: str,
        outcome: Resolution,
        *,
        operation_id: str | None = None,
        stage: str | None = None,
    ) -> None:
        """Record the final outcome of one record.

        Accepted and duplicate records with an operation id are listed under ``operations``;
        dead-lettered and expired ones under ``dead_letters`` with their stage (``expired`` for
        expired). A duplicate whose earlier operation id is unknown is counted but not listed.

        Raises:
            ValueError: ``seq`` was never numbered or is already resolved, the outcome is not
                one of :data:`IN_STATE`, an accepted record has no operation id, or a dead letter
                has no stage. Each means a bug upstream that would otherwise corrupt the
                checkpoint silently.
        """
        self._check_resolvable(seq)
        if outcome is _ACCEPTED and operation_id is not None:  # the usual case, inline
            entry: list[str] | None = [stream, key, operation_id]
            self._totals.accepted += 1
        else:
            entry = self._entry_for(stream, key, outcome, operation_id, stage)
            self._count(outcome)
        self._mark_resolved(seq)
        self._resolved_since_line += 1
        if entry is not None:
            listed = outcome is _ACCEPTED or outcome is _DUPLICATE
            target = self._operations if listed else self._dead_letters
            if len(target) < self._list_cap:
                target.append(entry)
            else:
                self._dropped_since_line += 1

    def resolve_silently(self, seq: int) -> None:
        """Resolve a record that STATE neither counts nor lists.

        For records that need no report in STATE but must not hold the checkpoint back: a
        record skipped because it was dead-lettered in an earlier run, or a dry run's record.

        Raises:
            ValueError: ``seq`` was never numbered or is already resolved.
        """
        self._check_resolvable(seq)
        self._mark_resolved(seq)

    @property
    def unresolved(self) -> int:
        """Records numbered but not yet resolved."""
        return self._last_seq - self._watermark - len(self._resolved_ahead)

    @property
    def totals(self) -> Totals:
        """A copy of the whole-run counts."""
        return Totals(**asdict(self._totals))

    def safe_advanced(self) -> bool:
        """Whether a newer tap state became safe since the last line (worth writing soon)."""
        return self._safe is not None and self._safe_is_new

    def pending_news(self) -> bool:
        """Whether :meth:`take_line` would say something new: a newer safe tap state or outcomes.

        Always false while no tap state is safe, since no line can be written then.
        """
        if self._safe is None:
            return False
        return self._safe_is_new or self._resolved_since_line > 0

    def take_line(self) -> dict[str, Any] | None:
        """Return the STATE value to write now, or None while no tap state is safe.

        The value is the newest safe tap state, unchanged except for :data:`STATE_KEY`, which
        carries this run's id, the records resolved since the previous line (capped at
        ``list_cap`` each) and the whole-run totals. Those records count as reported afterwards.
        """
        if self._safe is None:
            return None
        line = copy.deepcopy(self._safe)
        line[STATE_KEY] = {
            "run_id": self._run_id,
            "operations": self._operations,
            "dead_letters": self._dead_letters,
            "totals": asdict(self._totals),
        }
        if self._dropped_since_line:
            logger.debug(
                "%d resolved records left out of the STATE line (cap %d); the ledger has them",
                self._dropped_since_line,
                self._list_cap,
            )
        self._operations = []
        self._dead_letters = []
        self._resolved_since_line = 0
        self._dropped_since_line = 0
        self._safe_is_new = False
        return line

    def _check_resolvable(self, seq: int) -> None:
        if not 1 <= seq <= self._last_seq:
            raise ValueError(f"record {seq} was never numbered (last is {self._last_seq})")
        if seq <= self._watermark or seq in self._resolved_ahead:
            raise ValueError(f"record {seq} is already resolved")

    def _mark_resolved(self, seq: int) -> None:
        if seq == self._watermark + 1:
            self._watermark = seq
            while self._watermark + 1 in self._resolved_ahead:
                self._watermark += 1
                self._resolved_ahead.remove(self._watermark)
            self._release_safe_states()
        else:
            self._resolved_ahead.add(seq)

    @staticmethod
    def _entry_for(
        stream: str, key: str, outcome: Resolution, operation_id: str | None, stage: str | None
    ) -> list[str] | None:
        """Validate one outcome and build its list entry (None: counted but not listed)."""
        if type(outcome) is not Resolution or outcome not in IN_STATE:
            raise ValueError(f"unknown outcome {outcome!r}")
        if outcome is _ACCEPTED and operation_id is None:
            raise ValueError("an accepted record needs its operation id")
        if outcome is _ACCEPTED or outcome is _DUPLICATE:
            return None if operation_id is None else [stream, key, operation_id]
        if outcome is _EXPIRED:
            if stage not in (None, Stage.EXPIRED):
                raise ValueError(f"an expired record has stage 'expired', not {stage!r}")
            return [stream, key, Stage.EXPIRED.value]
        if not stage:
            raise ValueError("a dead-lettered record needs its stage")
        return [stream, key, str(stage)]

    def _count(self, outcome: Resolution) -> None:
        if outcome is _ACCEPTED:
            self._totals.accepted += 1
        elif outcome is _DUPLICATE:
            self._totals.duplicates += 1
        elif outcome is _DEAD_LETTERED:
            self._totals.dead_lettered += 1
        else:
            self._totals.expired += 1

    def _release_safe_states(self) -> None:
        """Move every waiting tap state now covered by the watermark out; keep the newest."""
        newest: dict[str, Any] | None = None
        while self._waiting and self._waiting[0][0] <= self._watermark:
            newest = self._waiting.popleft()[1]
        if newest is not None:
            self._make_safe(newest)

    def _make_safe(self, value: dict[str, Any]) -> None:
        self._safe = value
        self._safe_is_new = True
