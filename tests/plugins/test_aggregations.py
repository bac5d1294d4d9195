"""The built-in aggregations ``batch_stats`` and ``collect``, flushed directly, plus their
options and one run through the engine."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from engine import ConfigError, Pipeline
from landscape import Landscape
from landscape import _schema as t
from plugins import resolve_plugin
from plugins._aggregations import (
    BatchStatsAggregation,
    BatchStatsError,
    CollectAggregation,
)
from plugins.protocols import Aggregation, BatchContext, PluginSetup, Row

SETUP = PluginSetup(node_name="agg", base_dir=Path("."))


def batch_stats(**options: Any) -> BatchStatsAggregation:
    return BatchStatsAggregation.from_options(options, SETUP)


def collect(**options: Any) -> CollectAggregation:
    return CollectAggregation.from_options(options, SETUP)


def context(*, group_key: Any = None, output_mode: str = "transform") -> BatchContext:
    """A flush context; a ``group_key`` other than ``None`` makes the batch grouped."""
    return BatchContext(
        run_id="run",
        node_name="agg",
        batch_id="b1",
        attempt=1,
        group_key=group_key,
        trigger="count",
        output_mode=output_mode,
        state_id="s1",
        grouped=group_key is not None,
    )


async def flush(plugin: Aggregation, rows: list[Row], ctx: BatchContext | None = None) -> list[Row]:
    """Flush ``rows`` inside the plugin's lifecycle, checking the rows are not mutated."""
    before = copy.deepcopy(rows)
    async with plugin:
        result = await plugin.flush(rows, ctx or context())
    assert rows == before, "flush mutated its input rows"
    return result


# -- batch_stats ----------------------------------------------------------------------------


async def test_batch_stats_summarises_each_field() -> None:
    rows = [{"a": 1, "b": 2.5}, {"a": 4, "b": 0.5}, {"a": -2, "b": 1.0}]
    (summary,) = await flush(batch_stats(fields=["a", "b"]), rows)
    assert summary == {
        "count": 3,
        "a_sum": 3,
        "a_mean": 1.0,
        "a_min": -2,
        "a_max": 4,
        "b_sum": 4.0,
        "b_mean": 4.0 / 3,
        "b_min": 0.5,
        "b_max": 2.5,
    }
    assert isinstance(summary["a_sum"], int)


async def test_batch_stats_sums_floats_exactly() -> None:
    (summary,) = await flush(batch_stats(fields=["x"]), [{"x": 0.1}] * 10)
    assert summary["x_sum"] == 1.0
    assert summary["x_mean"] == 0.1


async def test_batch_stats_sums_ints_and_floats_together() -> None:
    (summary,) = await flush(batch_stats(fields=["x"]), [{"x": 1}, {"x": 0.5}, {"x": 2}])
    assert (summary["x_sum"], summary["x_min"], summary["x_max"]) == (3.5, 0.5, 2)


async def test_batch_stats_skips_missing_and_null_values_but_counts_every_row() -> None:
    rows: list[Row] = [{"x": 2}, {"x": None}, {"y": 1}, {"x": 6}]
    (summary,) = await flush(batch_stats(fields=["x"]), rows)
    assert summary == {"count": 4, "x_sum": 8, "x_mean": 4.0, "x_min": 2, "x_max": 6}


async def test_batch_stats_gives_null_statistics_to_a_field_without_values() -> None:
    (summary,) = await flush(batch_stats(fields=["x"]), [{"x": None}, {"y": 1}])
    assert summary == {"count": 2, "x_sum": None, "x_mean": None, "x_min": None, "x_max": None}


@pytest.mark.parametrize("value", ["12", True, [1], {"v": 1}])
async def test_batch_stats_refuses_a_value_that_is_not_a_number_naming_the_field(
    value: Any,
) -> None:
    rows = [{"amount": 1, "price": 2}, {"amount": 3, "price": value}]
    with pytest.raises(BatchStatsError, match="'price'") as info:
        await flush(batch_stats(fields=["amount", "price"]), rows)
    assert repr(value) in str(info.value)


async def test_batch_stats_names_the_group_only_when_the_batch_is_grouped() -> None:
    rows = [{"x": 1}, {"x": 2}]
    (ungrouped,) = await flush(batch_stats(fields=["x"]), rows)
    (grouped,) = await flush(batch_stats(fields=["x"]), rows, context(group_key="north"))
    (renamed,) = await flush(
        batch_stats(fields=["x"], group_field="region"), rows, context(group_key="north")
    )
    assert "group" not in ungrouped
    assert grouped["group"] == "north"
    assert renamed["region"] == "north"
    assert "group" not in renamed
    assert {k: v for k, v in grouped.items() if k != "group"} == ungrouped


async def test_batch_stats_keeps_a_structured_group_key() -> None:
    (summary,) = await flush(batch_stats(fields=["x"]), [{"x": 1}], context(group_key=["eu", 2024]))
    assert summary["group"] == ["eu", 2024]


