"""The claim decision for one existing row, and how a run tells whether a claim's holder lives.

Separate because it is pure (no database): claim and peek share it, and it reads on its own.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from target_catena_messages.ledger.records import (
    ACCEPTED,
    DEAD_LETTERED,
    ClaimResult,
    Decision,
)


def new_run_id() -> str:
    """A run id that says where the run lives: ``host/pid/nonce``.

    Lets a restarted target on the same machine see at once that the run holding a claim is dead,
    instead of waiting for the lease (which is what protects claims across machines).
    """
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def holder_alive(run_id: str) -> bool:
    """False only when ``run_id`` is provably a dead process on this machine."""
    host, _, rest = run_id.partition("/")
    pid_text = rest.partition("/")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True  # another machine, or an old-style id: trust the lease
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _decide(
    row: Mapping[str, Any] | None,
    fingerprint: str,
    run_id: str,
    now: datetime,
    alive: Callable[[str], bool] = holder_alive,
) -> ClaimResult:
    """The claim decision for one existing row (pure; shared by claim and peek)."""
    if row is None:
        return _SEND  # a new key, the usual case: one immutable result shared by all
    counters = {"ambiguous_resends": row["ambiguous_resends"], "outage_exits": row["outage_exits"]}
    if row["status"] == ACCEPTED:
        return ClaimResult(Decision.DUPLICATE, operation_id=row["operation_id"], **counters)
    if row["status"] == DEAD_LETTERED:
        # An ambiguous key may have reached the driver: a changed body must not send it again
        # (only an explicit re-drive --rearm reopens it, through the operation lookup).
        if row["fingerprint"] == fingerprint or row["stage"] == "ambiguous":
            return ClaimResult(
                Decision.PREVIOUSLY_DEAD_LETTERED,
                operation_id=row["operation_id"],
                stage=row["stage"],
                **counters,
            )
        return ClaimResult(Decision.SEND, stage=row["stage"])  # a new message: counters from 0
    lease_until = row["lease_until"]
    if (
        row["run_id"] != run_id
        and lease_until is not None
        and lease_until > now
        and alive(row["run_id"])
    ):
        return ClaimResult(
            Decision.IN_PROGRESS_ELSEWHERE, prior_claimed_at=row["claimed_at"], **counters
        )
    if lease_until is None and row["ambiguous_since"] is None and row["outage_exits"]:
        # Left by a run that ended for an outage, and never possibly sent (a send that may have
        # reached Catena sets ambiguous_since): send, and keep counting outage exits.
        return ClaimResult(Decision.SEND, **counters)
    # Expired, or (should not happen) claimed again by this very run: either way nobody can tell
    # whether a POST went out, so it is ambiguous rather than a plain SEND.
    return ClaimResult(
        Decision.RECOVER, prior_claimed_at=row["ambiguous_since"] or row["claimed_at"], **counters
    )


_SEND = ClaimResult(Decision.SEND)
