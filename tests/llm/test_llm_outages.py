"""An endpoint that is down, or asks for a wait without end: capped retry waits,
rows held back (not failed) while the circuit breaker is open, a run stopped once
an outage lasts too long or too many rows failed, and resumes that finish the job.

Outages are made of two servers taking turns on one port: a failing one, then a
healthy one.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from sqlalchemy import select

from engine import Pipeline, RunResult
from landscape import Landscape
from landscape import _schema as t
from plugins.llm import Fault, MockLlmServer, MockSettings
from tests._read import read_jsonl

from .conftest import llm_node, pipeline, tickets

Run = Callable[..., Any]


def ids(path: Path) -> list[int]:
    return [row["id"] for row in read_jsonl(path)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def calls_of(url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's calls in the order they were recorded, their errors parsed."""
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        query = select(t.calls).where(t.calls.c.run_id == run_id).order_by(t.calls.c.created_at)
        calls = [dict(row) for row in (await conn.execute(query)).mappings()]
    for call in calls:
        call["error"] = json.loads(call["error_json"]) if call["error_json"] else None
    return calls


async def recorded_stop(url: str, run_id: str) -> tuple[str, str | None]:
    """The run's recorded status and the reason it ended with."""
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        query = select(t.runs.c.status, t.runs.c.error).where(t.runs.c.run_id == run_id)
        status, reason = (await conn.execute(query)).one()
    return str(status), reason


async def resumed(config: dict[str, Any], url: str, run_id: str, base_dir: Path) -> RunResult:
    """Resume ``run_id`` and check its audit trail."""
    result = await Pipeline.from_dict(config, base_dir=base_dir, landscape_url=url).resume(run_id)
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(run_id)
    assert report.ok, [str(v) for v in report.violations]
    return result


# -- Retry-After without end ------------------------------------------------------------------

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "mock-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": '{"label": "other", "score": 0.5}'},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 10, "completion_tokens": 9, "total_tokens": 19},
}


@asynccontextmanager
async def rate_limited_once(retry_after: str) -> AsyncIterator[str]:
    """A chat endpoint answering each request's first arrival with 429 and
    ``Retry-After: <retry_after>``, and the next with an answer; its base URL."""
    seen: Counter[bytes] = Counter()

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        seen[body] += 1
        if seen[body] == 1:
            error = {"error": {"message": "Rate limit reached.", "type": "requests"}}
            return web.json_response(error, status=429, headers={"Retry-After": retry_after})
        return web.json_response(ANSWER)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("header", "recorded"), [("inf", "inf"), ("1e9", 1e9)])
