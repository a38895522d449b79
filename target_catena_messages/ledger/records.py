"""The ledger's values and errors: what callers pass in and get back.

Separate from the table and the engines so the run, the recorder and the reports can build and
check these values (a fingerprint that is not hex is refused here) without touching SQLAlchemy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Literal, NamedTuple

from target_catena_messages import jsonutil
from target_catena_messages.errors import FatalError

Key = tuple[str, str]

CLAIMED, ACCEPTED, DEAD_LETTERED = "claimed", "accepted", "dead_lettered"
_FINGERPRINT = re.compile(r"[0-9a-f]{32,128}")


class LedgerError(FatalError):
    """The ledger cannot be opened or written: no message may be sent without it."""


class LedgerReadOnlyError(LedgerError):
    """A write on a ledger opened read-only (dry runs): a caller bug, never silently ignored."""


class Decision(str, Enum):
    """What the caller does with a key it wants to send."""

    SEND = "send"
    DUPLICATE = "duplicate"
    PREVIOUSLY_DEAD_LETTERED = "previously_dead_lettered"
    IN_PROGRESS_ELSEWHERE = "in_progress_elsewhere"
    RECOVER = "recover"


class _ClaimFields(NamedTuple):
    namespace: str
    key: str
    fingerprint: str
    connection_id: str | None


class ClaimRequest(_ClaimFields):
    """One key to claim; ``fingerprint`` is the hex hash of the body and the settings shaping it.

    Immutable and checked like the other ledger values, but a named tuple rather than a frozen
    dataclass: the run builds one per record, and a frozen dataclass costs twice as much.
    """

    __slots__ = ()

    def __new__(
        cls, namespace: str, key: str, fingerprint: str, connection_id: str | None
    ) -> ClaimRequest:
        """Build a request; a fingerprint that is not a hex digest is refused (ValueError)."""
        _check_fingerprint(fingerprint)
        return tuple.__new__(cls, (namespace, key, fingerprint, connection_id))


@dataclass(frozen=True)
class ClaimResult:
    """The decision for one key.

    ``prior_claimed_at`` is, for ``RECOVER``, the earliest moment an unresolved send of this key
    may have started (the lower bound for the operation lookup); for ``IN_PROGRESS_ELSEWHERE`` it
    is when the holder claimed it. ``ambiguous_resends`` and ``outage_exits`` are the row's
    counters when the claim was decided, counted across runs (0 for a new key, and for a
    dead-lettered key claimed again for a changed body: that is a new message).
    """

    decision: Decision
    operation_id: str | None = None
    stage: str | None = None
    prior_claimed_at: datetime | None = None
    ambiguous_resends: int = 0
    outage_exits: int = 0


class _OutcomeFields(NamedTuple):
    namespace: str
    key: str
    status: Literal["accepted", "dead_lettered"]
    fingerprint: str
    operation_id: str | None = None
    stage: str | None = None
    attempts: int = 0
    connection_id: str | None = None
    confirmed_status: str | None = None


class LedgerOutcome(_OutcomeFields):
    """What finally happened to one key; accepted needs an operation id, a dead letter its stage.

    A checked named tuple like :class:`ClaimRequest`, for the same reason: the recorder builds
    one per message sent, and a frozen dataclass with ``__post_init__`` costs several times more.
    """

    __slots__ = ()

    def __new__(  # noqa: PLR0917 - positional like the named tuple's fields
        cls,
        namespace: str,
        key: str,
        status: Literal["accepted", "dead_lettered"],
        fingerprint: str,
        operation_id: str | None = None,
        stage: str | None = None,
        attempts: int = 0,
        connection_id: str | None = None,
        confirmed_status: str | None = None,
    ) -> LedgerOutcome:
        """Build an outcome; an incomplete one or a non-hex fingerprint is refused (ValueError)."""
        _check_fingerprint(fingerprint)
        if status == ACCEPTED:
            if not operation_id:
                raise ValueError(f"accepted outcome for key {key!r} needs an operation_id")
        elif status == DEAD_LETTERED:
            if not stage:
                raise ValueError(f"dead-lettered outcome for key {key!r} needs a stage")
        else:
            raise ValueError(f"unknown outcome status {status!r}")
        return tuple.__new__(
            cls,
            (
                namespace,
                key,
                status,
                fingerprint,
                operation_id,
                stage,
                attempts,
                connection_id,
                confirmed_status,
            ),
        )


# -- confirmation -----------------------------------------------------------------------------

CONFIRMATION_STATUSES = ("success", "failed", "pending")


@dataclass(frozen=True)
class ConfirmedStatus:
    """Catena's word on the operation of an accepted key (confirmation, ledger report refresh).

    ``retryable``: a failure that sending again may cure (network, provider 5xx); the next run
    that sees the key sends it again, like any retryable dead letter.
    """

    namespace: str
    key: str
    operation_id: str
    status: Literal["success", "failed", "pending"]
    retryable: bool = False

    def __post_init__(self) -> None:
        if self.status not in CONFIRMATION_STATUSES:
            raise ValueError(f"unknown confirmed status {self.status!r}")


def retryable_fingerprint(fingerprint: str) -> str:
    """What a retryable dead letter stores instead of its fingerprint: never equal to a body's.

    So the next run that sees the key sends it again (the run stores retryable dead letters so).
    """
    return jsonutil.sha256_hex([fingerprint, "retryable"])


def _check_fingerprint(fingerprint: str) -> None:
    # A guard as much as a check: whatever is passed here is stored, and it must never be text.
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise ValueError("fingerprint must be a lowercase hex digest (32-128 characters)")
