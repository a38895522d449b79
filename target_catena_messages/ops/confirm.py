"""Confirmation: ask Catena what finally became of the operations a run queued.

A 202 means Catena queued a message, not that the driver's device got it; the resource operation
ends ``success`` or ``failed`` later. :func:`confirm_operations` polls those
operations politely — a bounded pool of threads, one shared pause for every 429, a growing wait
between rounds — until each has ended or the timeout has passed. The small pure functions below it
turn the answers into what the run records: ledger updates, dead letters (stage ``confirmation``,
with Catena's logs) and the summary's counts. Knows nothing of Singer; the ledger only by its
methods.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from target_catena_messages.catena.classify import FailureKind
from target_catena_messages.catena.client import CatenaClient, Failure
from target_catena_messages.catena.retry import RetryPolicy
from target_catena_messages.delivery.availability import Availability
from target_catena_messages.delivery.throttle import Throttle
from target_catena_messages.ledger import ConfirmedStatus, Ledger

__all__ = [
    "Confirmation",
    "ConfirmationState",
    "Pending",
    "confirm_ledger",
    "confirm_operations",
    "dead_letter_fields",
    "last_error",
    "ledger_updates",
    "summary_counts",
]

logger = logging.getLogger(__name__)

ConfirmationState = Literal["success", "failed", "pending"]

_ROUND_GROWTH = 1.5  # each wait between rounds is this much longer than the one before
_MAX_ROUND_WAIT = 30.0  # seconds: a slow TSP should not leave us asleep past its answer
_RETRYABLE_LOG_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class Pending:
    """One accepted message whose operation is to be confirmed.

    ``attempts`` (POSTs made) only feeds the dead letter; it defaults to one send.
    """

    namespace: str
    key: str
    stream: str
    connection_id: str
    operation_id: str
    record: Mapping[str, Any]
    attempts: int = 1


@dataclass(frozen=True)
class Confirmation:
    """What Catena said last about one operation.

    ``pending`` covers both "still pending at the timeout" and "could not be checked"; the latter
    carries the reason in ``error_details`` (``error_type`` stays None: Catena said nothing).
    """

    pending: Pending
    status: ConfirmationState
    error_type: str | None = None
    error_details: str | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)


class _Either(threading.Event):
    """Set when the caller's stop or our own halt is: what ``Throttle.wait_turn`` checks."""

    def __init__(self, stop: threading.Event, halt: threading.Event) -> None:
        super().__init__()
        self._stop, self._halt = stop, halt

    def is_set(self) -> bool:
        return self._stop.is_set() or self._halt.is_set()


def rounds_policy(poll_every: float) -> RetryPolicy:
    """The waits between confirmation rounds (docs/retry.md): ``poll_every``, growing 1.5x to 30 s.

    No jitter (one poller, not many clients returning at once) and no count: the time budget is
    the caller's ``timeout_seconds``, measured on the clock because requests take time too.
    """
    base = max(poll_every, 0.001)
    return RetryPolicy(
        max_retries=0,
        base_seconds=base,
        cap_seconds=max(_MAX_ROUND_WAIT, base),
        growth=_ROUND_GROWTH,
        jitter=False,
    )


@dataclass
class _Seen:
    """What polling learned about one operation so far."""

    final: Confirmation | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None  # last failed request, when no answer came at all


