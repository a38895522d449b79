"""Re-drive: dead letters back into the target as a Singer stream, after the cause was fixed.

The stream is piped into the target with the FIXED config. Each record keeps its original key in
``_catena_key``, the stream's only key property, and its original stream name, so the target's
ledger sees the same (namespace, key) as before: accepted keys stay duplicates, a dead-lettered key
goes out again only if its body or the settings shaping it changed, and re-driving twice sends
nothing twice. ``--rearm`` lets unchanged dead letters go out again (a 429 storm that exhausted the
retries): it ends their dead-letter status in the ledger first — an ``ambiguous`` one as an open
ambiguous claim, so the target looks for an existing operation before any resend.

Dead letters hold records AFTER stream maps, so the target never maps a re-drive stream again
(``body.record.is_redrive_schema``): a re-drive sends each record as it was when it failed,
whatever the current ``stream_maps`` say, and needs no config without them. A stream-map mistake
is fixed by running the tap again instead (the ledger prevents duplicates).

Every re-drive appends one line per record to a re-drive log (JSON lines) before emitting
anything, so there is a record of what was handed to the target, when, and from which file; the
ledger report joins it with the outcomes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from target_catena_messages import jsonutil
from target_catena_messages.body.record import KEY_FIELD
from target_catena_messages.body.validate import MESSAGE_TEXT
from target_catena_messages.dead_letters import STAGES, read_dead_letters
from target_catena_messages.errors import ConfigError, FatalError
from target_catena_messages.ledger import Key, Ledger, new_run_id
from target_catena_messages.ops.ledger_report import default_redrive_log, load_config, locations
from target_catena_messages.pipeline.report import plural

logger = logging.getLogger(__name__)

DEFAULT_STAGES = ("validation", "api", "confirmation")
"""Stages re-driven unless ``--stage`` says otherwise; ``ambiguous`` and ``expired`` must be asked
for: an ambiguous message may have reached the driver, an expired one is too old to matter."""


@dataclass(frozen=True)
class Selection:
    """Which dead letters to re-drive; empty sets select everything."""

    stages: frozenset[str] = frozenset(DEFAULT_STAGES)
    streams: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()
    retryable_only: bool = False

    def wants(self, letter: Mapping[str, Any]) -> bool:
        """Whether this dead letter is to be re-driven."""
        return (
            letter.get("stage") in self.stages
            and (not self.streams or letter.get("stream") in self.streams)
            and (not self.keys or str(letter.get("key")) in self.keys)
            and (letter.get("retryable") is True or not self.retryable_only)
        )


@dataclass
class Plan:
    """The dead letters picked for one re-drive, and what happened to the rest."""

    letters: list[dict[str, Any]]
    already_accepted: list[Key] = field(default_factory=list)
    rearmed: dict[Key, str] = field(default_factory=dict)  # key -> "removed" | "ambiguous"


def newest_per_key(letters: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest dead letter of each (stream, key), ordered by that newest one.

    A key re-driven and dead-lettered again has two lines; only the later one tells its
    current story, and sending both would put one key twice into one stream.
    """
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for letter in letters:
        key = (str(letter.get("stream")), str(letter.get("key")))
        newest.pop(key, None)  # re-insert: dict order follows the newest line
        newest[key] = letter
    return list(newest.values())


