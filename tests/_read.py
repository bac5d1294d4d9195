"""Reading back what a run wrote: sink files and Landscape tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select

from landscape import Landscape
from landscape import _schema as t


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (none if the sink never created it)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def table_rows(url: str, table: Any, *where: Any) -> list[dict[str, Any]]:
    """The rows of a Landscape table (filtered by ``where``) as dicts."""
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(select(table).where(*where))).mappings()]


async def attempts_at(url: str, row_index: int, node_id: str) -> list[tuple[int, str]]:
    """``(attempt, status)`` of each node state the source row ``row_index``'s token
    had at ``node_id``, in attempt order (a row that was never forked)."""
    (row,) = await table_rows(url, t.rows, t.rows.c.row_index == row_index)
    (token,) = await table_rows(url, t.tokens, t.tokens.c.row_id == row["row_id"])
    states = await table_rows(
        url,
        t.node_states,
        t.node_states.c.token_id == token["token_id"],
        t.node_states.c.node_id == node_id,
    )
    return sorted((s["attempt"], s["status"]) for s in states)
