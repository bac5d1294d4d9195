"""Small helpers the Landscape's readers share: JSON columns, chunked ``IN`` lists and
stored payloads."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select

from . import _schema as t

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    from sqlalchemy import Row, Select
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["CHUNK_SIZE", "chunks", "load_payloads", "loads_json", "recording_order", "select_in"]

#: Values per ``IN (...)`` list (well below every driver's parameter limit).
CHUNK_SIZE = 500

_T = TypeVar("_T")


def loads_json(text: str | None) -> Any:
    """The value of a JSON column, ``None`` for SQL ``NULL``."""
    return None if text is None else json.loads(text)


def recording_order(record: Any) -> tuple[int, str]:
    """Sort key of a row of an append-only event table by its ``event_id``, in the
    order it was recorded: a recorder's ids end in an increasing hex counter, so a
    shorter id is an earlier one."""
    event_id: str = record.event_id
    return (len(event_id), event_id)


def chunks(values: Sequence[_T], size: int = CHUNK_SIZE) -> Iterator[Sequence[_T]]:
    """``values`` in consecutive slices of at most ``size``, in order (none when empty)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


async def select_in(
    conn: AsyncConnection, make: Callable[[Sequence[str]], Select[Any]], values: Sequence[str]
) -> list[Row[Any]]:
    """The rows of ``make(chunk)`` for every chunk of ``values``, chunk after chunk."""
    found: list[Row[Any]] = []
    for chunk in chunks(values):
        found.extend(await conn.execute(make(chunk)))
    return found


async def load_payloads(conn: AsyncConnection, hashes: Iterable[str]) -> dict[str, Any]:
    """The stored values of ``hashes`` (absent ones are left out)."""
    found: dict[str, Any] = {}
    wanted = sorted(set(hashes))
    for chunk in chunks(wanted):
        for content_hash, content in await conn.execute(
            select(t.payloads.c.hash, t.payloads.c.content).where(t.payloads.c.hash.in_(chunk))
        ):
            found[content_hash] = json.loads(content)
    return found