def singer_messages(letters: Sequence[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """A SCHEMA per stream before its first RECORD, then the records with their original keys.

    The schema lists every field its records have (types left open: the target validates the
    body, not the tap's schema) and always ``message_text``, so a stream whose records all lack
    it still gets past the target's SCHEMA check and is judged record by record.
    """
    properties: dict[str, dict[str, Any]] = {}
    for letter in letters:
        props = properties.setdefault(str(letter["stream"]), {MESSAGE_TEXT: {}})
        record = letter.get("record")
        for name in record if isinstance(record, dict) else ():
            props.setdefault(str(name), {})
        props[KEY_FIELD] = {"type": "string"}
    announced: set[str] = set()
    for letter in letters:
        stream = str(letter["stream"])
        if stream not in announced:
            announced.add(stream)
            yield {
                "type": "SCHEMA",
                "stream": stream,
                "schema": {"type": "object", "properties": properties[stream]},
                "key_properties": [KEY_FIELD],
            }
        record = letter.get("record")
        body = dict(record) if isinstance(record, dict) else {}
        yield {
            "type": "RECORD",
            "stream": stream,
            "record": {**body, KEY_FIELD: str(letter["key"])},
        }


def plan_redrive(
    letters: Sequence[dict[str, Any]],
    selection: Selection,
    *,
    ledger: Ledger | None,
    namespace: str | None,
    rearm: bool,
) -> Plan:
    """Pick the dead letters to re-drive; with a ledger, skip keys accepted since.

    With ``rearm`` (needs a writable ledger), the picked keys that are still dead-lettered are
    made sendable again (see ``Ledger.rearm_dead_letters``).
    """
    picked = [letter for letter in newest_per_key(letters) if selection.wants(letter)]
    if ledger is None:
        return Plan(picked)

    def key_of(letter: Mapping[str, Any]) -> Key:
        return (namespace or str(letter["stream"]), str(letter["key"]))

    rows = ledger.get_many([key_of(letter) for letter in picked])
    plan = Plan([])
    for letter in picked:
        row = rows.get(key_of(letter))
        if row is not None and row["status"] == "accepted":
            plan.already_accepted.append(key_of(letter))
            continue
        plan.letters.append(letter)
        if rearm and row is not None and row["status"] == "dead_lettered":
            plan.rearmed[key_of(letter)] = "ambiguous" if row["stage"] == "ambiguous" else "removed"
    if plan.rearmed:
        ledger.rearm_dead_letters(list(plan.rearmed))
    return plan


def log_entries(
    plan: Plan, *, source: Path, redrive_id: str, namespace: str | None, at: datetime
) -> list[dict[str, Any]]:
    """One re-drive log line per re-driven dead letter."""
    return [
        {
            "at": at.isoformat(timespec="milliseconds"),
            "redrive_id": redrive_id,
            "source": str(source.absolute()),
            "stream": letter["stream"],
            "key": str(letter["key"]),
            "stage": letter.get("stage"),
            "dead_letter_at": letter.get("at"),
            "dead_letter_run_id": letter.get("run_id"),
            "operation_id": letter.get("operation_id"),
            "retryable": letter.get("retryable"),
            "rearmed": plan.rearmed.get((namespace or str(letter["stream"]), str(letter["key"]))),
        }
        for letter in plan.letters
    ]


def append_log(path: Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """Append and fsync (created 0600: keys may identify people); durable before any send."""
    if not entries:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(jsonutil.dumps(e) + "\n" for e in entries).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


# -- command line ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="target-catena-messages-redrive",
        description="Emit dead letters as a Singer stream for the target with the FIXED config: "
        "target-catena-messages-redrive dead-letters.jsonl | target-catena-messages --config "
        "fixed.json (the target sends re-driven records as they were, without stream maps).",
    )
    parser.add_argument("file", nargs="?", type=Path, help="the dead-letter file")
    parser.add_argument("--dead-letters", type=Path, metavar="FILE", help="same as FILE")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE|ENV",
        help="the target's (fixed) config: dead_letter_path, ledger_url, ledger_namespace; "
        "with it, keys accepted since are left out",
    )
    parser.add_argument("--ledger-url", help="the target's ledger (overrides config)")
    parser.add_argument(
        "--stage",
        action="append",
        choices=sorted(STAGES),
        help=f"re-drive these stages (repeatable; default {', '.join(DEFAULT_STAGES)})",
    )
    parser.add_argument("--stream", action="append", default=[], help="only this stream")
    parser.add_argument("--key", action="append", default=[], help="only this record key")
    parser.add_argument(
        "--retryable-only", action="store_true", help="only dead letters marked retryable"
    )
    parser.add_argument(
        "--rearm",
        action="store_true",
        help="let unchanged dead letters be sent again (needs --config or --ledger-url)",
    )
    parser.add_argument("--log", type=Path, metavar="FILE", help="re-drive log to append to")
    return parser


def _redrive(args: argparse.Namespace, out: TextIO) -> str:
    """Do one re-drive; returns the summary line for stderr."""
    config = load_config(args.config)
    where = locations(config)
    source: Path = args.file or args.dead_letters or where.dead_letter_path
    if not source.is_file():
        raise ConfigError(f"no dead-letter file at {source}")
    explicit_ledger = args.ledger_url or (where.ledger_url if args.config else None)
    if args.rearm and not explicit_ledger:
        raise ConfigError("--rearm changes the ledger: give --config or --ledger-url")
    selection = Selection(
        frozenset(args.stage or DEFAULT_STAGES),
        frozenset(args.stream),
        frozenset(args.key),
        args.retryable_only,
    )
    letters = list(read_dead_letters(source))  # all of it before any record goes out
    ns = where.ledger_namespace
    if explicit_ledger:
        with Ledger.open(explicit_ledger, run_id=new_run_id(), read_only=not args.rearm) as ledger:
            plan = plan_redrive(letters, selection, ledger=ledger, namespace=ns, rearm=args.rearm)
    else:
        plan = plan_redrive(letters, selection, ledger=None, namespace=ns, rearm=False)
    redrive_id = uuid.uuid4().hex[:12]
    log = args.log or default_redrive_log(source)
    now = datetime.now(timezone.utc)
    append_log(log, log_entries(plan, source=source, redrive_id=redrive_id, namespace=ns, at=now))
    for message in singer_messages(plan.letters):
        out.write(jsonutil.dumps(message) + "\n")
    out.flush()
    return (
        f"re-drive {redrive_id}: {plural(len(plan.letters), 'record')} from {source}"
        + (
            f", {len(plan.already_accepted):,} accepted since and left out"
            if explicit_ledger
            else ""
        )
        + (f", {len(plan.rearmed):,} re-armed in the ledger" if args.rearm else "")
        + (f"; logged to {log}" if plan.letters else "; nothing to re-drive")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``target-catena-messages-redrive``: the Singer stream on stdout, a summary on stderr."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        line = _redrive(args, sys.stdout)
    except (FatalError, OSError, ValueError) as exc:
        sys.stderr.write(f"target-catena-messages-redrive: {exc}\n")
        return 1
    sys.stderr.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
