"""What the run tells a person: progress lines while it works and the summary at the end.

Both go to stderr (stdout carries only STATE). The summary is written for whoever watches the
dispatch pipeline: plain words, aligned numbers, where the dead letters and the ledger are. It
is logged (so Meltano keeps its figures as fields), and the same facts follow as one
``{"summary": ...}`` JSON line for machines. Not thread-safe: counts come from the one thread
that records outcomes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from target_catena_messages import jsonutil
from target_catena_messages.errors import FatalKind
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
    "outages": "times Catena was unavailable",
    "outage_seconds": "seconds Catena was unavailable",
    "outage_probes": "probes while Catena was unavailable",
}

_Row = tuple[str, str, str]
"""One summary line: label, number (right-aligned), note."""

_STAGE_LABELS: dict[str, str] = {
    Stage.VALIDATION.value: "invalid record (validation)",
    Stage.API.value: "refused by Catena (api)",
    Stage.AMBIGUOUS.value: "send outcome unknown (ambiguous)",
    Stage.CONFIRMATION.value: "failed at Catena after queueing (confirmation)",
    Stage.EXPIRED.value: "too old, never sent (expired)",
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
        self,
        *,
        in_flight: int,
        queued: int,
        http: Mapping[str, float],
        unavailable_for: float | None = None,
    ) -> str | None:
        """A one-line progress text, or None if the last one is less than ``progress_every`` old.

        The rate is over the time since the previous line, so a stall shows at once; during an
        outage (``unavailable_for`` seconds so far) the line says the run is waiting for Catena.
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
            + (
                ""
                if unavailable_for is None
                else f"; waiting for Catena (unavailable for {unavailable_for:.0f} s)"
            )
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
        confirmation: Mapping[str, Any] | None = None,
        fatal: FatalKind | None = None,
    ) -> tuple[list[str], dict[str, Any]]:
        """The human summary lines, and the object the final JSON line carries under ``summary``.

        Dead letters are counted as the dead-letter file and the ledger report count them:
        every stage, ``expired`` and ``confirmation`` (Catena's failures of messages it had
        accepted, from ``confirmation``) included, so ``totals.dead_lettered`` adds up to
        ``dead_letters.written``. ``expired`` stays as a field of its own as well.

        Each line reads on its own (a stage names the dead-lettering it counts): log
        collectors such as Meltano strip the indentation. :func:`emit_summary` writes them. The
        confirmation block follows when ``confirmation`` is given. ``fatal`` says why the run
        ended early (None: it did not), so a scheduler can tell "retry later" from "page someone".
        """
        failed = _failed_by_stream(confirmation)
        total = self.totals()
        records = total.done  # confirmation failures were records counted as accepted already
        streams = {name: _figures(c, failed.get(name, 0)) for name, c in self._streams.items()}
        totals = _figures(total, sum(failed.values()))
        http_ordered = _ordered_http(http)
        data: dict[str, Any] = {
            "run_id": self._run_id,
            "exit_code": exit_code,
            "fatal": None if fatal is None else fatal.value,
            "elapsed_seconds": round(elapsed, 3),
            "records": records,
            "streams": streams,
            "totals": totals,
            "dead_letters": {"path": dead_letter_path, "written": dead_letters_written},
            "ledger": ledger_location,
            "http": http_ordered,
        }
        if confirmation is not None:
            data["confirmation"] = dict(confirmation)
        lines = [
            f"Catena delivery summary, run {self._run_id}: {plural(records, 'record')} in "
            f"{_duration(elapsed)}, exit code {exit_code} "
            f"({_exit_meaning(exit_code) if fatal is None else 'ended early: ' + fatal.value})",
        ]
        blocks = list(streams.items())
        if len(blocks) != 1:
            blocks.append(("all streams", totals))
        rows: list[_Row] = []
        for name, figures in blocks:
            rows.append((f"{name}:" if name == "all streams" else f"stream {name}:", "", ""))
            rows.extend(_count_rows(figures))
        rows.append(("dead letters written", f"{dead_letters_written:,}", f"to {dead_letter_path}"))
        rows.append(("ledger", "", ledger_location))
        rows.append(("Catena API:", "", ""))
        rows.extend(
            (f"  {_HTTP_LABELS.get(k, k.replace('_', ' '))}", _number(v), "")
            for k, v in http_ordered.items()
        )
        lines.extend(_align(rows))
        if confirmation is not None:
            lines += confirmation_lines(confirmation)
        return lines, data


