"""The two values that travel through a run: a message on its way, and what finally happened to it.

Every record becomes one :class:`Message` and ends as exactly one :class:`Outcome`, whoever decides
it (validation, the ledger, delivery). One type, one place that records it: nothing else decides
what happened to a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


class Resolution(str, Enum):
    """What happened to a record: the one outcome vocabulary of the run.

    Delivery, admission, the recorder, the checkpointer and the report all use these members
    directly. On per-record paths compare them by identity (``is``); the values are the words
    STATE, the summary and the ledger report show.
    """

    ACCEPTED = "accepted"  # queued at Catena; operation id known
    DUPLICATE = "duplicate"  # accepted earlier (this run or another); its operation id reported
    DEAD_LETTERED = "dead_lettered"  # not sent, or rejected: written to the dead letters
    EXPIRED = "expired"  # older than max_message_age_hours: never sent
    PREVIOUSLY_DEAD_LETTERED = "previously_dead_lettered"  # same body dead-lettered before
    WOULD_SEND = "would_send"  # dry run: valid and new
    ABANDONED = "abandoned"  # the run stopped first; NOT resolved (the next run takes it up)

    @property
    def resolves(self) -> bool:
        """Whether a STATE may cover a record that ended this way."""
        return self is not Resolution.ABANDONED


class Stage(str, Enum):
    """Where a record was given up on: the ``stage`` of dead letters, STATE and the summary."""

    VALIDATION = "validation"  # the body is not valid (or the record has no usable key or age)
    API = "api"  # Catena refused it, or retries ran out
    AMBIGUOUS = "ambiguous"  # the send may have reached Catena and no operation was found
    CONFIRMATION = "confirmation"  # queued at Catena, then failed there (confirm_operations)
    EXPIRED = "expired"  # older than max_message_age_hours: never sent

    def __str__(self) -> str:
        return self.value


DEAD_LETTER_STAGES: tuple[Stage, ...] = tuple(s for s in Stage if s is not Stage.EXPIRED)
"""Stages counted as dead-lettered in the summary (expired records are counted on their own)."""


@dataclass(slots=True, eq=False)
class Message:
    """One record on its way to Catena.

    Mutable, but never written by two threads at once; each field has one writer at a time, in
    this order, and each hand-over is a queue or lock (a happens-before edge):

    1. *prepare* (reader thread) sets every field up to ``unresolved``.
    2. *admission* (the reader, or the follow-up thread for copies handed back; one at a time
       under the admission lock; before the message is submitted): a body whose version
       resolves provider ids gets its user ids (``body``, ``errors``, ``expired``,
       ``fingerprint``, ``lane``, ``unresolved``, ``lookup_failed``); a recovered claim sets
       ``recover``, ``prior_claimed_at`` and ``maybe_sent``; every claim sets the ledger's
       counters ``ambiguous_resends`` and ``outage_exits``; an expired record whose key has an
       open claim sets ``lookup_only``. Nothing of these changes after submit.
    3. *delivery* (one worker at a time: a lane sends its head only) writes the attempt fields
       ``attempts``, ``first_sent_at``, ``last_sent_at``, ``last_ended_at``, ``maybe_sent`` and
       ``ambiguous_resends`` until the Outcome.
    4. *the recorder* only reads, after the Outcome came through its queue.
    """

    seq: int
    stream: str
    namespace: str
    key: str
    record: dict[str, Any]
    body: dict[str, Any]
    fingerprint: str
    lane: str
    errors: list[dict[str, Any]] = field(
        default_factory=list
    )  # validation errors ({field, message})
    expired: bool = False
    unresolved: Any = None  # pipeline.users.Wanted: provider ids still to turn into Catena user ids
    lookup_failed: bool = False  # the users lookup failed: a retryable API failure, not bad data
    recover: bool = False  # an earlier run claimed it and died: its send is ambiguous
    prior_claimed_at: datetime | None = None
    attempts: int = 0  # POSTs made this run
    first_sent_at: datetime | None = None  # wall clock, for the operation lookup's window
    last_sent_at: datetime | None = None
    last_ended_at: datetime | None = None  # when the last POST's answer (or failure) came back
    maybe_sent: bool = False  # some request may have reached Catena: the claim is never released
    ambiguous_resends: int = 0  # resends after ambiguous attempts, all runs (the ledger counts)
    outage_exits: int = 0  # earlier runs that ended for an outage with this key in flight
    lookup_only: bool = False  # expired, but an open claim may have sent it: look up, never send

    @property
    def connection_id(self) -> str | None:
        """The body's connection (the breaker and operation lookup work per connection)."""
        value = self.body.get("connection_id")
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The end of one message."""

    message: Message
    resolution: Resolution
    operation_id: str | None = None
    stage: str | None = None  # a Stage (or its value) for dead letters and expired records
    errors: tuple[dict[str, Any], ...] = ()
    status: int | None = None
    api_error: Any = None
    retryable: bool = False
