"""The ledger: which message keys were claimed, accepted or dead-lettered, across runs.

Catena has no idempotency key, so this table is what keeps a message from being sent twice. A key is
CLAIMED (committed, with a lease) before its POST and its OUTCOME is committed before any STATE that
covers it. Several target processes may share one PostgreSQL ledger; a claim whose lease ran out
without an outcome means its process died mid-send, so the next claimant gets ``RECOVER`` and must
look for an existing operation before resending.

One SQLAlchemy Core code path serves SQLite and PostgreSQL; the only dialect branches are the
``INSERT ... ON CONFLICT`` construct, the lock that serialises writers (``BEGIN IMMEDIATE`` on
SQLite, row locks plus an advisory lock for DDL on PostgreSQL) and a ``"C"`` collation on
PostgreSQL, so the database orders keys exactly as Python does and every writer locks rows in one
global order (no deadlocks between overlapping batches).

SQLite runs in WAL mode with ``synchronous=FULL``. ``NORMAL`` survives a crash of the *process* but
can lose the last commits on power loss or an OS crash, and a lost claim means a resend after the
POST happened. ``FULL`` fsyncs the WAL on every commit; we commit once per batch: it costs little.

Only a hex fingerprint of each body is stored, never message text.

The package, one job a module: ``records`` (values and errors), ``schema`` (the tables and the
statement cache), ``migrate`` (schema levels: creating, upgrading an older ledger in place,
refusing a newer one), ``engines`` (URLs, SQLite and PostgreSQL engines), ``store``
(transactions and the statements every job shares), ``decision`` (the pure claim decision, run
ids), ``claims`` (claiming, peeking, leases, releasing, ending claims a stopped run leaves, the
counters across runs), ``outcomes`` (outcomes, confirmations, re-arming dead letters), ``reads``
(rows and counts for reports, re-drive and recovery) and ``core`` (the :class:`Ledger` that
callers open, which hands each call to its job).
"""

from target_catena_messages.ledger.core import Ledger
from target_catena_messages.ledger.decision import holder_alive, new_run_id
from target_catena_messages.ledger.records import (
    ACCEPTED,
    CLAIMED,
    CONFIRMATION_STATUSES,
    DEAD_LETTERED,
    ClaimRequest,
    ClaimResult,
    ConfirmedStatus,
    Decision,
    Key,
    LedgerError,
    LedgerOutcome,
    LedgerReadOnlyError,
    retryable_fingerprint,
)
from target_catena_messages.ledger.schema import METADATA, TABLE, C

__all__ = [
    "ACCEPTED",
    "CLAIMED",
    "CONFIRMATION_STATUSES",
    "DEAD_LETTERED",
    "METADATA",
    "TABLE",
    "C",
    "ClaimRequest",
    "ClaimResult",
    "ConfirmedStatus",
    "Decision",
    "Key",
    "Ledger",
    "LedgerError",
    "LedgerOutcome",
    "LedgerReadOnlyError",
    "holder_alive",
    "new_run_id",
    "retryable_fingerprint",
]
