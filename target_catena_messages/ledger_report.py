"""The ledger report: what finally happened to every message, for a person or (JSON) a script.

Meltano's state store keeps only the last STATE line, so the ledger is the one place that knows
every key the target ever claimed, its operation id and its end. This command counts keys per
stream (ledger namespace) and status, lists the ones that need a person (dead-lettered, ambiguous,
pending at Catena, still being sent) with their operation ids and reasons — joined from the
dead-letter file — and shows what was re-driven and how it ended (the re-drive log joined with the
ledger). ``--refresh`` asks Catena for the operations still unconfirmed and records the answers.

It also holds the little the two operator commands share (config sources, file locations); stdout
is its output, since unlike the target it carries no Singer stream.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from singer_sdk.configuration._dict_config import parse_environment_config

from target_catena_messages import jsonutil
from target_catena_messages.confirm import confirm_ledger
from target_catena_messages.connect import client_from_settings
from target_catena_messages.dead_letters import read_dead_letters
from target_catena_messages.errors import ConfigError, FatalError
from target_catena_messages.ledger import Key, Ledger, new_run_id
from target_catena_messages.redact import Redactor
from target_catena_messages.report import plural
from target_catena_messages.settings import SETTINGS_SCHEMA, Settings

logger = logging.getLogger(__name__)

ENV_PREFIX = "TARGET_CATENA_MESSAGES_"
REDRIVE_LOG_NAME = "redrive-log.jsonl"
CATEGORIES = ("confirmed", "accepted", "pending", "dead_lettered", "ambiguous", "in_progress")
"""Report statuses, each key in exactly one (see docs/operations.md)."""
NEEDS_ATTENTION = ("dead_lettered", "ambiguous", "pending", "in_progress")
_SETTLED = frozenset({"confirmed", "accepted"})
_TEXT_LIMIT = 100
_REASON_WIDTH = 100


# -- config and locations (shared with the re-drive command) ------------------------------------


def load_config(sources: Sequence[str]) -> dict[str, Any]:
    """Merge ``--config`` sources in order, as the target does: JSON files, or ``ENV``.

    Raises:
        ConfigError: A file cannot be read or is not a JSON object.
    """
    config: dict[str, Any] = {}
    for source in sources:
        if source == "ENV":
            config.update(parse_environment_config(SETTINGS_SCHEMA, ENV_PREFIX))
            continue
        try:
            data = jsonutil.loads(Path(source).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config {source} cannot be read: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {source} is not a JSON object")
        config.update(data)
    return config


def locations(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """The target's settings for file locations only (ledger, dead letters, namespace).

    Read as a dry run, so no credentials are needed, with exactly the target's defaults
    (``MELTANO_PROJECT_ROOT`` included).
    """
    return Settings.from_config({**config, "dry_run": True}, env)


def default_redrive_log(dead_letter_path: Path) -> Path:
    """Where the re-drive log lives unless told otherwise: next to the dead-letter file."""
    return dead_letter_path.parent / REDRIVE_LOG_NAME


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or time; without an offset it is UTC.

    Raises:
        argparse.ArgumentTypeError: not ISO 8601.
    """
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            day = date.fromisoformat(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
        value = datetime(day.year, day.month, day.day)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


# -- classification and joins (pure) --------------------------------------------------------------


def category(status: str, stage: str | None, confirmed_status: str | None, live: bool) -> str:
    """The report status of one key.

    ``live`` is a claim whose lease still runs and that carries no earlier ambiguous send; any
    other claim is ambiguous: its process stopped mid-send and the next run recovers it.
    """
    if status == "accepted":
        return {"success": "confirmed", "pending": "pending", "failed": "dead_lettered"}.get(
            confirmed_status or "", "accepted"
        )
    if status == "dead_lettered":
        return "ambiguous" if stage == "ambiguous" else "dead_lettered"
    return "in_progress" if live else "ambiguous"


def row_category(row: Mapping[str, Any], now: datetime) -> str:
    """:func:`category` of a full ledger row."""
    lease = row.get("lease_until")
    live = lease is not None and lease > now and row.get("ambiguous_since") is None
    return category(row["status"], row.get("stage"), row.get("confirmed_status"), live)


def count_table(groups: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-namespace counts from ``Ledger.status_counts`` rows."""
    table: dict[str, dict[str, Any]] = {}
    for g in groups:
        counts = table.setdefault(g["namespace"], _empty_counts())
        name = category(g["status"], g["stage"], g["confirmed_status"], bool(g["live"]))
        counts[name] += g["count"]
        counts["total"] += g["count"]
        if name == "dead_lettered":
            stage = g["stage"] or "confirmation"
            counts["dead_lettered_by_stage"][stage] = (
                counts["dead_lettered_by_stage"].get(stage, 0) + g["count"]
            )
    return table


def _empty_counts() -> dict[str, Any]:
    return {"total": 0, **dict.fromkeys(CATEGORIES, 0), "dead_lettered_by_stage": {}}


def _sum_counts(table: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    total = _empty_counts()
    for counts in table.values():
        for name in ("total", *CATEGORIES):
            total[name] += counts[name]
        for stage, n in counts["dead_lettered_by_stage"].items():
            total["dead_lettered_by_stage"][stage] = (
                total["dead_lettered_by_stage"].get(stage, 0) + n
            )
    return total


def latest_dead_letters(path: Path | None, namespace: str | None) -> dict[Key, dict[str, Any]]:
    """The newest dead letter of each (ledger namespace, key), with its reason in one line.

    An unreadable file is a warning, not an error: the report is still worth having.
    """
    found: dict[Key, dict[str, Any]] = {}
    if path is None or not path.is_file():
        return found
    try:
        for letter in read_dead_letters(path):
            stream, key = str(letter.get("stream")), str(letter.get("key"))
            errors = letter.get("errors") or []
            reason = "; ".join(
                f"{e.get('field')}: {e.get('message')}" if e.get("field") else str(e.get("message"))
                for e in errors
                if isinstance(e, dict)
            )
            found[(namespace or stream, key)] = {
                "stream": stream,
                "at": letter.get("at"),
                "run_id": letter.get("run_id"),
                "stage": letter.get("stage"),
                "status": letter.get("status"),
                "retryable": letter.get("retryable"),
                "reason": reason,
            }
    except (OSError, ValueError) as exc:
        logger.warning("dead letters not joined: %s", exc)
    return found


def read_redrive_log(path: Path | None) -> list[dict[str, Any]]:
    """Entries of a re-drive log (JSON lines); a missing file has none, bad lines are skipped."""
    if path is None or not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = jsonutil.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "stream" in entry and "key" in entry:
            entries.append(entry)
    return entries


def _reason(cat: str, row: Mapping[str, Any], letter: Mapping[str, Any] | None) -> str:
    if letter is not None and letter.get("reason") and cat in ("dead_lettered", "ambiguous"):
        return str(letter["reason"])
    return {
        "pending": "queued at Catena; still pending when last checked",
        "in_progress": f"being sent by run {row.get('run_id')}",
        "ambiguous": "a send may have reached Catena; the next run looks for its operation first",
        "confirmed": "delivered (Catena reported success)",
        "accepted": "queued at Catena (202); not confirmed",
    }.get(cat) or _dead_reason(row)


def _dead_reason(row: Mapping[str, Any]) -> str:
    if row.get("stage") == "confirmation":
        return (
            "Catena's operation failed after queueing; its logs: GET /v2/integrations/connections/"
            f"{row.get('connection_id')}/resource-operations/{row.get('operation_id')}"
        )
    return f"dead-lettered at stage {row.get('stage')} (no dead letter found for it)"


# -- the report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """What the report covers; ``statuses`` select the listed messages, not the counts."""

    streams: tuple[str, ...] = ()
    statuses: tuple[str, ...] = NEEDS_ATTENTION
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "streams": list(self.streams) or None,
            "statuses": list(self.statuses),
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }


def build_report(
    ledger: Ledger,
    filters: Filters,
    *,
    letters: Mapping[Key, Mapping[str, Any]],
    redrives: Sequence[Mapping[str, Any]],
    namespace: str | None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The whole report as one JSON-able object (``render_text`` turns it into lines)."""
    now = now or datetime.now(timezone.utc)
    wanted = set(filters.streams)
    groups = [
        g
        for g in ledger.status_counts(since=filters.since, until=filters.until, now=now)
        if not wanted or g["namespace"] in wanted
    ]
    table = count_table(groups)
    messages: list[dict[str, Any]] = []
    settled = bool(_SETTLED & set(filters.statuses))
    for ns in filters.streams or (None,):
        for row in ledger.report_rows(
            namespace=ns, since=filters.since, until=filters.until, settled=settled
        ):
            cat = row_category(row, now)
            if cat in filters.statuses:
                messages.append(_message(row, cat, letters.get((row["namespace"], row["key"]))))
    return {
        "ledger": ledger.location,
        "generated_at": now.isoformat(),
        "filters": filters.as_dict(),
        "counts": table,
        "totals": _sum_counts(table),
        "messages_total": len(messages),
        "messages": messages[: filters.limit] if filters.limit else messages,
        "redriven": _redriven(ledger, redrives, wanted, namespace, now),
    }


def _message(row: Mapping[str, Any], cat: str, letter: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "namespace": row["namespace"],
        "key": row["key"],
        "status": cat,
        "ledger_status": row["status"],
        "stage": row["stage"],
        "operation_id": row["operation_id"],
        "connection_id": row["connection_id"],
        "confirmed_status": row["confirmed_status"],
        "attempts": row["attempts"],
        "run_id": row["run_id"],
        "updated_at": row["updated_at"].isoformat(),
        "reason": _reason(cat, row, letter),
        "dead_letter": dict(letter) if letter else None,
    }


def _redriven(
    ledger: Ledger,
    entries: Sequence[Mapping[str, Any]],
    streams: set[str],
    namespace: str | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Each re-driven key (newest re-drive) with what the ledger says of it now."""
    latest: dict[Key, Mapping[str, Any]] = {}
    for e in entries:
        key = (namespace or str(e["stream"]), str(e["key"]))
        if not streams or key[0] in streams:
            latest[key] = e
    rows = ledger.get_many(list(latest))
    out = []
    for key, e in latest.items():
        row = rows.get(key)
        at = str(e.get("at") or "")
        updated: datetime | None = row["updated_at"] if row else None
        out.append(
            {
                "namespace": key[0],
                "key": key[1],
                "stream": e["stream"],
                "redriven_at": at,
                "redrive_id": e.get("redrive_id"),
                "source": e.get("source"),
                "status": row_category(row, now) if row else "not_in_ledger",
                "operation_id": row["operation_id"] if row else None,
                "run_id": row["run_id"] if row else None,
                "updated_at": updated.isoformat() if updated else None,
                "outcome_after_redrive": _after(updated, at),
            }
        )
    return out


def _after(updated: datetime | None, at: str) -> bool:
    """Whether the ledger's row changed at or after the re-drive (its outcome is the re-drive's)."""
    try:
        return updated is not None and updated >= parse_time(at)
    except argparse.ArgumentTypeError:
        return False


# -- text -----------------------------------------------------------------------------------------


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


# -- command line ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="target-catena-messages-ledger",
        description="What happened to every message: counts per stream and status, the messages "
        "that need attention with reasons and operation ids, and re-driven keys.",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE|ENV",
        help="the target's config (repeatable; ENV reads TARGET_CATENA_MESSAGES_*): ledger_url, "
        "dead_letter_path, ledger_namespace, and credentials for --refresh",
    )
    parser.add_argument(
        "--ledger-url", help="sqlite:///PATH or postgresql://... (overrides config)"
    )
    parser.add_argument("--dead-letters", type=Path, metavar="FILE", help="join reasons from it")
    parser.add_argument("--redrive-log", type=Path, metavar="FILE", help="join re-drives from it")
    parser.add_argument(
        "--stream", action="append", default=[], help="ledger namespace (repeatable)"
    )
    parser.add_argument(
        "--status",
        action="append",
        choices=[*CATEGORIES, "all"],
        help=f"list these (repeatable); default: {', '.join(NEEDS_ATTENTION)}",
    )
    parser.add_argument("--since", type=parse_time, help="updated at or after (ISO 8601, UTC)")
    parser.add_argument("--until", type=parse_time, help="updated at or before (ISO 8601, UTC)")
    parser.add_argument(
        "--limit", type=int, help=f"messages listed (default {_TEXT_LIMIT}; 0: all)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object for scripts")
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="ask Catena for operations not known to be final and record the answers",
    )
    parser.add_argument(
        "--refresh-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep polling pending operations this long (default 0: ask each once)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser


def _report(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config)
    where = locations(config)
    statuses = tuple(CATEGORIES if "all" in (args.status or ()) else args.status or NEEDS_ATTENTION)
    limit = args.limit if args.limit is not None else (0 if args.json else _TEXT_LIMIT)
    filters = Filters(tuple(args.stream), statuses, args.since, args.until, limit or None)
    dead_letter_path = args.dead_letters or where.dead_letter_path
    letters = latest_dead_letters(dead_letter_path, where.ledger_namespace)
    redrive_log = args.redrive_log or default_redrive_log(dead_letter_path)
    refreshed = None
    url = args.ledger_url or where.ledger_url
    with Ledger.open(url, run_id=new_run_id(), read_only=not args.refresh) as ledger:
        if args.refresh:
            settings = Settings.from_config(config)
            redactor = Redactor(settings.secrets)
            redactor.install()
            refreshed = confirm_ledger(
                ledger,
                client_from_settings(settings, redactor)[0],
                namespaces=filters.streams,
                since=filters.since,
                until=filters.until,
                timeout_seconds=args.refresh_timeout,
                max_concurrency=settings.max_concurrency,
            )
            for a in refreshed["answers"]:
                if a["status"] == "failed":
                    letters[(a["namespace"], a["key"])] = {"stage": "confirmation", **a}
        report = build_report(
            ledger,
            filters,
            letters=letters,
            redrives=read_redrive_log(redrive_log),
            namespace=where.ledger_namespace,
        )
    report["refresh"] = refreshed
    report["sources"] = {
        "dead_letters": str(dead_letter_path) if dead_letter_path.is_file() else None,
        "redrive_log": str(redrive_log) if redrive_log.is_file() else None,
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``target-catena-messages-ledger``: exit 0 with the report, 1 with one line on error."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        report = _report(args)
    except (FatalError, OSError) as exc:
        sys.stderr.write(f"target-catena-messages-ledger: {exc}\n")
        return 1
    text = jsonutil.dumps(report) if args.json else "\n".join(render_text(report))
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
