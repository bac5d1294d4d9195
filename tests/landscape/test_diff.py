"""diff_runs(): two real runs of the same source compared row by row."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import Pipeline
from landscape import Landscape, RunDiff, diff_runs
from landscape._lineage import RunNotFound
from plugins.llm import MockLlmServer, MockSettings
from tests._read import read_jsonl
from tests.llm.conftest import llm_node, pipeline, tickets

Run = Callable[..., Any]
Config = dict[str, Any]

SCORES = [i / 20 for i in range(20)]


def jsonl_sink(name: str, out: Path) -> Config:
    return {"name": name, "plugin": "jsonl", "options": {"path": str(out / f"{name}.jsonl")}}


def gate_config(
    out: Path, threshold: float, *, factor: int = 2, rows: list[dict[str, Any]] | None = None
) -> Config:
    """source -> compute ``double`` -> gate ``score > threshold`` -> sinks high / low."""
    source_rows = (
        rows if rows is not None else [{"id": i, "score": s} for i, s in enumerate(SCORES)]
    )
    return {
        "source": {"plugin": "memory", "options": {"rows": source_rows}, "on_success": "raw"},
        "transforms": [
            {
                "name": "calc",
                "plugin": "compute",
                "input": "raw",
                "on_success": "scored",
                "options": {"fields": {"double": f"row['id'] * {factor}"}},
            }
        ],
        "gates": [
            {
                "name": "threshold",
                "input": "scored",
                "condition": f"row['score'] > {threshold}",
                "routes": {"true": "high", "false": "low"},
            }
        ],
        "sinks": [jsonl_sink("high", out), jsonl_sink("low", out)],
    }


def fork_config(out: Path, cutoff: int) -> Config:
    """source -> fork into ``left`` (compute ``l``, which depends on ``cutoff``) and
    ``right`` (compute ``r``) -> coalesce ``join`` (union) -> sink ``out``."""
    rows = [{"id": i} for i in range(10)]
    fields = {"left": {"l": f"'big' if row['id'] > {cutoff} else 'small'"}, "right": {"r": "1"}}
    return {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "gates": [{"name": "split", "input": "raw", "fork_to": {b: f"{b}_in" for b in fields}}],
        "transforms": [
            {
                "name": f"calc_{b}",
                "plugin": "compute",
                "input": f"{b}_in",
                "on_success": f"{b}_out",
                "options": {"fields": f},
            }
            for b, f in fields.items()
        ],
        "coalesce": [
            {
                "name": "join",
                "branches": {b: f"{b}_out" for b in fields},
                "merge": "union",
                "on_success": "out",
            }
        ],
        "sinks": [jsonl_sink("out", out)],
    }


async def run_twice(
    run_verified: Run, tmp_path: Path, url: str, make: Callable[[Path], Config], *args: Any
) -> tuple[str, str]:
    """Run ``make(out_dir)`` as run A and ``make(out_dir, *args)`` as run B; their ids."""
    ids = []
    for name, extra in (("a", ()), ("b", args)):
        out = tmp_path / name
        out.mkdir()
        ids.append((await run_verified(make(out, *extra), url=url)).run_id)
    return ids[0], ids[1]


async def diff(url: str, run_a: str, run_b: str, **options: Any) -> RunDiff:
    async with Landscape.connect(url) as landscape:
        return await diff_runs(landscape, run_a, run_b, **options)


async def test_a_changed_threshold_reroutes_exactly_the_rows_between_the_thresholds(
    run_verified: Run, tmp_path: Path, landscape_url: str
) -> None:
    run_a, run_b = await run_twice(
        run_verified,
        tmp_path,
        landscape_url,
        lambda out, threshold=0.5: gate_config(out, threshold),
        0.3,
    )
    result = await diff(landscape_url, run_a, run_b)

    moved = [i for i, s in enumerate(SCORES) if 0.3 < s <= 0.5]
    assert moved == [7, 8, 9, 10]
    counts = result.counts
    assert (counts.compared, counts.identical, counts.different) == (20, 16, 4)
    assert (counts.source_differs, counts.only_in_a, counts.only_in_b) == (0, 0, 0)
    assert [row.row_index for row in result.rows] == moved
    for row in result.rows:
        assert [(e.path, e.outcome, e.sink) for e in row.ends_a] == [("", "routed", "low")]
        assert [(e.path, e.outcome, e.sink) for e in row.ends_b] == [("", "routed", "high")]
        assert row.field_changes == ()
        (split,) = row.divergences
        assert (split.node_id, split.node_type, split.kind, split.path) == (
            "threshold",
            "gate",
            "route",
            "",
        )
        assert split.a is not None
        assert split.b is not None
        assert split.a.reason == {
            "condition": "row['score'] > 0.5",
            "value": False,
            "route": "false",
        }
        assert split.b.reason == {"condition": "row['score'] > 0.3", "value": True, "route": "true"}
        assert (split.a.routes, split.b.routes) == (("false",), ("true",))
    assert not result.identical


async def test_identical_runs_have_no_differences(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    run_a, run_b = await run_twice(
        run_verified, tmp_path, sqlite_url, lambda out: gate_config(out, 0.5)
    )
    result = await diff(sqlite_url, run_a, run_b)
    assert result.identical
    assert (result.counts.compared, result.counts.identical) == (20, 20)
    assert result.rows == ()


async def test_a_changed_compute_shows_the_field_and_the_transform_that_changed_it(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    run_a, run_b = await run_twice(
        run_verified,
        tmp_path,
        sqlite_url,
        lambda out, factor=2: gate_config(out, 0.5, factor=factor),
        3,
    )
    result = await diff(sqlite_url, run_a, run_b)

    # id 0 doubles and triples to 0: the one row that stays the same
    assert (result.counts.identical, result.counts.different) == (1, 19)
    row = result.rows[4]
    assert row.row_index == 5
    assert [(c.path, c.field, c.change, c.a, c.b) for c in row.field_changes] == [
        ("", "double", "changed", 10, 15)
    ]
    (split,) = row.divergences
    assert (split.node_id, split.node_type, split.kind) == ("calc", "transform", "output")
    assert split.a is not None
    assert split.b is not None
    assert split.a.output_hash != split.b.output_hash
    assert [(c.field, c.a, c.b) for c in split.changed_fields] == [("double", 10, 15)]
    assert [(e.outcome, e.sink) for e in row.ends_a + row.ends_b] == [("routed", "low")] * 2


async def test_a_fork_diverges_on_its_branch_and_the_join_shows_the_field(
    run_verified: Run, tmp_path: Path, landscape_url: str
) -> None:
    run_a, run_b = await run_twice(
        run_verified,
        tmp_path,
        landscape_url,
        lambda out, cutoff=5: fork_config(out, cutoff),
        3,
    )
    result = await diff(landscape_url, run_a, run_b)

    assert [row.row_index for row in result.rows] == [4, 5]
    for row in result.rows:
        # the fork's parent and its coalesced branches carry on in the join's output
        assert [(e.path, e.outcome, e.sink) for e in row.ends_a] == [("@join", "completed", "out")]
        assert [(e.path, e.outcome, e.sink) for e in row.ends_b] == [("@join", "completed", "out")]
        assert [(c.path, c.field, c.a, c.b) for c in row.field_changes] == [
            ("@join", "l", "small", "big")
        ]
        # the join differs only because its left branch did: one divergence, on that branch
        (split,) = row.divergences
        assert (split.path, split.node_id, split.kind) == ("left", "calc_left", "output")
        assert [(c.field, c.a, c.b) for c in split.changed_fields] == [("l", "small", "big")]


async def test_an_aggregation_output_differs_in_its_first_members_row(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    def config(out: Path, factor: int = 1) -> Config:
        rows = [{"id": i, "v": i} for i in range(6)]
        return {
            "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
            "transforms": [
                {
                    "name": "scale",
                    "plugin": "compute",
                    "input": "raw",
                    "on_success": "scaled",
                    "options": {
                        "fields": {"v": f"row['v'] * {factor} if row['id'] == 4 else row['v']"}
                    },
                }
            ],
            "aggregations": [
                {
                    "name": "stats",
                    "input": "scaled",
                    "plugin": "batch_stats",
                    "trigger": {"count": 3},
                    "output_mode": "single",
                    "options": {"fields": ["v"]},
                    "on_success": "out",
                }
            ],
            "sinks": [jsonl_sink("out", out)],
        }

    run_a, run_b = await run_twice(run_verified, tmp_path, sqlite_url, config, 10)
    result = await diff(sqlite_url, run_a, run_b)

    # batches are rows 0-2 and 3-5; row 4 changed, and the second batch's output
    # belongs to its first member, row 3
    assert [row.row_index for row in result.rows] == [3, 4]
    first, changed = result.rows
    assert [(e.path, e.outcome) for e in first.ends_a] == [
        ("", "consumed_in_batch"),
        ("@stats", "completed"),
    ]
    fields = {c.field: (c.a, c.b) for c in first.field_changes if c.path == "@stats"}
    assert fields["v_sum"] == (12, 48)
    assert [(s.path, s.node_id) for s in first.divergences] == [("", "stats")]
    assert [(e.path, e.outcome) for e in changed.ends_a] == [("", "consumed_in_batch")]
    assert [(s.path, s.node_id, s.kind) for s in changed.divergences] == [("", "scale", "output")]


async def test_an_llm_divergence_shows_both_answers(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    def config(out: Path, prompt: str = "Ticket {{ row.id }}: {{ row.text }}") -> Config:
        return pipeline(
            base_url, tickets(12), out, transforms=[llm_node(options={"prompt": prompt})]
        )

    async with MockLlmServer(MockSettings(seed=5)) as server:
        base_url = server.base_url
        run_a, run_b = await run_twice(
            run_verified,
            tmp_path,
            sqlite_url,
            config,
            "Support ticket {{ row.id }}: {{ row.text }}",
        )
    result = await diff(sqlite_url, run_a, run_b, limit=None)

    assert result.counts.different == len(result.rows) > 0
    for row in result.rows:
        (split,) = row.divergences
        assert (split.node_id, split.node_type, split.kind) == ("classify", "transform", "answer")
        assert split.a is not None
        assert split.b is not None
        assert split.a.answer_status == split.b.answer_status == "success"
        answers = [
            json.loads(d.answer["choices"][0]["message"]["content"]) for d in (split.a, split.b)
        ]
        assert answers[0] != answers[1]
        changed = {c.field: (c.a, c.b) for c in row.field_changes}
        for name in ("label", "score"):
            if answers[0][name] != answers[1][name]:
                assert changed[name] == (answers[0][name], answers[1][name])


async def test_a_replayed_run_with_another_threshold_diverges_at_the_gate_not_the_llm(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    def config(out: Path, threshold: float) -> Config:
        scored = pipeline(base_url, tickets(30), out, transforms=[llm_node(on_success="scored")])
        scored["gates"] = [
            {
                "name": "threshold",
                "input": "scored",
                "condition": f"row['score'] > {threshold}",
                "routes": {"true": "out", "false": "low"},
            }
        ]
        scored["sinks"].append(jsonl_sink("low", out))
        return scored

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    out_a.mkdir()
    out_b.mkdir()
    async with MockLlmServer(MockSettings(seed=9)) as server:
        base_url = server.base_url
        run_a = (await run_verified(config(out_a, 0.5))).run_id
        pipeline_b = Pipeline.from_dict(config(out_b, 0.3), landscape_url=sqlite_url)
        run_b = (await pipeline_b.run(replay=run_a)).run_id
    async with Landscape.connect(sqlite_url) as landscape:
        assert (await landscape.verify(run_b)).ok
    result = await diff(sqlite_url, run_a, run_b)

    moved = sorted(row["id"] for row in read_jsonl(out_a / "low.jsonl") if row["score"] > 0.3)
    assert moved
    assert [row.row_index for row in result.rows] == moved
    for row in result.rows:
        (split,) = row.divergences
        assert (split.node_id, split.kind) == ("threshold", "route")
        assert split.a is not None
        assert split.b is not None
        assert (split.a.reason["value"], split.b.reason["value"]) == (False, True)
        assert [(e.outcome, e.sink) for e in row.ends_a + row.ends_b] == [
            ("routed", "low"),
            ("routed", "out"),
        ]


async def test_changed_and_missing_source_rows_are_counted_not_analysed(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows_a = [{"id": i, "score": 0.1} for i in range(8)]
    rows_b = [{"id": i, "score": 0.9 if i == 2 else 0.1} for i in range(10)]
    run_a, run_b = await run_twice(
        run_verified,
        tmp_path,
        sqlite_url,
        lambda out, rows=rows_a: gate_config(out, 0.5, rows=rows),
        rows_b,
    )
    result = await diff(sqlite_url, run_a, run_b)
    counts = result.counts
    assert (counts.compared, counts.identical, counts.different) == (8, 7, 0)
    assert (counts.source_differs, counts.only_in_a, counts.only_in_b) == (1, 0, 2)
    assert (result.source_differs, result.only_in_b) == ((2,), (8, 9))
    assert result.rows == ()
    assert not result.identical


async def test_a_limit_caps_the_rows_analysed_but_not_the_counts(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    run_a, run_b = await run_twice(
        run_verified,
        tmp_path,
        sqlite_url,
        lambda out, factor=2: gate_config(out, 0.5, factor=factor),
        3,
    )
    result = await diff(sqlite_url, run_a, run_b, limit=5)
    assert result.counts.different == 19
    assert [row.row_index for row in result.rows] == [1, 2, 3, 4, 5]
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["counts"]["different"] == 19
    assert as_json["limit"] == 5
    assert as_json["rows"][0]["divergences"][0]["a"]["node_id"] == "calc"


async def test_an_unknown_run_is_refused(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    run_id = (await run_verified(gate_config(tmp_path, 0.5))).run_id
    with pytest.raises(RunNotFound, match="no-such-run"):
        await diff(sqlite_url, run_id, "no-such-run")
