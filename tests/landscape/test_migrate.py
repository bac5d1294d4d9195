"""A Landscape written before a schema change keeps working after the upgrade."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, Table, inspect, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from landscape import Landscape
from landscape import _schema as t
from landscape._errors import LandscapeError
from landscape._migrate import upgrade_schema

#: Columns added after the first Landscapes were written.
LATER_COLUMNS = {"runs": {"replayed_from"}, "node_states": {"external_job_id"}}


async def write_old_schema(url: str, *, drop_required: bool = False) -> None:
    """The current schema without :data:`LATER_COLUMNS` (and, with ``drop_required``,
    without a NOT NULL column too)."""
    old = MetaData()
    for table in t.metadata.sorted_tables:
        left_out = LATER_COLUMNS.get(table.name, set())
        if drop_required and table.name == "runs":
            left_out = left_out | {"engine_version"}
        Table(table.name, old, *[c._copy() for c in table.columns if c.name not in left_out])
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(old.create_all)
    finally:
        await engine.dispose()


def one_row_pipeline(tmp_path: Path) -> dict[str, Any]:
    return {
        "source": {"plugin": "memory", "options": {"rows": [{"x": 1}]}, "on_success": "out"},
        "sinks": [{"name": "out", "plugin": "jsonl", "options": {"path": str(tmp_path / "o")}}],
    }


async def columns(url: str, table: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            found = await conn.run_sync(lambda sync: inspect(sync).get_columns(table))
    finally:
        await engine.dispose()
    return {column["name"] for column in found}


async def test_an_old_landscape_gains_the_new_columns_and_records_runs(
    landscape_url: str, run_verified: Callable[..., Any], tmp_path: Path
) -> None:
    await write_old_schema(landscape_url)
    assert "replayed_from" not in await columns(landscape_url, "runs")
    result = await run_verified(one_row_pipeline(tmp_path), url=landscape_url)
    assert result.status == "completed"
    assert "replayed_from" in await columns(landscape_url, "runs")
    assert "external_job_id" in await columns(landscape_url, "node_states")
    engine = create_async_engine(landscape_url)
    try:
        async with engine.begin() as conn:
            assert await conn.run_sync(upgrade_schema) == []  # nothing left to add
    finally:
        await engine.dispose()


async def test_a_missing_required_column_is_refused_clearly(sqlite_url: str) -> None:
    await write_old_schema(sqlite_url, drop_required=True)
    with pytest.raises(LandscapeError, match="lacks column engine_version"):
        async with Landscape.connect(sqlite_url):
            pass


def page_size(url: str) -> int:
    with sqlite3.connect(make_url(url).database) as conn:
        (size,) = conn.execute("PRAGMA page_size").fetchone()
    return int(size)


async def test_a_new_sqlite_landscape_has_large_pages_and_an_old_one_keeps_its_own(
    sqlite_url: str, run_verified: Callable[..., Any], tmp_path: Path
) -> None:
    async with Landscape.connect(sqlite_url):
        pass
    assert page_size(sqlite_url) == 65_536

    old_url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    await write_old_schema(old_url)
    assert page_size(old_url) == 4096
    assert (await run_verified(one_row_pipeline(tmp_path), url=old_url)).status == "completed"
    assert page_size(old_url) == 4096
