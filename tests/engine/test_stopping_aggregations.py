"""Stopping or cancelling a run — one that holds a batch, one whose source is idle:
nothing is left open or unexplained, and a resume goes on from there."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from engine import Pipeline, ResumeError, RunResult
from landscape import Landscape
from landscape import _schema as t
from plugins import Aggregation, BatchContext, Row
from tests._read import read_jsonl, table_rows

from .conftest import linear_config


def collect_into(out: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "agg",
        "plugin": "collect",
        "input": "raw",
        "on_success": out,
        "options": {"field": "rows"},
        **extra,
    }


async def test_stop_flushes_the_held_batch_with_trigger_shutdown(
    tmp_path: Path, sqlite_url: str
) -> None:
    enough = anyio.Event()

    async def trickle() -> AsyncIterator[dict[str, int]]:
        i = 0
        while True:
            yield {"i": i}
            i += 1
            if i == 5:
                enough.set()
            await anyio.sleep(0.001)

    config = linear_config(trickle(), tmp_path, source_to="raw", aggregations=[collect_into("out")])
    pipeline = Pipeline.from_dict(config, landscape_url=sqlite_url)
    results: list[RunResult] = []

    async def run() -> None:
        results.append(await pipeline.run())

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await enough.wait()
            pipeline.stop()
    (result,) = results
    assert result.status == "interrupted"
    (summary,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["i"] for row in summary["rows"]] == list(range(result.rows_processed))
    (batch,) = await table_rows(sqlite_url, t.batches, t.batches.c.run_id == result.run_id)
    assert batch["trigger_reason"] == "shutdown"
    assert batch["status"] == "completed"
    async with Landscape.connect(sqlite_url) as landscape:
        report = await landscape.verify(result.run_id)
    assert report.ok, report.violations


class HangingFlush(Aggregation):
    """A flush that never returns (a provider that hangs) until it is cancelled."""

    entered: ClassVar[anyio.Event]

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        HangingFlush.entered.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_cancelling_the_run_mid_flush_closes_the_flush_state_cancelled(
    tmp_path: Path, sqlite_url: str
) -> None:
    HangingFlush.entered = anyio.Event()
    config = linear_config(
        [{"i": i} for i in range(4)],
        tmp_path,
        source_to="raw",
        aggregations=[collect_into("out", plugin=HangingFlush, trigger={"count": 4})],
    )
    # Cancelling the caller is a graceful stop; the hanging flush outlives the drain.
    config["runtime"] = {"drain_timeout_seconds": 0.2}
    pipeline = Pipeline.from_dict(config, landscape_url=sqlite_url)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline.run)
            await HangingFlush.entered.wait()
            tg.cancel_scope.cancel()
    (run,) = await table_rows(sqlite_url, t.runs)
    assert run["status"] == "interrupted"
    states = await table_rows(sqlite_url, t.node_states, t.node_states.c.node_id == "agg")
    (batch,) = await table_rows(sqlite_url, t.batches)
    flush = next(s for s in states if s["state_id"] == batch["aggregation_state_id"])
    assert flush["status"] == "cancelled"
    assert all(s["status"] != "open" for s in states)


class Feed:
    """A re-iterable async source of an embedded service: each iteration yields
    ``first`` rows, then waits (idle, as a queue with nothing in it) until ``more`` is
    set, then yields ``rest`` rows and ends."""

    def __init__(self, first: int, rest: int) -> None:
        self.first, self.rest = first, rest
        self.idle = anyio.Event()
        self.more = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[dict[str, int]]:
        for i in range(self.first):
            yield {"i": i}
        self.idle.set()
        await self.more.wait()
        for i in range(self.first, self.first + self.rest):
            yield {"i": i}


async def stopped_when_idle(pipeline: Pipeline, feed: Feed, *, cancel: bool = False) -> RunResult:
    """Run ``pipeline`` until ``feed`` is idle, then stop it (or cancel the caller's
    scope); how the run ended."""
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline.run)
            await feed.idle.wait()
            await anyio.wait_all_tasks_blocked()
            if cancel:
                tg.cancel_scope.cancel()
            else:
                pipeline.stop()
    assert pipeline.last_result is not None
    return pipeline.last_result


def idle_feed_pipeline(feed: Feed, tmp_path: Path, url: str) -> Pipeline:
    config = linear_config(
        feed, tmp_path, source_to="raw", aggregations=[collect_into("out", trigger={"count": 100})]
    )
    # Far longer than the test's own limit: a stop that waited for it would fail the test.
    config["runtime"] = {"drain_timeout_seconds": 3600}
    return Pipeline.from_dict(config, landscape_url=url)


async def assert_stopped_with_the_batch_flushed(url: str, result: RunResult, rows: int) -> None:
    assert result.status == "interrupted"
    assert result.rows_processed == rows
    (batch,) = await table_rows(url, t.batches, t.batches.c.run_id == result.run_id)
    assert (batch["trigger_reason"], batch["status"]) == ("shutdown", "completed")
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(result.run_id)
    assert report.ok, report.violations


async def test_a_stop_takes_effect_while_the_source_waits_for_its_next_row(
    tmp_path: Path, sqlite_url: str
) -> None:
    feed = Feed(first=5, rest=5)
    pipeline = idle_feed_pipeline(feed, tmp_path, sqlite_url)
    result = await stopped_when_idle(pipeline, feed)
    await assert_stopped_with_the_batch_flushed(sqlite_url, result, rows=5)
    (summary,) = read_jsonl(tmp_path / "out.jsonl")
    assert [row["i"] for row in summary["rows"]] == [0, 1, 2, 3, 4]

    # The feed can be read again: a resume checks its first rows against the record
    # and reads on from the first row the run never read.
    feed.more.set()
    with anyio.fail_after(60):
        resumed = await pipeline.resume(result.run_id)
    assert resumed.status == "completed"
    assert resumed.rows_processed == 10
    batches = [[row["i"] for row in line["rows"]] for line in read_jsonl(tmp_path / "out.jsonl")]
    assert batches == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    async with Landscape.connect(sqlite_url) as landscape:
        report = await landscape.verify(result.run_id)
    assert report.ok, report.violations


async def test_cancelling_the_caller_while_the_source_is_idle_stops_the_run_at_once(
    tmp_path: Path, sqlite_url: str
) -> None:
    feed = Feed(first=3, rest=0)
    pipeline = idle_feed_pipeline(feed, tmp_path, sqlite_url)
    result = await stopped_when_idle(pipeline, feed, cancel=True)
    await assert_stopped_with_the_batch_flushed(sqlite_url, result, rows=3)


async def test_a_one_shot_async_source_is_refused_on_resume_with_the_reason(
    tmp_path: Path, sqlite_url: str
) -> None:
    feed = Feed(first=2, rest=0)
    once = aiter(feed)
    config = linear_config(once, tmp_path)
    pipeline = Pipeline.from_dict(config, landscape_url=sqlite_url)
    result = await stopped_when_idle(pipeline, feed)
    with pytest.raises(ResumeError, match="one-shot"):
        await pipeline.resume(result.run_id)


async def test_with_stop_aggregations_hold_a_stop_keeps_the_draft_and_resume_fills_it(
    tmp_path: Path, sqlite_url: str
) -> None:
    feed = Feed(first=6, rest=4)
    config = linear_config(
        feed, tmp_path, source_to="raw", aggregations=[collect_into("out", trigger={"count": 4})]
    )
    config["runtime"] = {"drain_timeout_seconds": 3600, "stop_aggregations": "hold"}
    pipeline = Pipeline.from_dict(config, landscape_url=sqlite_url)
    first = await stopped_when_idle(pipeline, feed)
    assert first.status == "interrupted"
    assert [[r["i"] for r in line["rows"]] for line in read_jsonl(tmp_path / "out.jsonl")] == [
        [0, 1, 2, 3]
    ]
    batches = await table_rows(sqlite_url, t.batches)
    assert sorted((b["status"], b["trigger_reason"]) for b in batches) == [
        ("completed", "count"),
        ("draft", None),
    ]
    async with Landscape.connect(sqlite_url) as landscape:
        report = await landscape.verify(first.run_id)
    assert report.ok, report.violations
    assert report.watermark == 3  # rows 4 and 5 are held in the draft
    feed.more.set()
    with anyio.fail_after(60):
        resumed = await pipeline.resume(first.run_id)
    assert resumed.status == "completed"
    # As an uninterrupted run batches them: no partial batch at the stop.
    assert [[r["i"] for r in line["rows"]] for line in read_jsonl(tmp_path / "out.jsonl")] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    async with Landscape.connect(sqlite_url) as landscape:
        report = await landscape.verify(first.run_id)
    assert report.ok, report.violations
