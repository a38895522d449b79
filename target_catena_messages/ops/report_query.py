"""What the ledger report asks: the counts, the messages that need a person, the re-driven keys.

Each key is in exactly one report status (:data:`CATEGORIES`), decided from its ledger row alone;
reasons are joined from the dead-letter file, re-drives from the re-drive log. The result of
:func:`build_report` is one JSON-able object: the ``--json`` output as it is, and what
``report_render`` turns into text. Nothing here prints.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from target_catena_messages import jsonutil
from target_catena_messages.dead_letters import read_dead_letters
from target_catena_messages.ledger import Key, Ledger

logger = logging.getLogger(__name__)

CATEGORIES = ("confirmed", "accepted", "pending", "dead_lettered", "ambiguous", "in_progress")
"""Report statuses, each key in exactly one (see docs/operations.md)."""
NEEDS_ATTENTION = ("dead_lettered", "ambiguous", "pending", "in_progress")
_SETTLED = frozenset({"confirmed", "accepted"})


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

    ``live`` is a claim whose lease still runs and that carries no earlier ambiguous send, or
    one a run left unsent when it ended during an outage (the next run sends it); any other
    claim is ambiguous: its process stopped mid-send and the next run recovers it.
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
    live = row.get("ambiguous_since") is None and (lease is None or lease > now)
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
        "in_progress": f"being sent by run {row.get('run_id')}"
        if row.get("lease_until") is not None
        else "not sent yet: its run ended while Catena was unavailable; the next run sends it",
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
