"""Bringing a Landscape written by an earlier version up to the current schema.

Schema changes so far only add tables and nullable columns.  ``create_all`` adds the
tables; :func:`upgrade_schema` adds the columns, so a Landscape that already holds runs
keeps working (and keeps its runs) after an upgrade.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import inspect
from sqlalchemy.schema import CreateColumn

from . import _schema as t
from ._errors import LandscapeError

if TYPE_CHECKING:
    from sqlalchemy import Connection

__all__ = ["upgrade_schema"]


def upgrade_schema(conn: Connection) -> list[str]:
    """Create missing tables and add missing nullable columns; the ``table.column``
    names added.  Raises :class:`LandscapeError` for a missing column that cannot be
    added (one that must not be null)."""
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
