"""Batch-aware chat: several rows per request, answers mapped back to their own rows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import select

from engine import ManualClock, Pipeline
from landscape import Landscape
from landscape import _schema as t
from plugins.llm import Fault, MockLlmServer, MockSettings, UniformLatency
from tests._read import read_jsonl

from .conftest import llm_node, pipeline, tickets

Run = Callable[..., Any]


def received(pipeline: Pipeline, node_id: str) -> int:
    snapshot = pipeline.statistics()
    if snapshot is None:
        return 0
    return next(n.received for n in snapshot.nodes if n.node_id == node_id)


async def until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition``, looking again whenever the event loop has run a while."""
    while not condition():  # noqa: ASYNC110 - what is awaited lives in another process
        await anyio.sleep(0.005)


async def table(url: str, which: Any) -> list[dict[str, Any]]:
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(select(which))).mappings()]


async def test_batched_answers_equal_one_request_per_row_and_keep_the_order(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(seed=9, latency=UniformLatency(0.0, 0.02))
    single, batched = tmp_path / "single", tmp_path / "batched"
    single.mkdir()
    batched.mkdir()
    async with MockLlmServer(settings) as server:
        await run_verified(
            pipeline(server.base_url, tickets(23), single),
            url=f"sqlite+aiosqlite:///{single / 'audit.db'}",
        )
        server.reset_statistics()
        node = llm_node(concurrency=3, batch_size=5, batch_wait_ms=20)
        result = await run_verified(
            pipeline(server.base_url, tickets(23), batched, transforms=[node])
        )
        stats = server.statistics()
    assert read_jsonl(batched / "out.jsonl") == read_jsonl(single / "out.jsonl")
    assert stats.batch_requests == stats.requests
    assert stats.batch_rows == 23
    assert 5 <= stats.requests <= 6  # batches of 5 (a timer may split one)
    calls = await table(sqlite_url, t.calls)
    # every row explains itself: each state has the shared call, with its share of tokens
    assert len(calls) == 23
    assert len({c["state_id"] for c in calls}) == 23
    assert result.calls.calls == stats.requests
    tokens = sum((c["prompt_tokens"] or 0) + (c["completion_tokens"] or 0) for c in calls)
    assert tokens == result.calls.tokens


async def test_answers_in_another_order_go_back_to_their_own_rows(
    run_verified: Run, tmp_path: Path
) -> None:
    settings = MockSettings(seed=4, faults={Fault.SHUFFLED_ANSWERS: 1.0})
    reference = tmp_path / "reference"
    reference.mkdir()
    async with MockLlmServer(MockSettings(seed=4)) as server:
        await run_verified(
            pipeline(server.base_url, tickets(12), reference),
            url=f"sqlite+aiosqlite:///{reference / 'audit.db'}",
        )
    async with MockLlmServer(settings) as server:
        node = llm_node(batch_size=4)
        await run_verified(pipeline(server.base_url, tickets(12), tmp_path, transforms=[node]))
        assert server.statistics().faults_injected[Fault.SHUFFLED_ANSWERS] > 0
    assert read_jsonl(tmp_path / "out.jsonl") == read_jsonl(reference / "out.jsonl")


async def test_a_wrong_number_of_answers_is_asked_again_then_only_the_unanswered_row_fails(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(faults={Fault.WRONG_ANSWER_COUNT: 1.0})
    async with MockLlmServer(settings) as server:
        node = llm_node(batch_size=4, options={"parse_retries": 1})
        result = await run_verified(
            pipeline(server.base_url, tickets(4), tmp_path, transforms=[node])
        )
        assert server.statistics().requests == 2
    # the mock leaves out the last answer: the rows answered keep their answers
    assert [row["id"] for row in read_jsonl(tmp_path / "out.jsonl")] == [0, 1, 2]
    (error,) = read_jsonl(tmp_path / "errors.jsonl")
    assert error["id"] == 3
    assert "no item with index 3 for this row (3 items for 4 rows)" in error["_error"]
    assert result.outcomes == {"completed": 3, "quarantined": 1}
    calls = await table(sqlite_url, t.calls)
    assert sorted({c["call_index"] for c in calls}) == [0, 1]
    assert len(calls) == 2 * 4  # two requests, recorded for each of the four rows


async def test_a_partial_batch_leaves_at_end_of_input_before_its_wait_is_over(
    tmp_path: Path, sqlite_url: str
) -> None:
    clock = ManualClock()
    async with MockLlmServer(MockSettings()) as server:
        node = llm_node(batch_size=10, batch_wait_ms=500)
        config = pipeline(server.base_url, tickets(3), tmp_path, transforms=[node])
        result = await Pipeline.from_dict(config, landscape_url=sqlite_url, clock=clock).run()
        stats = server.statistics()
    # end of input sends the partial batch even though its wait never passed on this clock
    assert stats.requests == 1
    assert stats.batch_rows == 3
    assert result.outcomes == {"completed": 3}


async def test_a_partial_batch_leaves_on_its_timer_while_the_source_is_idle(
    tmp_path: Path, sqlite_url: str
) -> None:
    clock = ManualClock()
    release = anyio.Event()

    async def rows() -> AsyncIterator[dict[str, Any]]:
        for row in tickets(3):
            yield row
        await release.wait()
        yield {"id": 3, "text": "late ticket"}

    async with MockLlmServer(MockSettings()) as server:
        node = llm_node(batch_size=10, batch_wait_ms=600_000)  # ten minutes on the run clock
        config = pipeline(server.base_url, rows(), tmp_path, transforms=[node])
        pipeline_run = Pipeline.from_dict(config, landscape_url=sqlite_url, clock=clock)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipeline_run.run)
            with anyio.fail_after(10):
                await until(lambda: received(pipeline_run, "classify") == 3)
                await anyio.wait_all_tasks_blocked()
                assert server.statistics().requests == 0  # the batch waits for more rows
                clock.advance(600)
                await until(lambda: server.statistics().batch_rows == 3)
            release.set()
        stats = server.statistics()
    assert stats.requests == 2
    assert stats.batch_rows == 4
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [row["id"] for row in out] == [0, 1, 2, 3]


async def test_rows_whose_system_prompts_differ_are_not_batched_together(
    run_verified: Run, tmp_path: Path
) -> None:
    async with MockLlmServer(MockSettings()) as server:
        node = llm_node(batch_size=3, options={"system": "You answer ticket {{ row.id }}."})
        result = await run_verified(
            pipeline(server.base_url, tickets(3), tmp_path, transforms=[node])
        )
        stats = server.statistics()
    assert stats.batch_requests == 0
    assert stats.requests == 3
    assert result.outcomes == {"completed": 3}
