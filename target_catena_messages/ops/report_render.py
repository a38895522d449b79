"""How the ledger report shows itself to a person: aligned tables of what ``report_query`` built.

It reads only the report object (the same one ``--json`` prints), so text and JSON never tell
different stories.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from datetime import timezone
from typing import Any

from target_catena_messages.ops.report_query import CATEGORIES, parse_time
from target_catena_messages.pipeline.report import plural

_REASON_WIDTH = 100


def render_text(report: Mapping[str, Any]) -> list[str]:
    """Aligned lines for a person: counts, messages that need attention, re-driven keys."""
    lines = [f"Ledger {report['ledger']} (report at {_short_time(report['generated_at'])})"]
    shown = _filters_line(report["filters"])
    if shown:
        lines.append(shown)
    lines.append("")
    lines += _counts_lines(report)
    if report.get("refresh"):
        r = report["refresh"]
        lines += [
            "",
            f"Refreshed from Catena: {r['asked']:,} operations asked, {r['confirmed']:,} "
            f"confirmed, {r['failed']:,} failed, {r['pending']:,} still pending"
            + (
                f", {r['skipped_without_connection_id']:,} without connection id skipped"
                if r["skipped_without_connection_id"]
                else ""
            ),
        ]
    lines.append("")
    lines += _messages_lines(report)
    if report["redriven"]:
        lines += ["", f"Re-driven keys ({len(report['redriven']):,}) and their outcome now:"]
        lines += _table(
            ["re-driven at", "stream", "key", "now", "operation id", "outcome of run"],
            [
                [
                    _short_time(r["redriven_at"]),
                    r["namespace"],
                    r["key"],
                    r["status"] + ("" if r["outcome_after_redrive"] else " (unchanged)"),
                    r["operation_id"] or "-",
                    r["run_id"] or "-",
                ]
                for r in report["redriven"]
            ],
        )
    return lines


def _counts_lines(report: Mapping[str, Any]) -> list[str]:
    counts: Mapping[str, Mapping[str, Any]] = report["counts"]
    if not counts:
        return ["No keys in the ledger match." if any(report["filters"].values()) else "Empty."]
    names = ("total", *CATEGORIES)
    rows = [[ns, *(f"{c[n]:,}" for n in names)] for ns, c in counts.items()]
    if len(counts) > 1:
        rows.append(["all streams", *(f"{report['totals'][n]:,}" for n in names)])
    header = [
        "stream",
        *(n.replace("_", " ").replace("dead lettered", "dead-lettered") for n in names),
    ]
    lines = _table(header, rows, right=range(1, len(header)))
    stages = report["totals"]["dead_lettered_by_stage"]
    if stages:
        lines.append(
            "dead-lettered by stage: " + ", ".join(f"{s} {n:,}" for s, n in sorted(stages.items()))
        )
    return lines


def _messages_lines(report: Mapping[str, Any]) -> list[str]:
    total, shown = report["messages_total"], report["messages"]
    statuses = ", ".join(report["filters"]["statuses"])
    if not total:
        return [f"No messages with status {statuses}."]
    lines = [f"{plural(total, 'message')} with status {statuses}:"]
    lines += _table(
        ["status", "stream", "key", "stage", "operation id", "updated", "reason"],
        [
            [
                m["status"],
                m["namespace"],
                m["key"],
                m["stage"] or "-",
                m["operation_id"] or "-",
                _short_time(m["updated_at"]),
                _clip(m["reason"]),
            ]
            for m in shown
        ],
    )
    if len(shown) < total:
        lines.append(
            f"... and {total - len(shown):,} more (--limit 0 shows all; --json for scripts)"
        )
    return lines


def _filters_line(filters: Mapping[str, Any]) -> str:
    parts = []
    if filters["streams"]:
        parts.append("streams " + ", ".join(filters["streams"]))
    if filters["since"] or filters["until"]:
        parts.append(
            f"updated {_short_time(filters['since']) if filters['since'] else '...'} to "
            f"{_short_time(filters['until']) if filters['until'] else 'now'}"
        )
    return ("Only " + "; ".join(parts)) if parts else ""


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = ()
) -> list[str]:
    """Columns padded to one width each (numbers right-aligned), two spaces apart."""
    right = set(right)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{c:>{w}}" if i in right else f"{c:<{w}}"
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), *(line([str(c) for c in r]) for r in rows)]


def _short_time(text: str) -> str:
    try:
        return parse_time(text).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    except argparse.ArgumentTypeError:
        return text


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_WIDTH else text[: _REASON_WIDTH - 1] + "…"
