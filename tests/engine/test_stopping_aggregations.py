"""Stopping or cancelling a run that holds a batch: nothing is left open or unexplained."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio

from engine import Pipeline, RunResult
from landscape import Landscape
from landscape import _schema as t
from plugins import Aggregation, BatchContext, Row
from tests._read import table_rows

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
