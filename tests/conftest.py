"""Shared fixtures: a Landscape on SQLite and on a session PostgreSQL server."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from landscape._store import Landscape
from tests._postgres import PostgresServer, PostgresUnavailable, start_server

_SKIP_POSTGRES = os.environ.get("LEDGERFLOW_SKIP_POSTGRES") == "1"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (fails, not skips, without binaries)."""
    if _SKIP_POSTGRES:
        pytest.skip("LEDGERFLOW_SKIP_POSTGRES=1")
    try:
        server = start_server()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def landscape_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL of an empty Landscape database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex}"
    await server.create_database(name)
    yield server.url(name)
    await server.drop_database(name)


@pytest.fixture
async def landscape(landscape_url: str) -> AsyncIterator[Landscape]:
    """An open Landscape on ``landscape_url``."""
    async with Landscape.connect(landscape_url) as ls:
        yield ls
