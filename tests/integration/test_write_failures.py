"""A row a sink cannot write is settled by ``on_write_failure``: never lost, never fatal.

Each case runs a real pipeline on a real SQLite file (or PostgreSQL server) and checks
what a user relies on: where every row ended, what the Landscape says about it, and that
``verify`` holds.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.ext.asyncio import create_async_engine

from engine import ConfigError, Pipeline, RunFailed
from landscape import Landscape
from landscape import _schema as t
from tests._postgres import PostgresServer
from tests._read import read_jsonl

from .conftest import Cli, run_id_of

RunVerified = Callable[..., Any]


def failsink_config(
    rows: list[dict[str, Any]], primary: dict[str, Any], tmp_path: Path, **settings: Any
) -> dict[str, Any]:
    """A memory source writing ``primary`` (sink ``out``), whose write failures go to the
    JSONL sink ``failed`` unless ``settings`` say otherwise."""
    return {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "out"},
        "sinks": [
            {"name": "out", "on_write_failure": "failed", **primary, **settings},
            {
                "name": "failed",
                "plugin": "jsonl",
                "options": {"path": str(tmp_path / "failed.jsonl")},
            },
        ],
    }


async def outcomes(url: str, run_id: str) -> dict[int, tuple[str, str | None, Any]]:
    """Row index -> (outcome, sink, context) of each terminal outcome of the run."""
    out = t.token_outcomes
    query = (
        sa.select(t.rows.c.row_index, out.c.outcome, out.c.sink_name, out.c.context_json)
        .join(t.tokens, t.tokens.c.token_id == out.c.token_id)
        .join(t.rows, t.rows.c.row_id == t.tokens.c.row_id)
        .where(out.c.run_id == run_id, out.c.is_terminal)
    )
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        found = (await conn.execute(query)).all()
    return {
        index: (outcome, sink, json.loads(context) if context else None)
        for index, outcome, sink, context in found
    }


async def sink_table(url: str, table: str) -> list[dict[str, Any]]:
    """The rows the ``database`` sink wrote into ``table``, in row order."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            found = await connection.execute(sa.text(f'SELECT * FROM "{table}" ORDER BY row_index'))
            return [dict(row) for row in found.mappings()]
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def sink_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database for the ``database`` sink: a SQLite file or a PostgreSQL one."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'sink.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"sink_{uuid.uuid4().hex}"
    await server.create_database(name)
    yield server.url(name)
    await server.drop_database(name)


LONG_A = "x" * 70 + "_first"
LONG_B = "x" * 70 + "_second"


def safe_column(field: str) -> str:
    """The documented column name of a field name that is not safe as it is."""
    digest = hashlib.sha256(field.encode("utf-8")).hexdigest()[:12]
    safe = "".join("_" if ord(c) < 32 else c for c in field).encode()[:50].decode()
    return f"{safe or 'field'}_{digest}"


async def test_data_driven_field_names_never_stop_a_database_sink(
    run_verified: RunVerified, sqlite_url: str, sink_database: str, tmp_path: Path
) -> None:
    rows = [
        # An empty name, a NUL, two long names PostgreSQL would cut to one 63-byte name.
        {"id": 0, "name": "ann", "": "e", "a\x00b": "n", LONG_A: 1, LONG_B: 2},
        {"id": 1, "name": "bob", "NAME": "B"},  # one column on SQLite; no column on PG
        {"id": 2, "Token_ID": "mine"},  # the sink's own column on SQLite; no column on PG
        {"id": 3, "name": "cy"},
    ]
    primary = {"plugin": "database", "options": {"url": sink_database, "table": "people"}}
    result = await run_verified(failsink_config(rows, primary, tmp_path))

    written = await sink_table(sink_database, "people")
    assert [row["id"] for row in written] == [0, 3]
    assert list(written[0]) == [
        "token_id",
        "row_index",
        "id",
        "name",
        safe_column(""),
        safe_column("a\x00b"),
        safe_column(LONG_A),
        safe_column(LONG_B),
    ]
    assert list(written[0].values())[2:] == [0, "ann", "e", "n", 1, 2]
    assert all(len(name.encode()) <= 63 for name in written[0])

    diverted = read_jsonl(tmp_path / "failed.jsonl")
    assert [row["id"] for row in diverted] == [1, 2]
    assert {row["_error_node"] for row in diverted} == {"out"}
    errors = [row["_error"] for row in diverted]
    if sink_database.startswith("sqlite"):
        assert errors == [
            "fields 'name' and 'NAME' map to one column 'NAME'",
            "field 'Token_ID' maps to the sink's own column 'token_id'",
        ]
    else:
        assert errors == [
            "field 'NAME' has no column in table 'people'",
            "field 'Token_ID' has no column in table 'people'",
        ]

    ended = await outcomes(sqlite_url, result.run_id)
    assert [ended[i][:2] for i in range(4)] == [
        ("completed", "out"),
        ("diverted", "failed"),
        ("diverted", "failed"),
        ("completed", "out"),
    ]
    assert [ended[i][2]["error"]["message"] for i in (1, 2)] == errors
    assert result.row_errors == 2


