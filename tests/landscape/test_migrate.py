"""Opening a Landscape: an old one keeps working after an upgrade, new ones opened
together are created once, and reading never creates one."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import MetaData, Table, inspect, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from landscape import Landscape, LandscapeNotFound
from landscape import _schema as t
from landscape._errors import LandscapeError
from landscape._migrate import upgrade_schema
from tests._postgres import PostgresServer

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


async def test_landscapes_opened_together_on_a_new_database_all_open(landscape_url: str) -> None:
    opened: list[bool] = []

    async def open_one() -> None:
        async with Landscape.connect(landscape_url) as landscape:
            opened.append(await landscape.get_run("none") is None)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(open_one)
    assert opened == [True] * 4


_OPEN_ONE = """
import sys, anyio
from landscape import Landscape
async def main():
    async with Landscape.connect(sys.argv[1]) as landscape:
        await landscape.list_runs()
anyio.run(main)
"""


def test_processes_opening_a_new_sqlite_landscape_together_all_open(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'runs' / 'audit.db'}"
    processes = [
        subprocess.Popen([sys.executable, "-c", _OPEN_ONE, url], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], errors


async def test_reading_an_absent_landscape_creates_nothing(tmp_path: Path) -> None:
    where = tmp_path / "no" / "such" / "audit.db"
    with pytest.raises(LandscapeNotFound, match="no Landscape"):
        async with Landscape.connect(f"sqlite+aiosqlite:///{where}", create=False):
            pass
    assert not (tmp_path / "no").exists()


@pytest.mark.postgres
async def test_reading_a_database_without_a_landscape_creates_no_table(
    postgres_server: PostgresServer,
) -> None:
    name = "t_readonly_probe"
    await postgres_server.create_database(name)
    try:
        url = postgres_server.url(name)
        with pytest.raises(LandscapeNotFound, match="holds no Landscape"):
            async with Landscape.connect(url, create=False):
                pass
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        finally:
            await engine.dispose()
        assert tables == []
    finally:
        await postgres_server.drop_database(name)
