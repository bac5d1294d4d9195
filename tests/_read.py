"""Reading back what a run wrote: sink files and Landscape tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select

from landscape import Landscape


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (none if the sink never created it)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def table_rows(url: str, table: Any, *where: Any) -> list[dict[str, Any]]:
    """The rows of a Landscape table (filtered by ``where``) as dicts."""
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(select(table).where(*where))).mappings()]
