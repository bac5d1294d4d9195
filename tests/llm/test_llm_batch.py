"""The `llm_batch` aggregation against the mock server's batch API: jobs that complete,
fail in part, expire, and many at once, with the audit trail they leave."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import ConfigError, Pipeline
from landscape import Landscape
from landscape import _schema as t
from plugins.llm import MockLlmServer, MockSettings
from tests._read import read_jsonl, table_rows

from .conftest import CLASSIFY_SCHEMA, endpoint, llm_node, tickets

Run = Callable[..., Any]


def by_id(path: Path) -> dict[int, dict[str, Any]]:
    """The rows of a JSONL file by their ``id``."""
    return {row["id"]: row for row in read_jsonl(path)}


def batch_pipeline(
    base_url: str,
    rows: Any,
    out: Path,
    *,
    count: int = 10,
    output_mode: str = "passthrough",
    retries: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """Rows -> llm_batch (jobs of ``count`` rows) -> out / errors."""
    return {
        "endpoints": {
            "local": endpoint(
                base_url, prices={"mock-model": {"input_per_1k": 1.0, "output_per_1k": 2.0}}
            )
        },
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "aggregations": [
            {
                "name": "classify",
                "plugin": "llm_batch",
                "input": "raw",
                "on_success": "out",
                "on_error": "errors",
                "trigger": {"count": count},
                "output_mode": output_mode,
                "retries": retries,
                "options": {
                    "endpoint": "local",
                    "model": "mock-model",
                    "prompt": "Ticket {{ row.id }}: {{ row.text }}",
                    "response_format": "json_schema",
                    "json_schema": CLASSIFY_SCHEMA,
                    "poll_interval_seconds": 0.02,
                    "max_poll_interval_seconds": 0.1,
                    **options,
                },
            }
        ],
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": str(out / "out.jsonl")}},
            {"name": "errors", "plugin": "jsonl", "options": {"path": str(out / "errors.jsonl")}},
        ],
    }


def terminal(outcomes: dict[str, int]) -> dict[str, int]:
    """The terminal outcome counts (passthrough members are also counted ``buffered``)."""
    return {outcome: n for outcome, n in outcomes.items() if outcome != "buffered"}


async def table(url: str, table: Any, run_id: str) -> list[dict[str, Any]]:
    """The rows of Landscape ``table`` that belong to run ``run_id``."""
    return await table_rows(url, table, table.c.run_id == run_id)


async def test_a_job_answers_every_row_at_the_batch_price_with_the_job_on_record(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(seed=5, batch_delay_seconds=0.2)
    async with MockLlmServer(settings) as server:
        result = await run_verified(batch_pipeline(server.base_url, tickets(25), tmp_path))
        stats = server.statistics()
    out = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(row["id"] for row in out) == list(range(25))
    assert all(row["label"] in {"billing", "login", "other"} for row in out)
    assert stats.batches_created == 3  # 10 + 10 + 5 (end of source)
    assert stats.batch_requests_answered == 25
    batches = await table(sqlite_url, t.batches, result.run_id)
    assert len(batches) == 3
    assert all(b["status"] == "completed" and b["external_job_id"] for b in batches)
    assert {b["trigger_reason"] for b in batches} == {"count", "end_of_source"}
    states = await table(sqlite_url, t.node_states, result.run_id)
    flushes = [s for s in states if s["external_job_id"]]
    assert len(flushes) == 3
    assert all(s["status"] == "completed" for s in flushes)
    calls = await table(sqlite_url, t.calls, result.run_id)
    answers = [c for c in calls if c["call_type"] == "llm_batch"]
    assert len(answers) == 25
    assert all(c["status"] == "success" and c["prompt_tokens"] for c in answers)
    for call in answers:  # half the online price of its tokens
        online_cost = (call["prompt_tokens"] * 1.0 + call["completion_tokens"] * 2.0) / 1000
        assert call["cost"] == pytest.approx(online_cost / 2)
    control = {c["call_type"] for c in calls} - {"llm_batch"}
    assert {"batch_upload", "batch_create", "batch_poll", "batch_download"} <= control
    assert result.calls.cost == pytest.approx(sum(c["cost"] or 0 for c in calls))
    # explain: the row's batch with its job, and its own call with prompt and answer.
    async with Landscape.connect(sqlite_url) as landscape:
        lineage = await landscape.explain(result.run_id, row_index=12)
    (token,) = list(lineage.walk())
    (membership,) = token.batches
    assert membership.external_job_id in {b["external_job_id"] for b in batches}
    (state,) = [s for s in token.states if s.node_id == "classify"]
    (call,) = state.calls
    assert call.call_type == "llm_batch"
    assert "Ticket 12" in call.request["messages"][-1]["content"]
    assert call.response["choices"][0]["message"]["content"]


async def test_batch_answers_equal_online_answers(run_verified: Run, tmp_path: Path) -> None:
    outputs = []
    for name in ("batched", "online"):
        out = tmp_path / name
        out.mkdir()
        async with MockLlmServer(MockSettings(seed=9)) as server:
            config = batch_pipeline(server.base_url, tickets(12), out, count=5)
            if name == "online":
                config["aggregations"] = []
                config["transforms"] = [llm_node()]
            await run_verified(config)
        outputs.append({row["id"]: row for row in read_jsonl(out / "out.jsonl")})
    assert outputs[0] == outputs[1]


async def test_rows_whose_requests_fail_in_the_job_take_the_error_route(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(seed=3, batch_failure_rate=0.3)
    async with MockLlmServer(settings) as server:
        result = await run_verified(batch_pipeline(server.base_url, tickets(40), tmp_path))
        answered = server.statistics().batch_requests_answered
    out = read_jsonl(tmp_path / "out.jsonl")
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert 0 < len(errors) < 40
    assert len(out) == answered
    assert sorted(row["id"] for row in out + errors) == list(range(40))
    assert all("HTTP 500" in row["_error"] for row in errors)
    assert terminal(result.outcomes) == {"completed": 40 - len(errors), "quarantined": len(errors)}
    calls = await table(sqlite_url, t.calls, result.run_id)
    failed = [c for c in calls if c["call_type"] == "llm_batch" and c["status"] == "error"]
    assert len(failed) == len(errors)
    assert all(c["http_status"] == 500 for c in failed)
    batches = await table(sqlite_url, t.batches, result.run_id)
    assert [b["status"] for b in batches] == ["completed"] * 4


async def test_an_expired_job_fails_its_batch_and_the_retry_is_a_new_job(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(seed=1, batch_expire_jobs=1)
    async with MockLlmServer(settings) as server:
        config = batch_pipeline(server.base_url, tickets(6), tmp_path, count=6, retries=1)
        result = await run_verified(config)
        stats = server.statistics()
    assert stats.batches_created == 2
    assert sorted(row["id"] for row in read_jsonl(tmp_path / "out.jsonl")) == list(range(6))
    batches = sorted(await table(sqlite_url, t.batches, result.run_id), key=lambda b: b["attempt"])
    assert [(b["attempt"], b["status"]) for b in batches] == [(1, "failed"), (2, "completed")]
    assert batches[0]["external_job_id"] != batches[1]["external_job_id"]
    states = {s["state_id"]: s for s in await table(sqlite_url, t.node_states, result.run_id)}
    failed = states[batches[0]["aggregation_state_id"]]
    assert failed["status"] == "failed"
    assert "expired" in failed["error_json"]


async def test_an_expired_job_without_retries_routes_every_member_by_on_error(
    run_verified: Run, tmp_path: Path
) -> None:
    async with MockLlmServer(MockSettings(batch_expire_jobs=1)) as server:
        result = await run_verified(batch_pipeline(server.base_url, tickets(4), tmp_path, count=4))
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert sorted(row["id"] for row in errors) == [0, 1, 2, 3]
    assert all("expired" in row["_error"] for row in errors)
    assert terminal(result.outcomes) == {"quarantined": 4}


async def test_many_jobs_are_pending_at_once_without_blocking_the_node(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(seed=2, batch_delay_seconds=0.5)
    async with MockLlmServer(settings) as server:
        config = batch_pipeline(server.base_url, tickets(80), tmp_path, count=5)
        result = await run_verified(config)
        stats = server.statistics()
    assert stats.batches_created == 16
    assert sorted(row["id"] for row in read_jsonl(tmp_path / "out.jsonl")) == list(range(80))
    batches = await table(sqlite_url, t.batches, result.run_id)
    # Each job waited at least its delay; run one after another they would take 8 s,
    # so at least half of them must have been pending together.
    spans = sorted((b["created_at"], b["completed_at"]) for b in batches)
    overlapping = max(
        sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans
    )
    assert overlapping >= 8


async def test_transform_mode_consumes_the_members_into_one_output_each(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    async with MockLlmServer(MockSettings(seed=4)) as server:
        config = batch_pipeline(
            server.base_url, tickets(6), tmp_path, count=3, output_mode="transform"
        )
        result = await run_verified(config)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(row["id"] for row in out) == list(range(6))
    assert all(row["label"] in {"billing", "login", "other"} for row in out)
    assert all(0 <= row["score"] <= 1 for row in out)
    assert result.outcomes == {"consumed_in_batch": 6, "completed": 6}


def test_single_output_mode_is_refused_at_its_key_path(tmp_path: Path) -> None:
    config = batch_pipeline("http://127.0.0.1:9/v1", tickets(1), tmp_path, output_mode="single")
    with pytest.raises(ConfigError) as caught:
        Pipeline.from_dict(config, base_dir=tmp_path)
    assert "aggregations[0].output_mode" in str(caught.value)


async def test_the_batch_api_calls_are_in_the_flush_states_ledger(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    async with MockLlmServer(MockSettings(seed=6, batch_delay_seconds=0.1)) as server:
        result = await run_verified(batch_pipeline(server.base_url, tickets(3), tmp_path, count=3))
    calls = await table(sqlite_url, t.calls, result.run_id)
    states = {s["state_id"]: s for s in await table(sqlite_url, t.node_states, result.run_id)}
    control = [c for c in calls if c["call_type"].startswith("batch_")]
    assert {states[c["state_id"]]["external_job_id"] for c in control} != {None}
    assert len({c["state_id"] for c in control}) == 1
    polls = [c for c in control if c["call_type"] == "batch_poll"]
    assert len(polls) >= 2  # still running at first, then done


async def test_jobs_and_their_replay_on_each_landscape(
    run_verified: Run, tmp_path: Path, landscape_url: str
) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    first.mkdir()
    again.mkdir()
    # Failures are drawn per request line, whose custom_id (a token id) differs per run.
    settings = MockSettings(seed=8, batch_delay_seconds=0.1, batch_failure_rate=0.5)
    async with MockLlmServer(settings) as server:
        recorded = await run_verified(
            batch_pipeline(server.base_url, tickets(20), first, count=7), url=landscape_url
        )
        created = server.statistics().batches_created
        pipeline = Pipeline.from_dict(
            batch_pipeline(server.base_url, tickets(20), again, count=7),
            base_dir=tmp_path,
            landscape_url=landscape_url,
        )
        replayed = await pipeline.run(replay=recorded.run_id)
        assert server.statistics().batches_created == created == 3
    async with Landscape.connect(landscape_url) as landscape:
        report = await landscape.verify(replayed.run_id)
    assert report.ok, [str(v) for v in report.violations]
    # Jobs end in any order: rows of different batches leave in any order.
    assert by_id(first / "out.jsonl")
    assert by_id(again / "out.jsonl") == by_id(first / "out.jsonl")
    # Rows whose requests failed in the job have no answer on record: replay misses.
    failed = sorted(row["id"] for row in read_jsonl(first / "errors.jsonl"))
    assert 0 < len(failed) < 20
    missed = read_jsonl(again / "errors.jsonl")
    assert sorted(row["id"] for row in missed) == failed
    assert all("replay_miss" in row["_error"] for row in missed)
    batches = await table(landscape_url, t.batches, recorded.run_id)
    assert {b["status"] for b in batches} == {"completed"}


async def test_a_job_past_max_wait_is_cancelled_and_fails_its_batch(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    async with MockLlmServer(MockSettings(batch_delay_seconds=600)) as server:
        config = batch_pipeline(
            server.base_url, tickets(3), tmp_path, count=3, max_wait_seconds=0.3
        )
        result = await run_verified(config)
        stats = server.statistics()
    assert dict(stats.batch_jobs) == {"cancelled": 1}
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert sorted(row["id"] for row in errors) == [0, 1, 2]
    assert all("timed out" in row["_error"] for row in errors)
    (batch,) = await table(sqlite_url, t.batches, result.run_id)
    assert batch["status"] == "failed"
    calls = await table(sqlite_url, t.calls, result.run_id)
    assert [c["call_type"] for c in calls if c["call_type"] == "batch_cancel"] == ["batch_cancel"]