async def test_a_retry_after_without_end_is_capped_and_the_wait_is_recorded(
    header: str, recorded: Any, run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    cap = 0.2
    async with rate_limited_once(header) as base_url:
        config = pipeline(
            base_url,
            tickets(2),
            tmp_path,
            endpoint_options={"max_retry_wait_seconds": cap, "timeout_seconds": 5},
        )
        with anyio.fail_after(30):  # uncapped, the rows would wait for ever
            result = await run_verified(config)
    assert result.outcomes == {"completed": 2}
    assert ids(tmp_path / "out.jsonl") == [0, 1]
    calls = await calls_of(sqlite_url, result.run_id)
    assert len(calls) == 4
    limited = [c for c in calls if c["status"] == "error"]
    assert len(limited) == 2
    for call in limited:
        assert call["http_status"] == 429
        assert call["attempt"] == 1
        assert call["error"]["retry_wait_seconds"] == cap
        assert call["error"]["retry_after_seconds"] == recorded
        assert call["error"]["retry_wait_capped"] is True
    for call in calls:
        if call["status"] == "success":
            assert call["attempt"] == 2
            (before,) = [c for c in limited if c["state_id"] == call["state_id"]]
            began = call["created_at"] - call["latency_ms"] / 1000
            assert cap - 0.05 <= began - before["created_at"] < 10  # waited the cap


# -- the circuit breaker holds rows back ------------------------------------------------------


async def test_rows_wait_while_the_endpoint_is_down_and_all_succeed_once_it_is_back(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows, port = 60, free_port()
    # Down: every request hangs until the server goes away a second later.
    down = MockSettings(faults={Fault.HANG: 1.0}, hang_seconds=5.0)
    finished = anyio.Event()
    served: list[int] = []

    async def endpoint() -> None:
        async with MockLlmServer(down, port=port) as server:
            await server.wait_in_flight(16)
            await anyio.sleep(1.0)
        served.append(server.statistics().requests)
        async with MockLlmServer(MockSettings(), port=port) as server:
            await finished.wait()
        served.append(server.statistics().requests)

    config = pipeline(
        f"http://127.0.0.1:{port}/v1",
        tickets(rows),
        tmp_path,
        transforms=[llm_node(concurrency=16)],
        # the default breaker (10 failures, on_open wait), quicker to probe
        endpoint_options={"circuit_breaker": {"reset_seconds": 0.3}},
    )
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(endpoint)
            result = await run_verified(config)
            finished.set()
    assert result.status == "completed"
    assert result.outcomes == {"completed": rows}
    assert read_jsonl(tmp_path / "errors.jsonl") == []
    assert ids(tmp_path / "out.jsonl") == list(range(rows))
    calls = await calls_of(sqlite_url, result.run_id)
    failed = [c for c in calls if c["status"] == "error"]
    assert len(failed) >= 16  # the 16 hanging calls (and more): the breaker opened
    assert not [c for c in failed if c["error"].get("circuit_open")]
    assert served[0] >= 16


async def test_an_outage_past_max_outage_seconds_stops_the_run_and_a_resume_finishes_it(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows, port = 60, free_port()
    config = pipeline(
        f"http://127.0.0.1:{port}/v1",
        tickets(rows),
        tmp_path,
        transforms=[llm_node(concurrency=16)],
        endpoint_options={
            "max_attempts": 50,  # a probe now and then never uses a row's attempts up
            "circuit_breaker": {"reset_seconds": 0.2, "max_outage_seconds": 1.0},
        },
    )
    async with MockLlmServer(MockSettings(faults={Fault.SERVER_ERROR: 1.0}), port=port):
        with anyio.fail_after(60):
            first = await run_verified(config)
    assert first.status == "interrupted"
    assert first.stop_reason is not None
    assert "endpoint 'local' down" in first.stop_reason
    assert "max_outage_seconds (1)" in first.stop_reason
    assert await recorded_stop(sqlite_url, first.run_id) == ("interrupted", first.stop_reason)
    # No row failed: those waiting for the endpoint were left for the resume.
    assert first.outcomes == {}
    assert first.row_errors == 0
    assert read_jsonl(tmp_path / "errors.jsonl") == []
    assert read_jsonl(tmp_path / "out.jsonl") == []

    async with MockLlmServer(MockSettings(), port=port) as server:
        second = await resumed(config, sqlite_url, first.run_id, tmp_path)
        assert server.statistics().requests == rows  # each row's call made once
    assert second.status == "completed"
    assert second.outcomes == {"completed": rows}
    assert sorted(ids(tmp_path / "out.jsonl")) == list(range(rows))  # each row once
    assert read_jsonl(tmp_path / "errors.jsonl") == []


async def test_with_on_open_fail_max_failed_rows_stops_a_run_whose_endpoint_is_down(
    tmp_path: Path, sqlite_url: str
) -> None:
    rows, port = 60, free_port()
    config = pipeline(
        f"http://127.0.0.1:{port}/v1",
        tickets(rows),
        tmp_path,
        transforms=[llm_node(concurrency=1)],
        endpoint_options={
            "max_attempts": 1,
            "circuit_breaker": {"failure_threshold": 2, "reset_seconds": 60, "on_open": "fail"},
        },
        runtime={"max_failed_rows": 5, "max_buffer_size": 2},
    )
    async with MockLlmServer(MockSettings(faults={Fault.SERVER_ERROR: 1.0}), port=port) as server:
        first = await Pipeline.from_dict(config, landscape_url=sqlite_url).run()
        assert server.statistics().requests == 2  # then the breaker failed the rest fast
    assert first.status == "interrupted"
    assert first.stop_reason == "failed rows: 6 > max_failed_rows 5"
    errors = ids(tmp_path / "errors.jsonl")
    assert 6 <= len(errors) <= 10  # what was read when it stopped, not all 60
    assert first.row_errors == len(errors)
    assert await recorded_stop(sqlite_url, first.run_id) == ("interrupted", first.stop_reason)

    async with MockLlmServer(MockSettings(), port=port):
        second = await resumed(config, sqlite_url, first.run_id, tmp_path)
    assert second.status == "completed"
    assert sorted(ids(tmp_path / "out.jsonl") + errors) == list(range(rows))
    assert second.row_errors == len(errors)  # the rows that failed stay failed
