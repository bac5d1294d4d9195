"""Replaying a recorded run: every call answered from its record, nothing sent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from rich.console import Console

from engine import Pipeline, ReplayError
from engine._render import render_runs
from landscape import Landscape
from landscape import _schema as t
from plugins import Row, RowContext, Transform
from plugins.llm import MockLlmServer, MockSettings
from tests._read import read_jsonl

from .conftest import llm_node, pipeline, tickets
from .test_llm_batch import batch_pipeline, by_id, table

Run = Callable[..., Any]


async def replay_verified(config: dict[str, Any], replayed: str, url: str, base_dir: Path) -> Any:
    """Run ``config`` replaying run ``replayed``; assert its audit trail verifies."""
    result = await Pipeline.from_dict(config, base_dir=base_dir, landscape_url=url).run(
        replay=replayed
    )
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(result.run_id)
    assert report.ok, [str(v) for v in report.violations]
    return result


async def calls_of(url: str, run_id: str) -> list[dict[str, Any]]:
    return await table(url, t.calls, run_id)


async def replayed_from(url: str, run_id: str) -> str | None:
    (run,) = await table(url, t.runs, run_id)
    return run["replayed_from"]


def fresh(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir()
    return path


async def test_a_replay_gives_the_recorded_answers_without_calling(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    first, again = fresh(tmp_path, "first"), fresh(tmp_path, "again")
    async with MockLlmServer(MockSettings(seed=21)) as server:
        recorded = await run_verified(pipeline(server.base_url, tickets(30), first))
        before = server.statistics().requests
        result = await replay_verified(
            pipeline(server.base_url, tickets(30), again), recorded.run_id, sqlite_url, tmp_path
        )
        assert server.statistics().requests == before  # nothing went over the network
    assert read_jsonl(again / "out.jsonl") == read_jsonl(first / "out.jsonl")
    calls = await calls_of(sqlite_url, result.run_id)
    assert len(calls) == 30
    assert {c["status"] for c in calls} == {"replayed"}
    assert {c["cost"] for c in calls} == {0.0}
    recorded_calls = await calls_of(sqlite_url, recorded.run_id)
    assert {c["response_hash"] for c in calls} == {c["response_hash"] for c in recorded_calls}
    assert await replayed_from(sqlite_url, result.run_id) == recorded.run_id
    assert await replayed_from(sqlite_url, recorded.run_id) is None
    async with Landscape.connect(sqlite_url) as landscape:
        runs = {run.run_id: run for run in await landscape.list_runs()}
    assert runs[result.run_id].replayed_from == recorded.run_id
    console = Console(width=200, record=True)
    console.print(render_runs(list(runs.values())))
    assert f"(replay of {recorded.run_id})" in console.export_text()


async def test_a_request_the_recorded_run_never_made_is_the_rows_replay_miss(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    first, again = fresh(tmp_path, "first"), fresh(tmp_path, "again")
    prompt = "{% if row.id < LIMIT %}Urgent. {% endif %}Ticket {{ row.id }}: {{ row.text }}"
    async with MockLlmServer(MockSettings(seed=22)) as server:
        node = llm_node(options={"prompt": prompt.replace("LIMIT", "5")})
        recorded = await run_verified(
            pipeline(server.base_url, tickets(10), first, transforms=[node])
        )
        changed = llm_node(options={"prompt": prompt.replace("LIMIT", "3")})
        before = server.statistics().requests
        result = await replay_verified(
            pipeline(server.base_url, tickets(10), again, transforms=[changed]),
            recorded.run_id,
            sqlite_url,
            tmp_path,
        )
        assert server.statistics().requests == before
    errors = read_jsonl(again / "errors.jsonl")
    assert sorted(row["id"] for row in errors) == [3, 4]  # only their prompts changed
    assert all("replay_miss" in row["_error"] for row in errors)
    assert [row["id"] for row in read_jsonl(again / "out.jsonl")] == [0, 1, 2, 5, 6, 7, 8, 9]
    calls = await calls_of(sqlite_url, result.run_id)
    missed = [c for c in calls if c["status"] == "error"]
    assert len(missed) == 2
    assert all('"replay_miss":true' in c["error_json"] for c in missed)
    assert sum(c["status"] == "replayed" for c in calls) == 8


async def test_replaying_an_unknown_run_is_refused_before_anything_runs(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = pipeline("http://127.0.0.1:9/v1", tickets(3), tmp_path)
    with pytest.raises(ReplayError, match="no-such-run"):
        await Pipeline.from_dict(config, base_dir=tmp_path, landscape_url=sqlite_url).run(
            replay="no-such-run"
        )
    assert not (tmp_path / "out.jsonl").exists()


async def test_a_batch_job_run_replays_without_starting_a_job(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    first, again = fresh(tmp_path, "first"), fresh(tmp_path, "again")
    async with MockLlmServer(MockSettings(seed=23)) as server:
        recorded = await run_verified(batch_pipeline(server.base_url, tickets(12), first, count=5))
        created = server.statistics().batches_created
        result = await replay_verified(
            batch_pipeline(server.base_url, tickets(12), again, count=5),
            recorded.run_id,
            sqlite_url,
            tmp_path,
        )
        assert server.statistics().batches_created == created
    # Jobs end in any order: rows of different batches leave in any order.
    assert by_id(again / "out.jsonl") == by_id(first / "out.jsonl")
    calls = await calls_of(sqlite_url, result.run_id)
    assert {c["status"] for c in calls} == {"replayed"}
    assert len(calls) == 12


async def test_an_online_run_answers_a_batch_job_replay(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    """The requests of ``llm`` and ``llm_batch`` are the same, so either replays the other."""
    first, again = fresh(tmp_path, "first"), fresh(tmp_path, "again")
    async with MockLlmServer(MockSettings(seed=24)) as server:
        recorded = await run_verified(pipeline(server.base_url, tickets(6), first))
        await replay_verified(
            batch_pipeline(server.base_url, tickets(6), again, count=3),
            recorded.run_id,
            sqlite_url,
            tmp_path,
        )
        assert server.statistics().batches_created == 0
    assert sorted(read_jsonl(again / "out.jsonl"), key=lambda r: r["id"]) == read_jsonl(
        first / "out.jsonl"
    )


class PauseAt(Transform):
    """Passes rows on; the row whose ``id`` is ``at`` hangs until the run is stopped."""

    name: ClassVar[str] = "pause_at"
    at: ClassVar[int | None] = None
    reached: ClassVar[anyio.Event]

    async def process(self, row: Row, ctx: RowContext) -> Row:
        if row["id"] == PauseAt.at:
            PauseAt.reached.set()
            await anyio.sleep_forever()
        return row


async def test_resuming_a_replaying_run_replays_too(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    first, again = fresh(tmp_path, "first"), fresh(tmp_path, "again")
    pause = {"name": "pause", "plugin": PauseAt, "input": "raw", "on_success": "paused"}
    async with MockLlmServer(MockSettings(seed=25)) as server:
        recorded = await run_verified(pipeline(server.base_url, tickets(30), first))
        requests = server.statistics().requests
        config = pipeline(
            server.base_url,
            tickets(30),
            again,
            transforms=[pause, llm_node(input="paused", concurrency=4)],
            runtime={"drain_timeout_seconds": 0.2},
        )
        PauseAt.at, PauseAt.reached = 12, anyio.Event()
        replaying = Pipeline.from_dict(config, base_dir=tmp_path, landscape_url=sqlite_url)
        results: list[Any] = []
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    results.append(await replaying.run(replay=recorded.run_id))

                tg.start_soon(run)
                await PauseAt.reached.wait()
                replaying.stop()
        (stopped,) = results
        assert stopped.status == "interrupted"
        PauseAt.at = None
        resumed = await Pipeline.from_dict(
            config, base_dir=tmp_path, landscape_url=sqlite_url
        ).resume(stopped.run_id)
        assert server.statistics().requests == requests  # neither part sent anything
    assert resumed.status == "completed"
    assert by_id(again / "out.jsonl") == by_id(first / "out.jsonl")
    calls = await calls_of(sqlite_url, stopped.run_id)
    assert len(calls) == 30
    assert {c["status"] for c in calls} == {"replayed"}
    async with Landscape.connect(sqlite_url) as landscape:
        report = await landscape.verify(stopped.run_id)
    assert report.ok, [str(v) for v in report.violations]
