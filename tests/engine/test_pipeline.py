"""Whole pipelines through the Python API, each run's audit trail verified."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select

from engine import Pipeline, PipelineStateError, RunFailed
from landscape import Landscape
from landscape import _schema as t
from tests._read import read_jsonl

from .conftest import linear_config
from .sample_plugins import CollectingSink, SlowTag

Run = Callable[..., Any]


async def count(url: str, table: Any, *where: Any) -> int:
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(table).where(*where))).scalar_one()
        )


async def test_linear_pipeline_writes_every_row_and_records_every_step(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows = [{"id": i, "amount": float(i * 10), "name": f"n{i}"} for i in range(50)]
    config = linear_config(
        rows,
        tmp_path,
        source_to="raw",
        transforms=[
            {
                "name": "shape",
                "plugin": "field_map",
                "input": "raw",
                "on_success": "shaped",
                "options": {"rename": {"name": "label"}, "constants": {"v": 1}},
            },
            {
                "name": "calc",
                "plugin": "compute",
                "input": "shaped",
                "on_success": "scored",
                "options": {"fields": {"double": "row['amount'] * 2"}},
            },
        ],
        gates=[
            {
                "name": "size",
                "input": "scored",
                "condition": "row['amount'] >= 250",
                "routes": {"true": "big", "false": "out"},
            }
        ],
    )
    config["sinks"].append(
        {"name": "big", "plugin": "jsonl", "options": {"path": str(tmp_path / "big.jsonl")}}
    )
    result = await run_verified(config)
    assert result.status == "completed"
    assert result.rows_processed == 50
    assert result.outcomes == {"routed": 50}
    small, big = read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "big.jsonl")
    assert [r["id"] for r in small] == list(range(25))
    assert [r["id"] for r in big] == list(range(25, 50))
    assert big[0] == {"id": 25, "amount": 250.0, "label": "n25", "v": 1, "double": 500.0}
    # source + 2 transforms + gate + sink per row
    assert await count(sqlite_url, t.node_states, t.node_states.c.run_id == result.run_id) == 250
    assert (
        await count(sqlite_url, t.routing_events, t.routing_events.c.run_id == result.run_id) == 50
    )


async def test_a_failing_row_goes_to_its_error_sink_and_the_run_goes_on(
    run_verified: Run, tmp_path: Path
) -> None:
    rows = [{"a": 10, "b": b} for b in (1, 0, 2, 0, 5)]
    config = linear_config(
        rows,
        tmp_path,
        source_to="raw",
        transforms=[
            {
                "name": "div",
                "plugin": "tests.engine.sample_plugins:Divide",
                "input": "raw",
                "on_success": "out",
                "on_error": "errors",
            }
        ],
    )
    config["sinks"].append(
        {"name": "errors", "plugin": "jsonl", "options": {"path": str(tmp_path / "errors.jsonl")}}
    )
    result = await run_verified(config)
    assert result.outcomes == {"completed": 3, "quarantined": 2}
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert [e["b"] for e in errors] == [0, 0]
    assert all(e["_error_node"] == "div" and "division" in e["_error"] for e in errors)
    assert [r["ratio"] for r in read_jsonl(tmp_path / "out.jsonl")] == [10.0, 5.0, 2.0]


async def test_without_an_error_route_failing_rows_end_failed(
    run_verified: Run, tmp_path: Path
) -> None:
    config = linear_config(
        [{"a": 1, "b": 0}, {"a": 1, "b": 1}],
        tmp_path,
        source_to="raw",
        transforms=[
            {
                "name": "div",
                "plugin": "tests.engine.sample_plugins:Divide",
                "input": "raw",
                "on_success": "out",
            }
        ],
    )
    result = await run_verified(config)
    assert result.outcomes == {"failed": 1, "completed": 1}


async def test_filter_and_discard_route_end_rows_discarded_with_a_reason(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    config = linear_config(
        [{"x": i} for i in range(10)],
        tmp_path,
        source_to="raw",
        transforms=[
            {
                "name": "keep_even",
                "plugin": "filter",
                "input": "raw",
                "on_success": "kept",
                "options": {"keep": "row['x'] % 2 == 0"},
            }
        ],
        gates=[
            {
                "name": "small",
                "input": "kept",
                "condition": "row['x'] < 6",
                "routes": {"true": "out", "false": "discard"},
            }
        ],
    )
    result = await run_verified(config)
    assert result.outcomes == {"discarded": 7, "routed": 3}
    async with Landscape.connect(sqlite_url) as landscape, landscape.engine.connect() as conn:
        contexts = (
            (
                await conn.execute(
                    select(t.token_outcomes.c.context_json).where(
                        t.token_outcomes.c.outcome == "discarded"
                    )
                )
            )
            .scalars()
            .all()
        )
    assert sum("row['x'] % 2 == 0" in c for c in contexts) == 5


async def test_a_condition_that_fails_for_a_row_is_that_rows_error(
    run_verified: Run, tmp_path: Path
) -> None:
    config = linear_config(
        [{"score": 1}, {"other": 2}, {"score": 0}],
        tmp_path,
        source_to="raw",
        gates=[
            {
                "name": "g",
                "input": "raw",
                "condition": "row['score'] > 0",
                "routes": {"true": "out", "false": "out"},
            }
        ],
    )
    result = await run_verified(config)
    assert result.outcomes == {"routed": 2, "failed": 1}


async def test_fork_sends_a_child_down_every_branch(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    config = linear_config(
        [{"id": i} for i in range(4)],
        tmp_path,
        source_to="raw",
        gates=[{"name": "split", "input": "raw", "fork_to": {"left": "out", "right": "right"}}],
    )
    config["sinks"].append(
        {"name": "right", "plugin": "jsonl", "options": {"path": str(tmp_path / "r.jsonl")}}
    )
    result = await run_verified(config)
    assert result.outcomes == {"forked": 4, "routed": 8}
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 4
    assert await count(sqlite_url, t.token_parents, t.token_parents.c.run_id == result.run_id) == 8


@pytest.mark.parametrize("ordered", [True, False])
async def test_concurrent_transform_keeps_order_and_loses_nothing(
    run_verified: Run, tmp_path: Path, ordered: bool
) -> None:
    rows = [{"id": i, "fail": i % 7 == 3} for i in range(60)]
    config = linear_config(
        rows,
        tmp_path,
        source_to="raw",
        transforms=[
            {
                "name": "slow",
                "plugin": "tests.engine.sample_plugins:SlowTag",
                "input": "raw",
                "on_success": "out",
                "concurrency": 8,
                "max_pending": 12,
                "ordered": ordered,
                "options": {"max_delay": 0.01},
            }
        ],
    )
    result = await run_verified(config)
    written = [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")]
    expected = [r["id"] for r in rows if not r["fail"]]
    assert (written if ordered else sorted(written)) == expected
    assert result.outcomes == {"completed": len(expected), "failed": len(rows) - len(expected)}


async def test_memory_source_takes_an_async_iterable_and_plugin_instances(
    run_verified: Run, tmp_path: Path
) -> None:
    async def produce() -> AsyncIterator[dict[str, Any]]:
        for i in range(5):
            await anyio.lowlevel.checkpoint()
            yield {"i": i}

    from plugins import PluginSetup

    sink = CollectingSink({}, PluginSetup(node_name="mem"))
    config = {
        "source": {"plugin": "memory", "options": {"rows": produce()}, "on_success": "tagged_in"},
        "transforms": [
            {
                "name": "tag",
                "plugin": SlowTag,
                "input": "tagged_in",
                "on_success": "mem",
                "options": {"max_delay": 0},
            }
        ],
        "sinks": [{"name": "mem", "plugin": sink}],
    }
    result = await run_verified(config)
    assert result.outcomes == {"completed": 5}
    assert [item.row["i"] for item in sink.items] == list(range(5))


async def test_malformed_source_records_are_quarantined_and_the_run_goes_on(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    data = tmp_path / "in.csv"
    data.write_bytes(b"id,amount\n1,2.5\n2,abc\n3\n4,\xff\xfe\n5,7\n")
    config = {
        "source": {
            "plugin": "csv",
            "options": {"path": str(data)},
            "on_success": "out",
            "schema": {"mode": "strict", "fields": {"id": "int", "amount": "float"}},
            "on_validation_failure": "quarantine",
        },
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": str(tmp_path / "out.jsonl")}},
            {
                "name": "quarantine",
                "plugin": "jsonl",
                "options": {"path": str(tmp_path / "q.jsonl")},
            },
        ],
    }
    result = await run_verified(config)
    assert result.outcomes == {"completed": 2, "quarantined": 3}
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": 1, "amount": 2.5},
        {"id": 5, "amount": 7.0},
    ]
    quarantined = read_jsonl(tmp_path / "q.jsonl")
    assert [q["_row_index"] for q in quarantined] == [1, 2, 3]
    assert (
        await count(sqlite_url, t.validation_errors, t.validation_errors.c.run_id == result.run_id)
        == 3
    )


async def test_stop_interrupts_the_run_at_a_row_boundary(tmp_path: Path, sqlite_url: str) -> None:
    enough = anyio.Event()

    async def endless() -> AsyncIterator[dict[str, Any]]:
        i = 0
        while True:
            if i == 200:
                enough.set()
            yield {"i": i}
            i += 1

    pipeline = Pipeline.from_dict(linear_config(endless(), tmp_path), landscape_url=sqlite_url)
    with pytest.raises(PipelineStateError):
        pipeline.stop()
    results = []

    async def run() -> None:
        results.append(await pipeline.run())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await enough.wait()
        pipeline.stop()
    (result,) = results
    assert result.status == "interrupted"
    assert result.rows_processed >= 200
    assert len(read_jsonl(tmp_path / "out.jsonl")) == result.rows_processed
    async with Landscape.connect(sqlite_url) as landscape:
        run_summary = await landscape.get_run(result.run_id)
        report = await landscape.verify(result.run_id)
    assert run_summary is not None
    assert run_summary.status == "interrupted"
    assert report.ok, report.violations


async def test_a_sink_that_cannot_write_fails_the_run_loudly(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = linear_config([{"i": 1}], tmp_path)
    config["sinks"][0]["plugin"] = "tests.engine.sample_plugins:BrokenSink"
    pipeline = Pipeline.from_dict(config, landscape_url=sqlite_url)
    with pytest.raises(RunFailed, match="disk unplugged") as info:
        await pipeline.run()
    async with Landscape.connect(sqlite_url) as landscape:
        run = await landscape.get_run(info.value.run_id)
    assert run is not None
    assert run.status == "failed"


async def test_secrets_in_options_never_reach_the_landscape(
    tmp_path: Path, sqlite_url: str
) -> None:
    target = f"sqlite+aiosqlite:///{tmp_path / 'target.db'}"
    config = linear_config([{"i": 1}], tmp_path, source_to="raw")
    config["sinks"][0] = {
        "name": "out",
        "plugin": "database",
        "options": {"url": target, "table": "rows"},
    }
    config["transforms"] = [
        {
            "name": "c",
            "plugin": "field_map",
            "input": "raw",
            "on_success": "out",
            "options": {"constants": {"api_key": "sk-SECRET-123"}},
        }
    ]
    result = await Pipeline.from_dict(config, landscape_url=sqlite_url).run()
    assert result.status == "completed"
    async with Landscape.connect(sqlite_url) as landscape, landscape.engine.connect() as conn:
        settings = (await conn.execute(select(t.runs.c.settings_json))).scalar_one()
        node_config = (
            await conn.execute(select(t.nodes.c.config_json).where(t.nodes.c.node_id == "c"))
        ).scalar_one()
    assert "sk-SECRET-123" not in settings
    assert "sk-SECRET-123" not in node_config
    assert "***" in node_config


async def test_the_same_pipeline_runs_twice_but_not_concurrently(
    tmp_path: Path, sqlite_url: str
) -> None:
    pipeline = Pipeline.from_dict(linear_config([{"i": 1}], tmp_path), landscape_url=sqlite_url)
    first = await pipeline.run()
    assert first.status == "completed"
    blocker = anyio.Event()

    async def rows() -> AsyncIterator[dict[str, Any]]:
        await blocker.wait()
        yield {"i": 2}

    pipeline2 = Pipeline.from_dict(linear_config(rows(), tmp_path), landscape_url=sqlite_url)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pipeline2.run)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(PipelineStateError, match="already running"):
            await pipeline2.run()
        blocker.set()


async def test_an_audit_anomaly_fails_the_run_loudly(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine import AuditError
    from engine._run_context import RunContext

    record = RunContext.record_outcome

    def twice(self: RunContext, *args: Any, **kwargs: Any) -> None:
        record(self, *args, **kwargs)
        record(self, *args, **kwargs)  # a second terminal outcome for the same token

    monkeypatch.setattr(RunContext, "record_outcome", twice)
    pipeline = Pipeline.from_dict(linear_config([{"i": 1}], tmp_path), landscape_url=sqlite_url)
    with pytest.raises(AuditError, match="refused by the database"):
        await pipeline.run()


async def test_cancelling_the_caller_marks_the_run_interrupted(
    tmp_path: Path, sqlite_url: str
) -> None:
    started = anyio.Event()

    async def rows() -> AsyncIterator[dict[str, Any]]:
        yield {"i": 0}
        started.set()
        await anyio.sleep_forever()
        yield {"i": 1}

    pipeline = Pipeline.from_dict(linear_config(rows(), tmp_path), landscape_url=sqlite_url)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pipeline.run)
        await started.wait()
        tg.cancel_scope.cancel()
    async with Landscape.connect(sqlite_url) as landscape:
        (run,) = await landscape.list_runs()
    assert run.status == "interrupted"


async def test_a_record_with_no_json_form_is_quarantined_with_its_repr(
    run_verified: Run, tmp_path: Path
) -> None:
    config = linear_config([{"x": 1.5}, {"x": float("nan")}], tmp_path)
    config["source"]["on_validation_failure"] = "quarantine"
    config["sinks"].append(
        {"name": "quarantine", "plugin": "jsonl", "options": {"path": str(tmp_path / "q.jsonl")}}
    )
    result = await run_verified(config)
    assert result.outcomes == {"completed": 1, "quarantined": 1}
    (quarantined,) = read_jsonl(tmp_path / "q.jsonl")
    assert quarantined["_raw"] == "{'x': nan}"
    assert "no JSON form" in quarantined["_error"]


async def test_progress_callback_sees_the_final_counts(tmp_path: Path, sqlite_url: str) -> None:
    seen: list[Any] = []
    pipeline = Pipeline.from_dict(
        linear_config([{"i": i} for i in range(30)], tmp_path), landscape_url=sqlite_url
    )
    result = await pipeline.run(on_progress=seen.append, progress_interval=0.01)
    final = seen[-1]
    assert final.run_id == result.run_id
    assert final.rows_read == 30
    assert final.outcomes == {"completed": 30}
    assert {node.node_id for node in final.nodes} == {"source", "out"}
    assert pipeline.statistics() is None  # not running any more