def confirm_operations(
    client: CatenaClient,
    items: Sequence[Pending],
    *,
    timeout_seconds: float,
    max_concurrency: int,
    poll_every: float = 2.0,
    stop: threading.Event | None = None,
    throttle: Throttle | None = None,
    availability: Availability | None = None,
) -> list[Confirmation]:
    """Poll each operation until it is ``success`` or ``failed``, or the time is up.

    Every operation is asked at least once (``timeout_seconds=0`` is one round). Between rounds
    the wait starts at ``poll_every`` and grows 1.5x up to 30 s, never past the deadline. A 429
    pauses every thread for its ``retry_after`` (else ``poll_every``); a request that fails in
    transit or with a 5xx is asked again next round; a 404 or another rejection ends the polling
    of that operation (it cannot get better), leaving it ``pending`` with the reason.

    Args:
        client: The run's client (its token provider and session are reused).
        items: The operations to confirm; results follow this order.
        timeout_seconds: Time budget from the call; rounds after the first stop at it.
        max_concurrency: Most GET requests in flight at once.
        poll_every: Seconds before the second round.
        stop: Set to end early (a signal); unanswered operations stay ``pending``.
        throttle: Where 429 pauses are shared (the run's, when it has one); by default one of
            this call's own that only pauses, learning no rate.
        availability: The run's: while Catena is down, requests wait for it instead of failing
            round after round (within the deadline).

    Raises:
        CredentialsRefused: The credentials were refused; nothing can be confirmed.
    """
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be at least 1")
    if not items:
        return []
    stop = stop or threading.Event()
    halt = threading.Event()  # ours: a fatal error in one worker ends the others' work
    stopped = _Either(stop, halt)
    deadline = time.monotonic() + max(timeout_seconds, 0.0)
    pause = throttle or Throttle(adaptive=False)
    waits = rounds_policy(poll_every)
    available = availability or Availability.unmonitored()
    seen = [_Seen() for _ in items]
    todo = list(range(len(items)))
    rounds = 0
    with ThreadPoolExecutor(
        max_workers=min(max_concurrency, len(items)), thread_name_prefix="confirm"
    ) as pool:

        def ask(index: int, first: bool) -> None:
            if stopped.is_set() or (not first and time.monotonic() >= deadline):
                return
            if available.wait(stopped) and pause.wait_turn(stopped):
                _ask(client, items[index], seen[index], pause, poll_every, available=available)

        while todo and not stop.is_set():
            first = rounds == 0
            rounds += 1
            try:
                list(pool.map(ask, todo, [first] * len(todo)))
            except BaseException:
                halt.set()  # the queued requests return at once instead of being sent
                raise
            todo = [i for i in todo if seen[i].final is None]
            remaining = deadline - time.monotonic()
            if not todo or remaining <= 0:
                break
            stop.wait(min(waits.ceiling(rounds - 1), remaining))
    results = [s.final or _unfinished(item, s) for item, s in zip(items, seen, strict=True)]
    counts = Counter(c.status for c in results)
    logger.info(
        "confirmation: %d success, %d failed, %d still pending after %d round(s)",
        counts["success"],
        counts["failed"],
        counts["pending"],
        rounds,
    )
    return results


def _ask(
    client: CatenaClient,
    item: Pending,
    seen: _Seen,
    pause: Throttle,
    default_pause: float,
    *,
    available: Availability,
) -> None:
    """One GET; updates ``seen`` (a worker owns its item for the round: no lock needed)."""
    answer = client.get_operation(item.connection_id, item.operation_id)
    if isinstance(answer, Failure):
        available.failed(answer.status, answer.message, answer.elapsed)
        seen.problem = answer.message
        if answer.status == 429:
            pause.pause(answer.retry_after if answer.retry_after is not None else default_pause)
        elif answer.kind is FailureKind.REJECTION:
            seen.final = Confirmation(
                item, "pending", None, f"could not be checked: {answer.message}", seen.logs
            )
        return
    available.succeeded()
    seen.problem = None
    logs = answer.get("logs")
    seen.logs = [log for log in logs if isinstance(log, dict)] if isinstance(logs, list) else []
    status = answer.get("status")
    if status == "success":
        seen.final = Confirmation(item, "success", logs=seen.logs)
    elif status == "failed":
        error_type, error_details = last_error(seen.logs)
        seen.final = Confirmation(item, "failed", error_type, error_details, seen.logs)


def _unfinished(item: Pending, seen: _Seen) -> Confirmation:
    details = f"could not be checked: {seen.problem}" if seen.problem else None
    return Confirmation(item, "pending", None, details, seen.logs)


def last_error(logs: Sequence[Mapping[str, Any]]) -> tuple[str | None, str | None]:
    """``(error_type, error_details)`` of the newest failed attempt in an operation's logs."""
    for log in reversed(logs):
        if log.get("status") == "failed" or log.get("error_type") or log.get("error_details"):
            kind, details = log.get("error_type"), log.get("error_details")
            return (
                kind if isinstance(kind, str) else None,
                details if isinstance(details, str) else None,
            )
    return None, None


def _retryable(c: Confirmation) -> bool:
    """Whether sending again may work: a network failure or a throttled/5xx TSP answer."""
    if c.error_type == "network":
        return True
    for log in reversed(c.logs):
        code = log.get("response_status_code")
        if isinstance(code, int) and not isinstance(code, bool):
            return code in _RETRYABLE_LOG_STATUSES or code >= 500
    return False


