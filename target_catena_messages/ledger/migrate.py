"""Schema levels: a new ledger is made at this target's level, an older one is upgraded in place.

A ledger outlives the target that wrote it, and several targets (not always of one version) may
share a PostgreSQL ledger. So every writable open checks the ledger's schema level, kept in the
one-row ``catena_message_ledger_meta`` table (a ledger without it is level 0, the schema before
levels were recorded), and applies the steps above that level, under the same lock that
serialises creating the tables (a PostgreSQL advisory lock; on SQLite the write transaction's
``BEGIN IMMEDIATE``): two processes starting at once apply them once. Each step only adds columns
declared in ``schema`` with a default, so rows keep their meaning and a target one level older
still works on the upgraded table. A ledger at a level above this target's was written by a newer
target, whose rules this one does not know: it is refused, never written.

The next schema change is one more :class:`Step` (and its columns declared in ``schema``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateColumn

from target_catena_messages.ledger.records import LedgerError
from target_catena_messages.ledger.schema import META, METADATA, TABLE, C

_DDL_LOCK_ID = 0x43_41_54_45_4E_41  # pg_advisory_xact_lock id for creating the tables ("CATENA")


@dataclass(frozen=True)
class Step:
    """One schema change: the level a ledger is at once it is applied, and the columns it adds.

    Each column is declared on the table in ``schema`` with a server default (rows that exist
    get it), and is added only when missing, so a step applied twice changes nothing.
    """

    level: int
    what: str
    columns: tuple[str, ...]


STEPS: tuple[Step, ...] = (
    Step(
        1, "counters of ambiguous resends and outage exits", ("ambiguous_resends", "outage_exits")
    ),
)
SCHEMA_LEVEL = STEPS[-1].level


def upgrade(conn: Connection, location: str) -> int | None:
    """Create the tables, or bring an older ledger up to :data:`SCHEMA_LEVEL` (in a write txn).

    Returns:
        The level the ledger was at when it was upgraded; None when nothing was to upgrade.

    Raises:
        LedgerError: the ledger is at a level above this target's.
    """
    # Two processes may start at once: serialise the check-and-change (SQLite: BEGIN IMMEDIATE).
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_DDL_LOCK_ID)))
    if not sa.inspect(conn).has_table(TABLE.name):
        METADATA.create_all(conn, checkfirst=True)
        _set_level(conn, SCHEMA_LEVEL)
        return None
    level = _checked_level(conn, location)
    if level == SCHEMA_LEVEL:
        return None
    table = conn.dialect.identifier_preparer.format_table(TABLE)
    for name in missing_columns(conn, level):
        column = CreateColumn(C[name]).compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column}"))
    META.create(conn, checkfirst=True)
    _set_level(conn, SCHEMA_LEVEL)
    return level


def readable_gaps(conn: Connection, location: str) -> list[str] | None:
    """For a read-only open: the columns an older ledger lacks (read as their default, 0).

    Returns:
        None when the ledger table does not exist yet.

    Raises:
        LedgerError: the ledger is at a level above this target's.
    """
    if not sa.inspect(conn).has_table(TABLE.name):
        return None
    return missing_columns(conn, _checked_level(conn, location))


def missing_columns(conn: Connection, level: int) -> list[str]:
    """The columns that the steps above ``level`` add and the table does not have yet."""
    present = {c["name"] for c in sa.inspect(conn).get_columns(TABLE.name)}
    wanted: Sequence[str] = [n for s in STEPS if s.level > level for n in s.columns]
    return [name for name in wanted if name not in present]


def _checked_level(conn: Connection, location: str) -> int:
    level = _level(conn)
    if level > SCHEMA_LEVEL:
        raise LedgerError(
            f"ledger at {location} has schema level {level}, newer than this target's "
            f"{SCHEMA_LEVEL}: a newer target-catena-messages wrote it; upgrade this target"
        )
    return level


def _level(conn: Connection) -> int:
    """The recorded level; 0 for a ledger made before levels were recorded."""
    if not sa.inspect(conn).has_table(META.name):
        return 0
    level = conn.scalar(sa.select(META.c.schema_level).where(META.c.id == 1))
    return int(level or 0)


def _set_level(conn: Connection, level: int) -> None:
    conn.execute(sa.delete(META))
    conn.execute(sa.insert(META).values(id=1, schema_level=level))
