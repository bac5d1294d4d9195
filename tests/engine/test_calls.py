"""External calls reported by plugins: recorded per attempt, totalled, and budgeted."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import select

from engine import Pipeline
from landscape import Landscape
from landscape import _schema as t
from plugins import ExternalCall, Row, RowContext, Transform

from .conftest import linear_config


class PricedLookup(Transform):
    """Pretends to call a service: a failed attempt, then an answer costing 0.25."""

    async def process(self, row: Row, ctx: RowContext) -> Row:
        request = {"model": "m", "q": row["i"]}
        common = {"call_type": "llm", "provider": "test", "model": "m", "request": request}
        ctx.calls.record(
            ExternalCall(
                **common,
                attempt=1,
                status="error",
                response=None,
                latency_ms=3.0,
                http_status=503,
                error={"type": "HTTPStatusError", "message": "503"},
            )
        )
        ctx.calls.record(
            ExternalCall(
                **common,
                attempt=2,
                status="success",
                response={"answer": row["i"] * 2},
                latency_ms=5.0,
                http_status=200,
                prompt_tokens=10,
                completion_tokens=2,
                cost=0.25,
            )
        )
        return {**row, "answer": row["i"] * 2}


def lookup_config(rows: Any, out: Path, **extra: Any) -> dict[str, Any]:
    transform = {"name": "lookup", "plugin": PricedLookup, "input": "raw", "on_success": "out"}
    return linear_config(rows, out, source_to="raw", transforms=[transform], **extra)


async def test_every_attempt_is_a_call_row_with_its_payloads_and_the_run_totals_them(
    run_verified: Any, tmp_path: Path, sqlite_url: str
) -> None:
    result = await run_verified(lookup_config([{"i": i} for i in range(3)], tmp_path))
    assert result.calls.calls == 6
    assert result.calls.retries == 3
    assert result.calls.errors == 3
    assert result.calls.tokens == 36
    assert result.calls.cost == 0.75
    async with Landscape.connect(sqlite_url) as landscape, landscape.engine.connect() as conn:
        calls = (await conn.execute(select(t.calls))).mappings().all()
        states = {
            row.state_id: row.node_id for row in (await conn.execute(select(t.node_states))).all()
        }
        requests = {c["request_hash"] for c in calls}
        stored = (
            await conn.execute(select(t.payloads.c.hash).where(t.payloads.c.hash.in_(requests)))
        ).scalars()
    assert len(calls) == 6
    assert {states[c["state_id"]] for c in calls} == {"lookup"}
    assert set(stored) == requests
    failed = [c for c in calls if c["status"] == "error"]
    assert len(failed) == 3
    assert {c["attempt"] for c in failed} == {1}
    assert all(c["response_hash"] is None and c["http_status"] == 503 for c in failed)
    assert all(json.loads(c["error_json"])["message"] == "503" for c in failed)


async def test_crossing_the_budget_stops_the_run_gracefully(
    run_verified: Any, tmp_path: Path, sqlite_url: str
) -> None:
    async def endless() -> AsyncIterator[dict[str, int]]:
        i = 0
        while True:
            yield {"i": i}
            i += 1

    config = lookup_config(
        endless(), tmp_path, budget={"max_cost": 1.0}, runtime={"max_buffer_size": 2}
    )
    result = await Pipeline.from_dict(config, landscape_url=sqlite_url).run()
    assert result.status == "interrupted"
    assert result.stop_reason is not None
    assert result.stop_reason.startswith("budget: cost")
    # The row that crossed the budget and those already read (a few buffers' worth) finish.
    assert 5 <= result.rows_processed <= 5 + 4 * 2
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == result.rows_processed
    async with Landscape.connect(sqlite_url) as landscape:
        run = await landscape.get_run(result.run_id)
        report = await landscape.verify(result.run_id)
    assert run is not None
    assert run.status == "interrupted"
    assert report.ok, report.violations