def emit_summary(
    lines: list[str],
    data: dict[str, Any],
    *,
    log: logging.Logger,
    write_line: Callable[[str], None],
) -> dict[str, Any]:
    """Write the end-of-run summary: log records for people and pipelines, then the JSON line.

    Meltano re-parses a plugin's stderr and keeps structure only for singer-sdk's JSON log
    records, so the summary goes through logging: a record per line (readable in any log
    format), the first carrying every figure as extra fields (``--log-format=json`` shows them
    as fields of that event). The final ``{"summary": ...}`` line follows, unchanged, for
    scripts that read the target's stderr directly. Takes what :meth:`RunReport.summary`
    returns; returns the summary object.
    """
    level = logging.INFO if data["exit_code"] == 0 else logging.WARNING
    log.log(level, "%s", lines[0], extra={"catena_summary": data, **_flat(data)})
    for line in lines[1:]:
        log.log(level, "%s", line)
    write_line(jsonutil.dumps({"summary": data}))
    return data


def confirmation_lines(counts: Mapping[str, Any]) -> list[str]:
    """The confirmation block of the summary, each line naming what it counts."""
    rows: list[_Row] = [
        ("confirmation: confirmed by Catena (success)", f"{counts['confirmed']:,}", ""),
        ("confirmation: failed at Catena (dead-lettered)", f"{counts['failed']:,}", ""),
        ("confirmation: still pending at the timeout", f"{counts['pending']:,}", ""),
    ]
    return _align(rows)


def plural(n: int, word: str) -> str:
    """``1 record``, ``2 records``, ``1,000 records``: counts people read."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _flat(data: Mapping[str, Any]) -> dict[str, Any]:
    """The figures a log pipeline filters on, as top-level fields of the summary record."""
    totals = data["totals"]
    return {
        "run_id": data["run_id"],
        "exit_code": data["exit_code"],
        "fatal": data.get("fatal"),
        "records": data["records"],
        "accepted": totals["accepted"],
        "duplicates": totals["duplicates"],
        "dead_lettered": totals["dead_lettered"],
        "expired": totals["expired"],
        "previously_dead_lettered": totals["previously_dead_lettered"],
        "would_send": totals["would_send"],
        "dead_letters_written": data["dead_letters"]["written"],
        "elapsed_seconds": data["elapsed_seconds"],
    }


def _failed_by_stream(confirmation: Mapping[str, Any] | None) -> dict[str, int]:
    if not confirmation:
        return {}
    streams: Mapping[str, Mapping[str, int]] = confirmation.get("streams") or {}
    return {name: int(c.get("failed", 0)) for name, c in streams.items()}


def _figures(counts: StreamCounts, confirmation_failed: int) -> dict[str, Any]:
    """One stream's (or all streams') JSON figures, every dead letter in ``dead_lettered``."""
    by_stage = dict(counts.dead_lettered_by_stage)
    by_stage["confirmation"] = by_stage.get("confirmation", 0) + confirmation_failed
    by_stage["expired"] = counts.expired
    return {
        "accepted": counts.accepted,
        "duplicates": counts.duplicates,
        "dead_lettered": sum(by_stage.values()),
        "dead_lettered_by_stage": by_stage,
        "expired": counts.expired,
        "previously_dead_lettered": counts.previously_dead_lettered,
        "would_send": counts.would_send,
    }


def _count_rows(figures: Mapping[str, Any]) -> list[_Row]:
    rows: list[_Row] = [
        ("  accepted (queued at Catena)", f"{figures['accepted']:,}", ""),
        ("  duplicates (sent before, not resent)", f"{figures['duplicates']:,}", ""),
        ("  dead-lettered", f"{figures['dead_lettered']:,}", ""),
    ]
    rows += [
        (f"  dead-lettered, {_STAGE_LABELS[stage]}", f"{n:,}", "")
        for stage, n in figures["dead_lettered_by_stage"].items()
        if n
    ]
    rows.append(
        (
            "  dead-lettered in an earlier run, skipped",
            f"{figures['previously_dead_lettered']:,}",
            "",
        )
    )
    if figures["would_send"]:
        rows.append(("  would be sent (dry run, nothing sent)", f"{figures['would_send']:,}", ""))
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
