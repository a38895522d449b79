"""The ledger report command: what finally happened to every message, for a person or a script.

Meltano's state store keeps only the last STATE line, so the ledger is the one place that knows
every key the target ever claimed, its operation id and its end. This command counts keys per
stream (ledger namespace) and status, lists the ones that need a person (dead-lettered, ambiguous,
pending at Catena, still being sent) with their operation ids and reasons, joined from the
dead-letter file, and shows what was re-driven and how it ended (the re-drive log joined with the
ledger). ``--refresh`` asks Catena for the operations still unconfirmed and records the answers.

This module is the command: arguments, config, wiring. What the report asks is in
``report_query``, how it is shown in ``report_render``. It also holds the little the two
operator commands share (config sources, file locations); stdout is its output, since unlike the
target it carries no Singer stream.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from target_catena_messages import jsonutil
from target_catena_messages.connect import client_from_settings
from target_catena_messages.errors import ConfigError, FatalError
from target_catena_messages.ledger import Ledger, new_run_id
from target_catena_messages.ops.confirm import confirm_ledger
from target_catena_messages.ops.report_query import (
    CATEGORIES,
    NEEDS_ATTENTION,
    Filters,
    build_report,
    latest_dead_letters,
    parse_time,
    read_redrive_log,
)
from target_catena_messages.ops.report_render import render_text
from target_catena_messages.redact import Redactor
from target_catena_messages.settings import SETTINGS_SCHEMA, Settings
from target_catena_messages.singer.sdk_compat import environment_config

ENV_PREFIX = "TARGET_CATENA_MESSAGES_"
REDRIVE_LOG_NAME = "redrive-log.jsonl"
_TEXT_LIMIT = 100


# -- config and locations (shared with the re-drive command) ------------------------------------


def load_config(sources: Sequence[str]) -> dict[str, Any]:
    """Merge ``--config`` sources in order, as the target does: JSON files, or ``ENV``.

    Raises:
        ConfigError: A file cannot be read or is not a JSON object.
    """
    config: dict[str, Any] = {}
    for source in sources:
        if source == "ENV":
            config.update(environment_config(SETTINGS_SCHEMA, ENV_PREFIX))
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