def dead_letter_fields(c: Confirmation) -> dict[str, Any]:
    """Keyword arguments of ``DeadLetterWriter.write`` for a failed confirmation.

    Raises:
        ValueError: ``c`` did not fail; only failed operations are dead letters.
    """
    if c.status != "failed":
        raise ValueError(f"only failed confirmations are dead letters, not {c.status!r}")
    p = c.pending
    return {
        "stream": p.stream,
        "key": p.key,
        "stage": "confirmation",
        "errors": [{"field": None, "message": f"{c.error_type}: {c.error_details}"}],
        "status": None,
        "api_error": {"logs": list(c.logs)},
        "operation_id": p.operation_id,
        "attempts": p.attempts,
        "retryable": _retryable(c),
        "record": p.record,
    }


def ledger_updates(confirmations: Sequence[Confirmation]) -> list[ConfirmedStatus]:
    """``Ledger.record_confirmations`` input: every status, failed ones become dead letters."""
    return [
        ConfirmedStatus(
            c.pending.namespace,
            c.pending.key,
            c.pending.operation_id,
            c.status,
            retryable=c.status == "failed" and _retryable(c),
        )
        for c in confirmations
    ]


def summary_counts(confirmations: Sequence[Confirmation]) -> dict[str, Any]:
    """The summary's ``confirmation`` object: confirmed / failed / still pending, per stream too."""
    names: dict[ConfirmationState, str] = {
        "success": "confirmed",
        "failed": "failed",
        "pending": "pending",
    }
    total = dict.fromkeys(names.values(), 0)
    streams: dict[str, dict[str, int]] = {}
    for c in confirmations:
        name = names[c.status]
        total[name] += 1
        streams.setdefault(c.pending.stream, dict.fromkeys(names.values(), 0))[name] += 1
    return {**total, "streams": streams}


# -- confirming what a ledger holds (ledger report --refresh) -------------------------------------


def confirm_ledger(
    ledger: Ledger,
    client: CatenaClient,
    *,
    namespaces: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    timeout_seconds: float,
    max_concurrency: int,
    poll_every: float = 2.0,
) -> dict[str, Any]:
    """Ask Catena about accepted keys not known to be final, and record its answers.

    For runs without ``confirm_operations``, or whose confirmation timed out. A failed operation
    turns its key into a dead letter at stage ``confirmation`` in the ledger; no dead-letter line
    is written (the ledger holds no record to write), so its reason is in the result.

    Args:
        ledger: A writable ledger.
        client: A client with the target's credentials.
        namespaces: Only these (all when empty).
        since: Only keys updated at or after this.
        until: Only keys updated at or before this.
        timeout_seconds: See :func:`confirm_operations` (0: ask each operation once).
        max_concurrency: See :func:`confirm_operations`.
        poll_every: See :func:`confirm_operations`.
    """
    items: list[Pending] = []
    skipped = 0
    for ns in namespaces or (None,):
        for row in ledger.report_rows(namespace=ns, since=since, until=until, settled=True):
            if row["status"] != "accepted" or row["confirmed_status"] not in (None, "pending"):
                continue
            if not (row["connection_id"] and row["operation_id"]):
                skipped += 1
                continue
            ns_ = row["namespace"]
            items.append(
                Pending(ns_, row["key"], ns_, row["connection_id"], row["operation_id"], {})
            )
    results = confirm_operations(
        client,
        items,
        timeout_seconds=timeout_seconds,
        max_concurrency=max_concurrency,
        poll_every=poll_every,
    )
    counts = summary_counts(results)
    return {
        "asked": len(items),
        "recorded": ledger.record_confirmations(ledger_updates(results)),
        "skipped_without_connection_id": skipped,
        "confirmed": counts["confirmed"],
        "failed": counts["failed"],
        "pending": counts["pending"],
        "answers": [
            {
                "namespace": c.pending.namespace,
                "key": c.pending.key,
                "operation_id": c.pending.operation_id,
                "status": c.status,
                "reason": (
                    f"{c.error_type}: {c.error_details}"
                    if c.status == "failed"
                    else c.error_details
                ),
            }
            for c in results
            if c.status == "failed" or c.error_details
        ],
    }
