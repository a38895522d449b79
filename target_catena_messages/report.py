"""What the run tells a person: progress lines while it works and the summary at the end.

Both go to stderr (stdout carries only STATE). The summary is written for whoever watches the
dispatch pipeline: plain words, aligned numbers, where the dead letters and the ledger are. The
same facts follow as one ``{"summary": ...}`` JSON line for machines. Counting and rendering
only; the caller decides when to log. Not thread-safe: counts come from the one thread that
records outcomes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from target_catena_messages.outcome import DEAD_LETTER_STAGES, Resolution, Stage

_ACCEPTED = Resolution.ACCEPTED
_DUPLICATE = Resolution.DUPLICATE
_DEAD_LETTERED = Resolution.DEAD_LETTERED
_EXPIRED = Resolution.EXPIRED
_PREVIOUSLY_DEAD_LETTERED = Resolution.PREVIOUSLY_DEAD_LETTERED
_WOULD_SEND = Resolution.WOULD_SEND
_STAGE_NAMES: tuple[str, ...] = tuple(stage.value for stage in DEAD_LETTER_STAGES)

# Known delivery counters, in the order people read them, with the words they are shown with.
_HTTP_LABELS: dict[str, str] = {
    "requests": "requests sent",
    "retries": "retries",
    "ambiguous_sends": "ambiguous sends (outcome unknown)",
    "throttled": "throttled by Catena (429)",
    "throttle_wait_seconds": "seconds waited for throttling",
    "token_requests": "token requests",
    "rejections": "rejected by Catena",
}

_Row = tuple[str, str, str]
"""One summary line: label, number (right-aligned), note."""

_STAGE_LABELS: dict[str, str] = {
    Stage.VALIDATION.value: "invalid record (validation)",
    Stage.API.value: "refused by Catena (api)",
    Stage.AMBIGUOUS.value: "send outcome unknown (ambiguous)",
    Stage.CONFIRMATION.value: "failed at Catena after queueing (confirmation)",
}


@dataclass
class StreamCounts:
    """Outcomes of one stream's records."""

    accepted: int = 0
    duplicates: int = 0
    dead_lettered_by_stage: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(_STAGE_NAMES, 0)
    )
    expired: int = 0
    previously_dead_lettered: int = 0
    would_send: int = 0

    @property
    def dead_lettered(self) -> int:
        """Dead letters written this run for the stream (every stage except ``expired``)."""
        return sum(self.dead_lettered_by_stage.values())

    @property
    def done(self) -> int:
        """Records with a final outcome."""
        return (
            self.accepted
            + self.duplicates
            + self.dead_lettered
            + self.expired
            + self.previously_dead_lettered
            + self.would_send
        )

    def add(self, other: StreamCounts) -> None:
        """Fold another stream's counts into this one (for the all-streams total)."""
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        for stage, n in other.dead_lettered_by_stage.items():
            self.dead_lettered_by_stage[stage] = self.dead_lettered_by_stage.get(stage, 0) + n
        self.expired += other.expired
        self.previously_dead_lettered += other.previously_dead_lettered
        self.would_send += other.would_send

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape used in the summary line."""
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "dead_lettered": self.dead_lettered,
            "dead_lettered_by_stage": dict(self.dead_lettered_by_stage),
            "expired": self.expired,
            "previously_dead_lettered": self.previously_dead_lettered,
            "would_send": self.would_send,
        }


class RunReport:
    """Counts outcomes per stream and renders progress and the final summary.

    Args:
        run_id: Shown in the summary so it can be matched with dead letters and STATE.
        clock: Monotonic seconds; injectable so cadence can be tested without sleeping.
        progress_every: Least number of seconds between two progress lines.
    """

    def __init__(
        self,
        run_id: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        progress_every: float = 10.0,
    ) -> None:
        self._run_id = run_id
        self._clock = clock
        self._progress_every = progress_every
        self._streams: dict[str, StreamCounts] = {}
        self._last_progress_at = clock()
        self._done_at_last_progress = 0

    def count(self, stream: str, outcome: Resolution, stage: str | None = None) -> None:
        """Count one record's final outcome (compared by identity: once per record).

        Raises:
            ValueError: An outcome that does not resolve a record, or a dead letter without a
                known stage: a miscount would tell the ops person the wrong story, so it must
                fail the tests loudly.
        """
        counts = self._streams.get(stream)
        if counts is None:  # not setdefault: that builds a StreamCounts per record, ~0.6 us
            counts = self._streams[stream] = StreamCounts()
        if outcome is _ACCEPTED:
            counts.accepted += 1
        elif outcome is _DUPLICATE:
            counts.duplicates += 1
        elif outcome is _WOULD_SEND:
            counts.would_send += 1
        elif outcome is _EXPIRED:
            counts.expired += 1
        elif outcome is _PREVIOUSLY_DEAD_LETTERED:
            counts.previously_dead_lettered += 1
        elif outcome is _DEAD_LETTERED:
            if stage not in _STAGE_NAMES:
                raise ValueError(f"dead letters are counted by stage, not {stage!r}")
            counts.dead_lettered_by_stage[stage] += 1
        else:
            raise ValueError(f"unknown outcome {outcome!r}")

    @property
    def streams(self) -> dict[str, StreamCounts]:
        """Counts per stream, in the order streams were first seen."""
        return self._streams

    def totals(self) -> StreamCounts:
        """All streams together."""
        total = StreamCounts()
        for counts in self._streams.values():
            total.add(counts)
        return total

    def has_failures(self) -> bool:
        """Whether this run dead-lettered or expired any record (exit code 2).

        Records skipped because they were dead-lettered in an earlier run do not count: that
        failure was reported by the run that had it.
        """
        total = self.totals()
        return total.dead_lettered + total.expired > 0

    def progress_due(self) -> bool:
        """Whether :meth:`progress_line` would give a line now (so its inputs are worth making)."""
        return self._clock() - self._last_progress_at >= self._progress_every

    def progress_line(
        self, *, in_flight: int, queued: int, http: Mapping[str, float]
    ) -> str | None:
        """A one-line progress text, or None if the last one is less than ``progress_every`` old.

        The rate is over the time since the previous line, so a stall shows at once.
        """
        now = self._clock()
        elapsed = now - self._last_progress_at
        if elapsed < self._progress_every:
            return None
        total = self.totals()
        rate = (total.done - self._done_at_last_progress) / elapsed if elapsed > 0 else 0.0
        self._last_progress_at = now
        self._done_at_last_progress = total.done
        return (
            f"progress: {total.done:,} records done ({rate:,.1f}/s), "
            f"{total.accepted:,} accepted, {total.dead_lettered + total.expired:,} dead-lettered, "
            f"{in_flight:,} in flight, {queued:,} queued, "
            f"{_number(http.get('retries', 0))} retries, {_number(http.get('throttled', 0))} "
            "throttled (429)"
        )

    def summary(
        self,
        *,
        dead_letter_path: str,
        dead_letters_written: int,
        ledger_location: str,
        http: Mapping[str, float],
        exit_code: int,
        elapsed: float,
    ) -> tuple[list[str], dict[str, Any]]:
        """The human summary lines, and the object the final JSON line carries under ``summary``.

        The caller writes the lines, then ``{"summary": <object>}`` as one JSON line.
        """
        total = self.totals()
        http_ordered = _ordered_http(http)
        data: dict[str, Any] = {
            "run_id": self._run_id,
            "exit_code": exit_code,
            "elapsed_seconds": round(elapsed, 3),
            "records": total.done,
            "streams": {name: c.as_dict() for name, c in self._streams.items()},
            "totals": total.as_dict(),
            "dead_letters": {"path": dead_letter_path, "written": dead_letters_written},
            "ledger": ledger_location,
            "http": http_ordered,
        }
        lines = [
            f"Catena delivery summary, run {self._run_id}: {total.done:,} records in "
            f"{_duration(elapsed)}, exit code {exit_code} ({_exit_meaning(exit_code)})",
        ]
        blocks = list(self._streams.items())
        if len(blocks) != 1:
            blocks.append(("all streams", total))
        rows: list[_Row] = []
        for name, counts in blocks:
            rows.append((name, "", ""))
            rows.extend(_count_rows(counts))
        rows.append(("dead letters written", f"{dead_letters_written:,}", f"to {dead_letter_path}"))
        rows.append(("ledger", "", ledger_location))
        rows.append(("Catena API", "", ""))
        rows.extend(
            (f"  {_HTTP_LABELS.get(k, k.replace('_', ' '))}", _number(v), "")
            for k, v in http_ordered.items()
        )
        lines.extend(_align(rows))
        return lines, data


def _count_rows(counts: StreamCounts) -> list[_Row]:
    rows: list[_Row] = [
        ("  accepted (queued at Catena)", f"{counts.accepted:,}", ""),
        ("  duplicates (sent before, not resent)", f"{counts.duplicates:,}", ""),
        ("  dead-lettered", f"{counts.dead_lettered:,}", ""),
    ]
    rows += [
        (f"    {_STAGE_LABELS[stage]}", f"{n:,}", "")
        for stage, n in counts.dead_lettered_by_stage.items()
        if n
    ]
    rows.append(("  expired (too old, not sent)", f"{counts.expired:,}", ""))
    rows.append(
        ("  dead-lettered in an earlier run, skipped", f"{counts.previously_dead_lettered:,}", "")
    )
    if counts.would_send:
        rows.append(("  would be sent (dry run, nothing sent)", f"{counts.would_send:,}", ""))
    return rows


def _ordered_http(http: Mapping[str, float]) -> dict[str, float]:
    """Known counters in reading order, then any others sorted by name."""
    ordered = {k: http[k] for k in _HTTP_LABELS if k in http}
    ordered.update({k: http[k] for k in sorted(http) if k not in _HTTP_LABELS})
    return ordered


def _align(rows: list[_Row]) -> list[str]:
    """Labels padded to one width, numbers right-aligned, so columns line up."""
    label_width = max(len(label) for label, _, _ in rows)
    number_width = max(len(number) for _, number, _ in rows)
    return [
        f"  {label:<{label_width}}  {number:>{number_width}}  {note}".rstrip()
        for label, number, note in rows
    ]


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _exit_meaning(code: int) -> str:
    return {
        0: "finished",
        1: "stopped by an error",
        2: "finished, some records not delivered",
    }.get(code, "unexpected")