async def test_default_fail_ends_the_row_failed_and_the_run_goes_on(
    run_verified: RunVerified, sqlite_url: str, tmp_path: Path
) -> None:
    rows = [{"a": 1}, {"a": 2, "b": "not a column"}, {"a": 3}]
    config = {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "out"},
        "sinks": [
            {
                "name": "out",
                "plugin": "csv",
                "options": {"path": str(tmp_path / "out.csv"), "columns": ["a"]},
            }
        ],
    }
    result = await run_verified(config)
    assert (tmp_path / "out.csv").read_text() == "a\n1\n3\n"
    ended = await outcomes(sqlite_url, result.run_id)
    assert ended[1][0] == "failed"
    assert "not a column" in ended[1][2]["error"]["message"]
    assert result.row_errors == 1


async def test_discard_ends_the_row_diverted_with_its_error_in_the_landscape(
    run_verified: RunVerified, sqlite_url: str, tmp_path: Path
) -> None:
    rows = [{"a": 1}, {"a": 2, "b": "not a column"}, {"a": 3}]
    primary = {"plugin": "csv", "options": {"path": str(tmp_path / "out.csv"), "columns": ["a"]}}
    config = failsink_config(rows, primary, tmp_path, on_write_failure="discard")
    config["sinks"].pop()
    result = await run_verified(config)
    assert (tmp_path / "out.csv").read_text() == "a\n1\n3\n"
    outcome, sink, context = (await outcomes(sqlite_url, result.run_id))[1]
    assert (outcome, sink) == ("diverted", None)
    assert context["error"]["message"] == "field 'b' is not a column of out.csv"
    assert result.row_errors == 1


async def test_a_failsink_that_cannot_write_the_row_settles_it_by_its_own_setting(
    run_verified: RunVerified, sqlite_url: str, tmp_path: Path
) -> None:
    rows = [{"a": 1}, {"a": 2, "b": "not a column"}]
    primary = {"plugin": "csv", "options": {"path": str(tmp_path / "out.csv"), "columns": ["a"]}}
    config = failsink_config(rows, primary, tmp_path)
    config["sinks"][1] = {
        "name": "failed",
        "plugin": "csv",
        "options": {"path": str(tmp_path / "failed.csv"), "columns": ["a", "_error"]},
    }
    result = await run_verified(config)
    outcome, sink, context = (await outcomes(sqlite_url, result.run_id))[1]
    assert (outcome, sink) == ("failed", None)
    assert context["node"] == "failed"
    assert (tmp_path / "failed.csv").read_text() == "a,_error\n"


