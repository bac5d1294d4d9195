"""Shared fixtures: a Landscape on SQLite and on a session PostgreSQL server, and
``run_verified``, which runs a pipeline and checks its audit trail."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import Pipeline, RunResult
from landscape._store import Landscape
from tests._postgres import PostgresServer, PostgresUnavailable, start_server

_SKIP_POSTGRES = os.environ.get("LEDGERFLOW_SKIP_POSTGRES") == "1"


_PROXY_VARIABLES = ["http_proxy", "https_proxy", "all_proxy", "no_proxy"]


@pytest.fixture(autouse=True)
def _no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests talk to servers on 127.0.0.1: a proxy set on the machine running them must
    not carry their requests (LLM endpoints honour HTTP(S)_PROXY)."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


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


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"


@pytest.fixture
def run_verified(sqlite_url: str, tmp_path: Path) -> Callable[..., Any]:
    """``await run_verified(config)`` runs a pipeline and asserts its audit trail verifies."""

    async def run(config: dict[str, Any], *, url: str | None = None, **options: Any) -> RunResult:
        pipeline = Pipeline.from_dict(
            config, base_dir=tmp_path, landscape_url=url or sqlite_url, **options
        )
        result = await pipeline.run()
        async with Landscape.connect(url or sqlite_url) as landscape:
            report = await landscape.verify(result.run_id)
        assert report.ok, [str(v) for v in report.violations]
        return result

    return run