async def test_batch_stats_in_passthrough_mode_adds_the_stats_to_every_row() -> None:
    rows = [{"id": 1, "x": 10}, {"id": 2, "x": 30}]
    result = await flush(
        batch_stats(fields=["x"]), rows, context(group_key="g", output_mode="passthrough")
    )
    stats = {"count": 2, "x_sum": 40, "x_mean": 20.0, "x_min": 10, "x_max": 30}
    assert result == [{"id": 1, "x": 10, **stats}, {"id": 2, "x": 30, **stats}]
    assert all(out is not row for out, row in zip(result, rows, strict=True))


async def test_batch_stats_gives_one_row_in_single_mode() -> None:
    result = await flush(batch_stats(fields=["x"]), [{"x": 1}] * 3, context(output_mode="single"))
    assert result == [{"count": 3, "x_sum": 3, "x_mean": 1.0, "x_min": 1, "x_max": 1}]


@pytest.mark.parametrize(
    ("options", "location"),
    [
        ({}, ("fields",)),
        ({"fields": []}, ("fields",)),
        ({"fields": "x"}, ("fields",)),
        ({"fields": ["x"], "feilds": ["y"]}, ("feilds",)),
        ({"fields": ["x"], "group_field": 3}, ("group_field",)),
    ],
)
def test_batch_stats_options_are_validated(options: dict[str, Any], location: tuple[str]) -> None:
    with pytest.raises(ValidationError) as info:
        batch_stats(**options)
    assert [error["loc"] for error in info.value.errors()] == [location]


# -- collect --------------------------------------------------------------------------------


async def test_collect_puts_the_batch_in_a_list_with_its_count() -> None:
    rows = [{"id": 1, "tags": ["a"]}, {"id": 2, "tags": []}]
    (summary,) = await flush(collect(), rows)
    assert summary == {"count": 2, "rows": rows}
    assert all(kept is not row for kept, row in zip(summary["rows"], rows, strict=True))


async def test_collect_uses_the_configured_field_and_group_field() -> None:
    rows = [{"id": 1}]
    (summary,) = await flush(collect(field="items", group_field="key"), rows, context(group_key=7))
    assert summary == {"key": 7, "count": 1, "items": [{"id": 1}]}


async def test_collect_in_passthrough_mode_gives_every_row_the_whole_batch() -> None:
    rows = [{"id": 1}, {"id": 2}]
    result = await flush(collect(), rows, context(group_key="g", output_mode="passthrough"))
    assert result == [{"id": i, "count": 2, "rows": rows} for i in (1, 2)]


def test_collect_refuses_unknown_options() -> None:
    with pytest.raises(ValidationError):
        collect(fields=["x"])


def test_both_are_registered_aggregations() -> None:
    assert resolve_plugin("aggregation", "batch_stats") is BatchStatsAggregation
    assert resolve_plugin("aggregation", "collect") is CollectAggregation


# -- through the engine ---------------------------------------------------------------------


def pipeline_config(tmp_path: Path, **aggregation: Any) -> dict[str, Any]:
    rows = [{"region": r, "amount": a} for r, a in [("n", 1), ("s", 2), ("n", 3), ("s", None)]]
    return {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "aggregations": [
            {"name": "stats", "input": "raw", "on_success": "out", "plugin": "batch_stats"}
            | aggregation
        ],
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": str(tmp_path / "out.jsonl")}}
        ],
    }


def test_batch_stats_without_fields_is_a_config_error_at_its_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(pipeline_config(tmp_path), base_dir=tmp_path)
    assert [issue.path for issue in info.value.issues] == ["aggregations[0].options.fields"]


async def test_batch_stats_per_group_through_a_pipeline(landscape_url: str, tmp_path: Path) -> None:
    config = pipeline_config(
        tmp_path, group_by="region", output_mode="single", options={"fields": ["amount"]}
    )
    pipeline = Pipeline.from_dict(config, base_dir=tmp_path, landscape_url=landscape_url)
    result = await pipeline.run()

    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    summaries = sorted((json.loads(line) for line in lines), key=lambda r: r["group"])
    assert summaries == [
        {"group": "n", "count": 2, "amount_sum": 4, "amount_mean": 2.0, "amount_min": 1,
         "amount_max": 3},
        {"group": "s", "count": 2, "amount_sum": 2, "amount_mean": 2.0, "amount_min": 2,
         "amount_max": 2},
    ]  # fmt: skip
    assert result.outcomes == {"consumed_in_batch": 4, "completed": 2}
    async with Landscape.connect(landscape_url) as landscape:
        report = await landscape.verify(result.run_id)
        async with landscape.engine.connect() as conn:
            batches = (
                await conn.execute(
                    select(t.batches.c.group_key, t.batches.c.status, t.batches.c.trigger_reason)
                    .where(t.batches.c.run_id == result.run_id)
                    .order_by(t.batches.c.group_key)
                )
            ).all()
    assert report.ok, [str(v) for v in report.violations]
    assert [tuple(b) for b in batches] == [
        ('"n"', "completed", "end_of_source"),
        ('"s"', "completed", "end_of_source"),
    ]
