"""Creating a Landscape's schema, and bringing one an earlier version wrote up to date.

Schema changes so far only add tables and nullable columns.  :func:`upgrade_schema`
creates the missing tables and adds the missing columns, so a Landscape that already
holds runs keeps working (and keeps its runs) after an upgrade.  :func:`schema_state`
tells, without writing anything, whether there is a Landscape and whether it is current:
opening a current Landscape never writes, and opening a missing one for reading never
creates it.

Several processes may open a new Landscape at the same moment (two first runs, a run
and a ``ledgerflow runs``), so the upgrade runs under a lock the database holds for the
transaction: ``BEGIN IMMEDIATE`` on SQLite (the write lock, taken before the schema is
even inspected), a transaction-scoped advisory lock on PostgreSQL, whose DDL is
transactional.  The second process waits, then finds the schema made.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from sqlalchemy import inspect
from sqlalchemy.schema import CreateColumn

from . import _schema as t
from ._errors import LandscapeError

if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["SchemaState", "lock_schema", "schema_state", "upgrade_schema"]

#: The PostgreSQL advisory lock key of schema changes (any constant shared by all
#: ledgerflow processes; it reads "ledgerfl" in ASCII).
_ADVISORY_LOCK_KEY = 0x6C65646765726666


class SchemaState(enum.Enum):
    """What a database holds of the Landscape's schema."""

    ABSENT = "absent"  # no ``runs`` table: not a Landscape (yet)
    OUTDATED = "outdated"  # a Landscape lacking tables or columns this version adds
    CURRENT = "current"


def schema_state(conn: Connection) -> SchemaState:
    """How the schema in ``conn``'s database compares with this version's (reads only)."""
    inspector = inspect(conn)
    present = set(inspector.get_table_names())
    if t.runs.name not in present:
        return SchemaState.ABSENT
    for table in t.metadata.sorted_tables:
        if table.name not in present:
            return SchemaState.OUTDATED
        columns = {column["name"] for column in inspector.get_columns(table.name)}
        if any(column.name not in columns for column in table.columns):
            return SchemaState.OUTDATED
    return SchemaState.CURRENT


async def lock_schema(conn: AsyncConnection) -> None:
    """Begin the transaction of a schema change holding the database's schema lock."""
    if conn.dialect.name == "sqlite":
        # pysqlite would begin lazily (and not at all before DDL): begin explicitly,
        # taking the write lock before the schema is inspected.
        await conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK_KEY})")


def upgrade_schema(conn: Connection) -> list[str]:
    """Create missing tables and add missing nullable columns; the ``table.column``
    names added.  Raises :class:`LandscapeError` for a missing column that cannot be
    added (one that must not be null).  Run it after :func:`lock_schema`."""
    t.metadata.create_all(conn)
    inspector = inspect(conn)
    added: list[str] = []
    for table in t.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise LandscapeError(
                    f"the Landscape's table {table.name} lacks column {column.name}, which "
                    "an upgrade cannot add: use a new Landscape database"
                )
            definition = CreateColumn(column).compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {definition}")
            added.append(f"{table.name}.{column.name}")
    return added
