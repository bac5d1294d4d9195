"""Graceful shutdown, checkpoints and resume, in process (signals and kill -9 are in
tests/integration/test_crash_resume.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import pytest

from engine import Pipeline, ResumeError, RunResult
from landscape import Landscape
from landscape import _schema as t
from plugins import BatchContext, Row, RowContext, Transform
from plugins._aggregations import CollectAggregation
from tests._read import attempts_at, read_jsonl, table_rows

from .conftest import linear_config


class Stall(Transform):
    """Tags rows; while ``stall_at`` is set, that row hangs until cancelled."""

    name: ClassVar[str] = "stall"
    stall_at: ClassVar[int | None] = None
    stalled: ClassVar[anyio.Event]

    async def process(self, row: Row, ctx: RowContext) -> Row:
        if row["i"] == Stall.stall_at:
            Stall.stalled.set()
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()
        return {**row, "tagged": row["i"] * 10}


@pytest.fixture(autouse=True)
def _reset_stall() -> None:
    Stall.stall_at = None
    Stall.stalled = anyio.Event()


async def verified(url: str, run_id: str) -> Any:
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(run_id)
    assert report.ok, [str(v) for v in report.violations]
    return report


def stall_config(rows: list[dict[str, Any]], out: Path, **runtime: Any) -> dict[str, Any]:
    config = linear_config(
        rows,
        out,
        source_to="tag",
        transforms=[
            {
                "name": "tag",
                "plugin": Stall,
                "input": "tag",
                "on_success": "out",
                "concurrency": 4,
            }
        ],
    )
    config["runtime"] = {
        "drain_timeout_seconds": 0.2,
        "checkpoint_every_rows": 5,
        "max_buffer_size": 4,
        **runtime,
    }
    return config


async def stop_when_stalled(pipeline: Pipeline, *, force: bool = False) -> RunResult:
    results: list[RunResult] = []

    async def run() -> None:
        results.append(await pipeline.run())

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await Stall.stalled.wait()
            pipeline.stop(force=force)
    (result,) = results
    return result


async def test_stop_cancels_work_after_the_drain_timeout_and_resume_finishes_the_run(
    tmp_path: Path, landscape_url: str
) -> None:
    rows = [{"i": i} for i in range(60)]
    config = stall_config(rows, tmp_path)
    Stall.stall_at = 20
    first = await stop_when_stalled(Pipeline.from_dict(config, landscape_url=landscape_url))
    assert first.status == "interrupted"
    assert first.rows_processed < 60
    report = await verified(landscape_url, first.run_id)
    assert report.watermark == 19  # row 20 hangs; every row before it finished
    cancelled = await table_rows(
        landscape_url, t.node_states, t.node_states.c.status == "cancelled"
    )
    assert [s["node_id"] for s in cancelled] == ["tag"]
    assert all(s["status"] != "open" for s in await table_rows(landscape_url, t.node_states))
    written = [r["i"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert 20 not in written
    assert len(written) == len(set(written))

    Stall.stall_at = None
    second = await Pipeline.from_dict(config, landscape_url=landscape_url).resume(first.run_id)
    assert second.run_id == first.run_id
    assert second.status == "completed"
    assert second.rows_processed == 60
    assert second.outcomes == {"completed": 60}
    out = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["i"] for r in out) == list(range(60))
    assert all(r["tagged"] == r["i"] * 10 for r in out)
    await verified(landscape_url, first.run_id)
    # The row cancelled by the stop was re-done as a second attempt of the same token.
    assert await attempts_at(landscape_url, 20, "tag") == [(1, "cancelled"), (2, "completed")]


async def test_force_stop_cancels_at_once(tmp_path: Path, sqlite_url: str) -> None:
    config = stall_config([{"i": i} for i in range(30)], tmp_path, drain_timeout_seconds=600)
    Stall.stall_at = 3
    with anyio.fail_after(20):  # far below the drain timeout
        result = await stop_when_stalled(
            Pipeline.from_dict(config, landscape_url=sqlite_url), force=True
        )
    assert result.status == "interrupted"
    await verified(sqlite_url, result.run_id)


async def test_cancelling_the_callers_scope_stops_gracefully_then_lets_the_cancellation_through(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = stall_config([{"i": i} for i in range(40)], tmp_path)
    Stall.stall_at = 10
    pipeline = Pipeline.from_dict(config, landscape_url=sqlite_url)
    reached_after_run = False
    with anyio.fail_after(30):
        async with anyio.create_task_group() as service:

            async def handler() -> None:
                nonlocal reached_after_run
                await pipeline.run()
                reached_after_run = True

            service.start_soon(handler)
            await Stall.stalled.wait()
            service.cancel_scope.cancel()
    assert not reached_after_run  # the cancellation reached the caller
    result = pipeline.last_result
    assert result is not None
    assert result.status == "interrupted"
    (run,) = await table_rows(sqlite_url, t.runs)
    assert run["status"] == "interrupted"
    (checkpoint, *_) = await table_rows(
        sqlite_url, t.checkpoints, t.checkpoints.c.state_json.like('%"reason":"interrupted"%')
    )
    assert checkpoint["watermark_row_index"] == 9
    await verified(sqlite_url, result.run_id)
    Stall.stall_at = None
    resumed = await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(result.run_id)
    assert resumed.outcomes == {"completed": 40}
    assert sorted(r["i"] for r in read_jsonl(tmp_path / "out.jsonl")) == list(range(40))
    await verified(sqlite_url, result.run_id)


async def test_native_asyncio_cancellation_is_a_graceful_stop_too(
    tmp_path: Path, sqlite_url: str
) -> None:
    import asyncio

    config = stall_config([{"i": i} for i in range(40)], tmp_path)
    Stall.stall_at = 7
    pipeline = Pipeline.from_dict(config, landscape_url=sqlite_url)
    task = asyncio.ensure_future(pipeline.run())
    with anyio.fail_after(30):
        await Stall.stalled.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pipeline.last_result is not None
    assert pipeline.last_result.status == "interrupted"
    await verified(sqlite_url, pipeline.last_result.run_id)


async def test_checkpoints_are_written_every_n_rows_with_a_low_water_mark(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = stall_config([{"i": i} for i in range(40)], tmp_path, checkpoint_every_rows=10)
    result = await Pipeline.from_dict(config, landscape_url=sqlite_url).run()
    checkpoints = await table_rows(sqlite_url, t.checkpoints)
    states = [json.loads(c["state_json"]) for c in checkpoints]
    assert [s["reason"] for s in states][-1] == "completed"
    assert states[-1]["rows_read"] == 40
    assert checkpoints[-1]["watermark_row_index"] == 39
    assert all(
        c["watermark_row_index"] < s["rows_read"] for c, s in zip(checkpoints, states, strict=True)
    )
    assert len(checkpoints) >= 2
    await verified(sqlite_url, result.run_id)


async def test_resume_refuses_a_completed_run(tmp_path: Path, sqlite_url: str) -> None:
    config = stall_config([{"i": i} for i in range(5)], tmp_path)
    result = await Pipeline.from_dict(config, landscape_url=sqlite_url).run()
    with pytest.raises(ResumeError, match="is completed"):
        await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(result.run_id)


async def test_resume_refuses_a_changed_pipeline(tmp_path: Path, sqlite_url: str) -> None:
    rows = [{"i": i} for i in range(30)]
    config = stall_config(rows, tmp_path)
    Stall.stall_at = 5
    first = await stop_when_stalled(Pipeline.from_dict(config, landscape_url=sqlite_url))
    changed = stall_config(rows, tmp_path)
    changed["transforms"][0]["concurrency"] = 2
    with pytest.raises(ResumeError, match="nodes changed: tag"):
        await Pipeline.from_dict(changed, landscape_url=sqlite_url).resume(first.run_id)
    (run,) = await table_rows(sqlite_url, t.runs)
    assert run["status"] == "interrupted"  # refused before anything ran


async def test_resume_refuses_a_changed_source(tmp_path: Path, sqlite_url: str) -> None:
    rows = [{"i": i} for i in range(30)]
    Stall.stall_at = 12
    first = await stop_when_stalled(
        Pipeline.from_dict(stall_config(rows, tmp_path), landscape_url=sqlite_url)
    )
    edited = [dict(r) for r in rows]
    edited[2] = {"i": 2, "edited": True}
    with pytest.raises(ResumeError, match="source 'source' changed"):
        await Pipeline.from_dict(stall_config(edited, tmp_path), landscape_url=sqlite_url).resume(
            first.run_id
        )


async def test_resume_refuses_a_one_shot_source(tmp_path: Path, sqlite_url: str) -> None:
    Stall.stall_at = 4
    first = await stop_when_stalled(
        Pipeline.from_dict(
            stall_config([{"i": i} for i in range(20)], tmp_path), landscape_url=sqlite_url
        )
    )
    once = ({"i": i} for i in range(20))
    with pytest.raises(ResumeError, match="one-shot iterator"):
        await Pipeline.from_dict(stall_config(once, tmp_path), landscape_url=sqlite_url).resume(  # type: ignore[arg-type]
            first.run_id
        )


async def test_resume_of_an_unknown_run_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    pipeline = Pipeline.from_dict(stall_config([{"i": 1}], tmp_path), landscape_url=sqlite_url)
    with pytest.raises(ResumeError, match="there is no Landscape at"):
        await pipeline.resume("nope")
    assert not (tmp_path / "audit.db").exists()
    await pipeline.run()
    with pytest.raises(ResumeError, match="not in the Landscape"):
        await pipeline.resume("nope")


class StallFlush(CollectAggregation):
    """``collect``, whose first flush hangs (until cancelled) while ``stall`` is set."""

    stall: ClassVar[bool] = False
    stalled: ClassVar[anyio.Event]

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        if StallFlush.stall:
            StallFlush.stalled.set()
            await anyio.sleep_forever()
        return await super().flush(rows, ctx)


def pooled_config(rows: list[dict[str, Any]], out: Path, **aggregation: Any) -> dict[str, Any]:
    config = stall_config(rows, out)
    config["transforms"][0]["on_success"] = "pool"
    config["aggregations"] = [
        {
            "name": "pool",
            "plugin": StallFlush,
            "input": "pool",
            "on_success": "out",
            "trigger": {"count": 4},
            "options": {"field": "members"},
            **aggregation,
        }
    ]
    return config


def members_of(out: Path) -> list[list[int]]:
    return [[m["i"] for m in row["members"]] for row in read_jsonl(out / "out.jsonl")]


async def test_a_flush_cancelled_by_the_stop_is_redone_as_a_new_attempt_of_its_batch(
    tmp_path: Path, landscape_url: str
) -> None:
    StallFlush.stall, StallFlush.stalled = True, anyio.Event()
    config = pooled_config([{"i": i} for i in range(10)], tmp_path)
    pipeline = Pipeline.from_dict(config, landscape_url=landscape_url)
    results: list[RunResult] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                results.append(await pipeline.run())

            tg.start_soon(run)
            await StallFlush.stalled.wait()
            pipeline.stop()
    (first,) = results
    assert first.status == "interrupted"
    await verified(landscape_url, first.run_id)
    StallFlush.stall = False
    resumed = await Pipeline.from_dict(config, landscape_url=landscape_url).resume(first.run_id)
    assert resumed.status == "completed"
    # The same batches an uninterrupted run makes.
    assert members_of(tmp_path) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batches = await table_rows(landscape_url, t.batches)
    assert sorted((b["attempt"], b["status"], b["trigger_reason"]) for b in batches) == [
        (1, "completed", "count"),
        (1, "completed", "end_of_source"),
        (1, "failed", "count"),
        (2, "completed", "count"),
    ]
    await verified(landscape_url, first.run_id)


class FailingFlush(CollectAggregation):
    """A flush that always fails; its second attempt hangs until cancelled while
    ``stall`` is set.  ``attempts`` lists the attempt of every flush it was handed."""

    stall: ClassVar[bool] = False
    stalled: ClassVar[anyio.Event]
    attempts: ClassVar[list[int]] = []

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        FailingFlush.attempts.append(ctx.attempt)
        if ctx.attempt == 2 and FailingFlush.stall:
            FailingFlush.stalled.set()
            await anyio.sleep_forever()
        raise RuntimeError(f"attempt {ctx.attempt} fails")


async def test_batch_attempts_go_on_counting_across_a_resume_and_retries_bound_them(
    tmp_path: Path, landscape_url: str
) -> None:
    FailingFlush.stall, FailingFlush.stalled, FailingFlush.attempts = True, anyio.Event(), []
    config = pooled_config([{"i": i} for i in range(4)], tmp_path, plugin=FailingFlush, retries=1)
    pipeline = Pipeline.from_dict(config, landscape_url=landscape_url)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline.run)
            await FailingFlush.stalled.wait()
            pipeline.stop()  # attempt 2 is cut short: no failure of the batch's
    first = pipeline.last_result
    assert first is not None
    assert first.status == "interrupted"
    FailingFlush.stall = False
    resumed = await Pipeline.from_dict(config, landscape_url=landscape_url).resume(first.run_id)
    assert resumed.status == "completed"
    # Attempt 1 failed, 2 was cut short, 3 failed: with retries 1 the batch gives up.
    assert FailingFlush.attempts == [1, 2, 3]
    batches = await table_rows(landscape_url, t.batches)
    assert sorted((b["attempt"], b["status"]) for b in batches) == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
    ]
    states = await table_rows(landscape_url, t.node_states, t.node_states.c.node_id == "pool")
    flushes = {b["aggregation_state_id"]: b["attempt"] for b in batches}
    assert sorted((s["attempt"], s["status"]) for s in states if s["state_id"] in flushes) == [
        (1, "failed"),
        (2, "cancelled"),
        (3, "failed"),
    ]
    assert all(s["attempt"] == flushes[s["state_id"]] for s in states if s["state_id"] in flushes)
    assert resumed.outcomes == {"failed": 4}
    await verified(landscape_url, first.run_id)


async def test_a_draft_batch_held_at_a_forced_stop_is_restored_with_its_members(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = pooled_config([{"i": i} for i in range(12)], tmp_path, trigger={"count": 5})
    Stall.stall_at = 7
    first = await stop_when_stalled(
        Pipeline.from_dict(config, landscape_url=sqlite_url), force=True
    )
    assert first.status == "interrupted"
    drafts = await table_rows(sqlite_url, t.batches, t.batches.c.status == "draft")
    assert len(drafts) == 1
    await verified(sqlite_url, first.run_id)
    Stall.stall_at = None
    resumed = await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(first.run_id)
    assert resumed.status == "completed"
    assert members_of(tmp_path) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    batches = await table_rows(sqlite_url, t.batches)
    assert len(batches) == 3
    assert drafts[0]["batch_id"] in {b["batch_id"] for b in batches if b["status"] == "completed"}
    await verified(sqlite_url, first.run_id)


def jsonl_stall_config(data: Path, out: Path) -> dict[str, Any]:
    config = stall_config([], out)
    config["source"] = {"plugin": "jsonl", "options": {"path": str(data)}, "on_success": "tag"}
    return config


async def test_a_file_source_resumes_from_its_recorded_position_and_notices_edits(
    tmp_path: Path, sqlite_url: str
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(60)))
    config = jsonl_stall_config(data, tmp_path)
    Stall.stall_at = 30
    first = await stop_when_stalled(Pipeline.from_dict(config, landscape_url=sqlite_url))
    (checkpoint, *_) = await table_rows(
        sqlite_url, t.checkpoints, t.checkpoints.c.state_json.like('%"reason":"interrupted"%')
    )
    state = json.loads(checkpoint["state_json"])
    assert state["source_position"]["line"] == state["rows_read"]
    assert "source_digest" not in state
    Stall.stall_at = None
    lines = data.read_text().splitlines(keepends=True)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join([lines[0], json.dumps({"i": 1, "edited": True}) + "\n", *lines[2:]]))
    data.rename(tmp_path / "original.jsonl")
    edited.rename(data)
    with pytest.raises(ResumeError, match=r"lines of data\.jsonl are not the ones read"):
        await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(first.run_id)
    (tmp_path / "original.jsonl").replace(data)
    resumed = await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(first.run_id)
    assert resumed.outcomes == {"completed": 60}
    assert sorted(r["i"] for r in read_jsonl(tmp_path / "out.jsonl")) == list(range(60))
    await verified(sqlite_url, first.run_id)