async def test_a_refused_write_costs_only_the_row_it_refused(
    run_verified: RunVerified, sqlite_url: str, tmp_path: Path
) -> None:
    rows = [{"i": i} for i in range(8)]
    primary = {
        "plugin": "tests.integration.refusing_sink:RefusingSink",
        "options": {"path": str(tmp_path / "out.jsonl"), "refuse": 3},
        "batch_size": 8,
    }
    result = await run_verified(failsink_config(rows, primary, tmp_path))
    assert [row["i"] for row in read_jsonl(tmp_path / "out.jsonl")] == [0, 1, 2, 4, 5, 6, 7]
    assert [row["i"] for row in read_jsonl(tmp_path / "failed.jsonl")] == [3]
    ended = await outcomes(sqlite_url, result.run_id)
    assert ended[3][:2] == ("diverted", "failed")
    assert "refused" in ended[3][2]["error"]["message"]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that fills up and refuses writes (needs mount rights)."""
    target = tmp_path / "tiny"
    target.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.parametrize("plugin", ["jsonl", "csv"])
def test_a_full_disk_diverts_what_no_longer_fits_and_verify_agrees(
    cli: Cli, tiny_disk: Path, tmp_path: Path, plugin: str
) -> None:
    rows = [{"i": i, "text": "x" * 900} for i in range(150)]  # ~135 KB: twice the disk
    (tmp_path / "rows.jsonl").write_text(
        "".join(f'{{"i":{r["i"]},"text":"{r["text"]}"}}\n' for r in rows)
    )
    pipeline = {
        "source": {
            "plugin": "jsonl",
            "options": {"path": "rows.jsonl"},
            "on_success": "out",
        },
        "sinks": [
            {
                "name": "out",
                "plugin": plugin,
                "options": {"path": str(tiny_disk / f"out.{plugin}")},
                "batch_size": 10,
                "on_write_failure": "failed",
            },
            {"name": "failed", "plugin": "jsonl", "options": {"path": "failed.jsonl"}},
        ],
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    run = cli("run", "pipeline.yaml", "--landscape", url)
    assert run.returncode == 4, run.stdout + run.stderr
    run_id = run_id_of(run.stdout)

    failed = [row["i"] for row in read_jsonl(tmp_path / "failed.jsonl")]
    if plugin == "jsonl":
        landed = [row["i"] for row in read_jsonl(tiny_disk / "out.jsonl")]
    else:
        lines = (tiny_disk / "out.csv").read_text().splitlines()
        landed = [int(line.split(",")[0]) for line in lines[1:]]
    assert failed, "the disk never filled up"
    assert landed, "nothing fitted on the disk"
    assert sorted(landed + failed) == list(range(150))
    for row in read_jsonl(tmp_path / "failed.jsonl"):
        assert "refused" in row["_error"]

    verify = cli("verify", run_id, "--landscape", url)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"{len(failed)} diverted by a sink that could not write them" in verify.stdout
    explain = cli("explain", run_id, "--row-index", str(failed[0]), "--landscape", url)
    assert explain.returncode == 0, explain.stderr
    assert "diverted" in explain.stdout
    assert "refused" in explain.stdout


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("nowhere", "'nowhere' is not a sink"),
        ("out", "cannot take its own write failures"),
    ],
)
def test_a_bad_on_write_failure_is_refused_with_its_key_path(
    tmp_path: Path, setting: str, message: str
) -> None:
    config = failsink_config(
        [{"a": 1}], {"plugin": "jsonl", "options": {"path": "o.jsonl"}}, tmp_path
    )
    config["sinks"][0]["on_write_failure"] = setting
    with pytest.raises(ConfigError) as refused:
        Pipeline.from_dict(config, base_dir=tmp_path)
    assert "sinks[0].on_write_failure" in str(refused.value)
    assert message in str(refused.value)


def test_failsinks_in_a_cycle_are_refused(tmp_path: Path) -> None:
    config = failsink_config(
        [{"a": 1}], {"plugin": "jsonl", "options": {"path": "o.jsonl"}}, tmp_path
    )
    config["sinks"][1]["on_write_failure"] = "out"
    with pytest.raises(ConfigError, match="cycle"):
        Pipeline.from_dict(config, base_dir=tmp_path)


async def test_a_row_on_its_way_to_the_failsink_when_the_run_failed_lands_there_on_resume(
    sqlite_url: str, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    rows = [{"a": 1}, {"a": 2, "b": "not a column"}, {"a": 3}]
    primary = {"plugin": "csv", "options": {"path": str(tmp_path / "out.csv"), "columns": ["a"]}}
    config = failsink_config(rows, primary, tmp_path)
    config["sinks"][1] = {
        "name": "failed",
        "plugin": "tests.integration.refusing_sink:BrokenSink",
        "options": {"path": str(tmp_path / "failed.jsonl"), "broken_while": str(broken)},
    }
    pipeline = Pipeline.from_dict(config, base_dir=tmp_path, landscape_url=sqlite_url)
    with pytest.raises(RunFailed, match="the device is gone"):
        await pipeline.run()
    async with Landscape.connect(sqlite_url) as landscape:
        (run,) = await landscape.list_runs()
    assert run.status == "failed"

    broken.unlink()
    result = await pipeline.resume(run.run_id)
    assert result.status == "completed"
    assert read_jsonl(tmp_path / "failed.jsonl") == [
        {
            "a": 2,
            "b": "not a column",
            "_error": "field 'b' is not a column of out.csv",
            "_error_node": "out",
        }
    ]
    assert (tmp_path / "out.csv").read_text() == "a\n1\n3\n"
    assert (await outcomes(sqlite_url, result.run_id))[1][:2] == ("diverted", "failed")
    async with Landscape.connect(sqlite_url) as landscape:
        report = await landscape.verify(result.run_id)
    assert report.ok, [str(v) for v in report.violations]
    assert report.diverted == 1
