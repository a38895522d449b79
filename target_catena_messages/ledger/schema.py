"""The ledger tables, their column types, and the per-dialect cache of statements built once.

Separate so the one definition of the tables (and the statement cache, which must exist once per
process) sits apart from the jobs that read and write them, each of which holds its own statements.
How an older ledger is brought up to this definition is ``migrate``'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

T = TypeVar("T")

_BOUND_TIMESTAMPS = 8  # converted timestamps remembered per column (see _UTCDateTime)


class _UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on both dialects."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("ledger timestamps must be timezone-aware")
        value = value.astimezone(timezone.utc)
        # SQLite stores text and would drop the offset anyway; keep what it stores unambiguous.
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def bind_processor(self, dialect: sa.Dialect) -> Callable[[Any], Any] | None:
        """``process_bind_param`` plus the driver's conversion, remembered per value.

        A batch binds the same instant in every row (``at``, ``at + lease``): converting it
        once instead of two or three times a row saves ~3 us per timestamp. Datetimes are
        immutable and equal ones convert alike; a naive one raises and is never remembered.
        """
        convert = super().bind_processor(dialect)
        if convert is None:  # pragma: no cover - both dialects have one
            return None
        done: dict[datetime, Any] = {}

        def process(value: datetime | None) -> Any:
            if value is None:
                return None
            bound = done.get(value)
            if bound is None:
                if len(done) >= _BOUND_TIMESTAMPS:
                    done.clear()
                bound = done[value] = convert(value)
            return bound

        return process

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


_ID = sa.String().with_variant(sa.String(collation="C"), "postgresql")
METADATA = sa.MetaData()
TABLE = sa.Table(
    "catena_message_ledger",
    METADATA,
    sa.Column("namespace", _ID, primary_key=True),
    sa.Column("key", _ID, primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("fingerprint", sa.String(128), nullable=False),
    sa.Column("operation_id", sa.String(), index=True),
    sa.Column("stage", sa.String()),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("connection_id", sa.String()),
    sa.Column("run_id", sa.String(), nullable=False),
    sa.Column("claimed_at", _UTCDateTime()),
    sa.Column("lease_until", _UTCDateTime()),
    # Set while a claim carries an unresolved earlier send: the earliest time it may have begun.
    sa.Column("ambiguous_since", _UTCDateTime()),
    sa.Column("resolved_at", _UTCDateTime()),
    sa.Column("confirmed_status", sa.String()),
    sa.Column("updated_at", _UTCDateTime(), nullable=False),
    # Counted across runs while the key is unresolved, so limits hold over restarts: resends
    # after an ambiguous attempt, and runs that ended for an outage with the key in flight.
    sa.Column("ambiguous_resends", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.Column("outage_exits", sa.Integer(), nullable=False, server_default=sa.text("0")),
    sa.CheckConstraint(
        "status IN ('claimed', 'accepted', 'dead_lettered')", name="ck_catena_ledger_status"
    ),
)
C = TABLE.c

# One row (id 1): the schema level of the ledger, so a target refuses a ledger a newer one wrote.
META = sa.Table(
    "catena_message_ledger_meta",
    METADATA,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("schema_level", sa.Integer(), nullable=False),
    sa.CheckConstraint("id = 1", name="ck_catena_ledger_meta_one_row"),
)


# Statements built once per process and dialect instead of once per batch, by (dialect, name);
# their builders say what that saves.
_STATEMENTS: dict[tuple[str, str], Any] = {}


def _per_dialect(conn: Connection, name: str, build: Callable[[], T]) -> T:
    """Statement ``name`` for this connection's dialect, built on first use."""
    key = (conn.dialect.name, name)
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        stmt = _STATEMENTS[key] = build()
    return stmt
