"""Expressions run under bounded cost: a runaway expression is its row's error, never a hang.

Each limit of :data:`plugins.expressions.LIMITS` is shown refusing what goes over it and
allowing what stays under; limit errors are routed by ``on_error`` like any other row
error; and a seeded fuzzer builds expensive expressions from the grammar, checking that
every evaluation returns or fails cleanly, in bounded memory, well before a hang timeout.
"""

from __future__ import annotations

import functools
import json
import random
import threading
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from engine import Pipeline
from landscape import Landscape
from landscape import _schema as t
from plugins.expressions import (
    LIMITS,
    MAX_LENGTH,
    MAX_MEMORY,
    MAX_STEPS,
    ExpressionError,
    ExpressionEvaluationError,
    compile_expression,
)
from tests._read import read_jsonl, table_rows
from tests._watchdog import run_watched

RUNAWAY = "[[1]*1000000]*1000000 == [[1]*1000000]*1000000"
STEP_LIMIT = f"limit of {MAX_STEPS:,} steps"
MEMORY_LIMIT = f"limit of {MAX_MEMORY:,} bytes"


def outcome(source: str, row: dict[str, Any]) -> tuple[str, str]:
    """How evaluating ``source`` on ``row`` ends: ``("value", type name)``, or the kind of
    error and its reason (``"unexpected"``: not an ExpressionError or caused by a
    MemoryError or RecursionError).  Made to run in a watched child process."""
    try:
        expression = compile_expression(source)
    except ExpressionError as error:
        return "refused", error.reason
    try:
        value = expression.evaluate({"row": row})
    except ExpressionEvaluationError as error:
        if not _clean_chain(error):
            return "unexpected", f"{error.reason} (caused by MemoryError or RecursionError)"
        return ("limit" if "limit" in error.reason else "other error"), error.reason
    except BaseException as error:
        return "unexpected", repr(error)
    return "value", type(value).__name__


def failure(source: str, row: dict[str, Any] | None = None) -> str:
    """The reason evaluating ``source`` (in a watched child process) fails; the test fails
    if it does not."""
    [(kind, reason)] = run_watched(functools.partial(outcome, row=row or {}), [source])
    assert kind in ("refused", "limit", "other error"), (kind, reason)
    return reason


# --------------------------------------------------------------------------- the issue


def test_the_runaway_comparison_of_the_issue_fails_at_once_naming_the_step_limit() -> None:
    [(kind, reason)] = run_watched(functools.partial(outcome, row={}), [RUNAWAY])
    assert kind == "limit"
    assert STEP_LIMIT in reason
    assert "comparison" in reason


def _traced(source: str) -> tuple[str, str, int]:
    """How evaluating ``source`` fails, and the peak of memory allocated meanwhile."""
    expression = compile_expression(source)
    tracemalloc.start()
    try:
        expression.evaluate({"row": {}})
    except ExpressionEvaluationError as error:
        return "limit", error.reason, tracemalloc.get_traced_memory()[1]
    return "value", "", tracemalloc.get_traced_memory()[1]


def test_a_long_expression_builds_no_more_than_the_memory_limit() -> None:
    # 3.7 KB of lists of a million items each: 2 GB without the limit.
    source = "len((" + ", ".join(["[0] * 999_999"] * 250) + "))"
    assert len(source) < 4_000
    [(kind, reason, peak)] = run_watched(_traced, [source])
    assert kind == "limit"
    assert MEMORY_LIMIT in reason
    assert peak <= MAX_MEMORY + 4 * 1024 * 1024


# --------------------------------------------------------------------------- each limit

NESTED: list[Any] = []
for _ in range(300):
    NESTED = [NESTED]

# One expression over each limit (and the row it needs), with what the reason says.
OVER: dict[str, tuple[str, dict[str, Any], str]] = {
    "source length": ("1 + " * 1_000 + "1", {}, "the limit is 4,000"),
    "nesting depth": ("[" * 60 + "1" + "]" * 60, {}, "nested too deeply"),
    "steps": ("row['a'] == row['b']", {"a": [0] * 200_000, "b": [0] * 200_000}, STEP_LIMIT),
    "memory": ("len((" + ", ".join(["'a' * 999_999"] * 40) + "))", {}, MEMORY_LIMIT),
    "sequence length": ("[0] * 1_000_001", {}, f"the limit is {MAX_LENGTH:,}"),
    "exponent": ("2 ** 10_001", {}, "over the limit of 10,000"),
    "integer size": ("(2 ** 9_000) * (2 ** 9_000)", {}, "the limit is 14,000 bits"),
    "round digits": ("round(1.5, 1_001)", {}, "digits must be within ±1,000"),
    "value nesting": ("row['a'] == row['b']", {"a": NESTED, "b": NESTED[:]}, "nested more than"),
}


def test_every_limit_has_an_expression_over_it() -> None:
    assert sorted(OVER) == sorted(limit.name for limit in LIMITS)


@pytest.mark.parametrize("name", sorted(OVER))
def test_an_expression_over_a_limit_fails_naming_it(name: str) -> None:
    source, row, reason = OVER[name]
    assert reason in failure(source, row)


@pytest.mark.parametrize(
    ("source", "row"),
    [
        # Two lists of 100,000 items: 2 x (16 + 100,000) steps, under 250,000.
        ("row['a'] == row['b']", {"a": [0] * 100_000, "b": [0] * 100_000}),
        ("len('a' * 1_000_000)", {}),
        ("len(row['t'] + row['t'])", {"t": "x" * 500_000}),
        ("len(upper(row['t']))", {"t": "x" * 10_000_000}),
        ("2 ** 10_000 > 0", {}),
        ("-1 in row['a']", {"a": list(range(200_000))}),
    ],
)
def test_an_expression_under_the_limits_is_computed(source: str, row: dict[str, Any]) -> None:
    compile_expression(source).evaluate({"row": row})


def test_a_value_found_in_several_places_is_counted_each_time() -> None:
    # 1,000 references to one list of 1,000 items: a comparison visits all of them.
    assert STEP_LIMIT in failure("[[1] * 1000] * 1000 == [[1] * 1000] * 1000")
    assert compile_expression("[[1] * 100] * 100 == [[1] * 100] * 100").evaluate({"row": {}})


def test_membership_hashing_and_min_max_are_measured() -> None:
    nested = [[i] for i in range(20_000)]
    assert STEP_LIMIT in failure("[0] in row['n']", {"n": nested})
    assert "hashing" in failure("{row['t']}", {"t": tuple(tuple(x) for x in nested)})
    assert "max()" in failure("max(row['n'])", {"n": nested})
    assert "max()" in failure("max(row['s'])", {"s": "x" * 300_000})


def test_the_value_of_the_expression_is_measured_too() -> None:
    assert "the value of the expression" in failure("[[0] * 1000] * 300")
    tags = [f"tag{i}" for i in range(10_000)]
    assert compile_expression("row['tags']").evaluate({"row": {"tags": tags}}) is tags


def test_each_evaluation_has_a_budget_of_its_own() -> None:
    heavy = compile_expression("row['a'] == row['b']")
    row = {"a": [0] * 100_000, "b": [0] * 100_000}
    assert all(heavy.evaluate({"row": row}) for _ in range(5))
    results: list[Any] = []

    def evaluate() -> None:
        results.append(heavy.evaluate({"row": row}))

    threads = [threading.Thread(target=evaluate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 4


@pytest.mark.parametrize(
    ("source", "row", "expected"),
    [
        ("row['score'] > 0.8", {"score": 0.9}, True),
        ("round(row['amount'] * 0.92, 2)", {"amount": 100}, 92.0),
        (
            "row['country'] in ('DE', 'FR') and row['amount'] > 1000",
            {"country": "DE", "amount": 5},
            False,
        ),
        ("'b' in row['tags']", {"tags": [f"t{i}" for i in range(50_000)] + ["b"]}, True),
        ("lower(row['name']) + '-' + row['country']", {"name": "Ada", "country": "DE"}, "ada-DE"),
        ("max(row['prices']) - min(row['prices'])", {"prices": list(range(100_000))}, 99_999),
        ("row['text'][::-1][:3]", {"text": "abc" * 1_000_000}, "cba"),
        ("len(row['tags'] + ['x'])", {"tags": ["a"] * 500_000}, 500_001),
        ("{row['k']: 1}[row['k']]", {"k": "key" * 1000}, 1),
        (
            "row['a'] == row['b']",
            {"a": {"x": [1, 2], "y": "z"}, "b": {"x": [1, 2], "y": "z"}},
            True,
        ),
    ],
)
def test_ordinary_expressions_on_big_rows_are_unaffected(
    source: str, row: dict[str, Any], expected: Any
) -> None:
    assert compile_expression(source).evaluate({"row": row}) == expected


# --------------------------------------------------------------------------- routing


def pipeline(tmp_path: Path, runaway_at: str) -> dict[str, Any]:
    """Compute, gate and filter in a row, ``runaway_at`` the one whose expression runs
    away on rows 1 and 4 (their ``n`` is a million); the others' expressions are benign."""
    rows = [{"id": i, "n": 1_000_000 if i in (1, 4) else 3} for i in range(6)]
    runaway = "[[1] * row['n']] * row['n'] == [[1] * row['n']] * row['n']"
    expression = {node: runaway if node == runaway_at else "row['n'] > 0" for node in NODES}

    def sink(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "plugin": "jsonl",
            "options": {"path": str(tmp_path / f"{name}.jsonl")},
        }

    return {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "transforms": [
            {
                "name": "calc",
                "plugin": "compute",
                "input": "raw",
                "on_success": "computed",
                "on_error": "errors",
                "options": {"fields": {"same": expression["calc"]}},
            },
            {
                "name": "keep",
                "plugin": "filter",
                "input": "gated",
                "on_success": "out",
                "on_error": "errors",
                "options": {"keep": expression["keep"]},
            },
        ],
        "gates": [
            {
                "name": "check",
                "input": "computed",
                "condition": expression["check"],
                "routes": {"true": "gated", "false": "discard"},
                "on_error": "errors",
            }
        ],
        "sinks": [sink("out"), sink("errors")],
    }


NODES = ("calc", "check", "keep")


def run_pipeline(base_dir: Path, url: str, config: dict[str, Any]) -> tuple[str, str, list[str]]:
    """Run the pipeline and verify its audit trail: status, run id and the violations.
    Made to run in a watched child process (a runaway expression holds the GIL)."""

    async def run() -> tuple[str, str, list[str]]:
        pipeline = Pipeline.from_dict(config, base_dir=base_dir, landscape_url=url)
        result = await pipeline.run()
        async with Landscape.connect(url) as landscape:
            report = await landscape.verify(result.run_id)
        return result.status, result.run_id, [str(v) for v in report.violations]

    return anyio.run(run)


@pytest.mark.parametrize("runaway_at", NODES)
def test_a_limit_error_is_routed_by_on_error_with_its_reason_recorded(
    runaway_at: str, tmp_path: Path, sqlite_url: str
) -> None:
    run = functools.partial(run_pipeline, tmp_path, sqlite_url)
    [(status, run_id, violations)] = run_watched(
        run, [pipeline(tmp_path, runaway_at)], hang_seconds=60
    )
    assert violations == []  # verify passes
    assert status == "completed"
    assert [row["id"] for row in read_jsonl(tmp_path / "out.jsonl")] == [0, 2, 3, 5]
    assert [row["id"] for row in read_jsonl(tmp_path / "errors.jsonl")] == [1, 4]
    nodes = anyio.run(table_rows, sqlite_url, t.nodes, t.nodes.c.run_id == run_id)
    names = {node["node_id"]: node["name"] for node in nodes}
    states = anyio.run(table_rows, sqlite_url, t.node_states, t.node_states.c.run_id == run_id)
    failed = [s for s in states if s["error_json"]]
    assert {names[s["node_id"]] for s in failed} == {runaway_at}
    errors = [json.loads(s["error_json"]) for s in failed]
    assert len(errors) == 2
    assert all(error["type"] == "ExpressionEvaluationError" for error in errors)
    assert all(STEP_LIMIT in error["message"] for error in errors)


# --------------------------------------------------------------------------- fuzzing

#: About 20 s of fuzzing on a 2-core machine (a count, not a time: the run is repeatable).
FUZZ_EXPRESSIONS = 6_500
SIZES = ["0", "1", "3", "10", "999", "30_000", "100_000", "1_000_000", "10 ** 9", "-1"]


def _leaf(rng: random.Random) -> str:
    return rng.choice(
        [
            rng.choice(SIZES),
            repr("ab" * rng.choice([1, 10, 1000])),
            "row['n']",
            "row['s']",
            "row['l']",
            "row['d']",
            "row['deep']",
            "row.get('missing', 7)",
            "[1, 'a', [2]]",
            "(1, (2, 3))",
            "2.5",
        ]
    )


def _expression(rng: random.Random, depth: int) -> str:
    """A random expression of the grammar, biased towards what costs most."""
    if depth <= 0 or rng.random() < 0.15:
        return _leaf(rng)
    a, b = _expression(rng, depth - 1), _expression(rng, depth - 1)
    n = rng.choice(SIZES)
    expensive = [
        f"[{a}] * {n}",
        f"({a},) * {n}",
        f"({a}) * {n}",
        f"({a}) == ({b})",
        f"({a}) == ({a})",
        f"({a}) < ({b})",
        f"({a}) in ({b})",
        f"[{a}] in [{a}] * {n}",
        f"min({a})",
        f"max({a}, {b})",
        f"{{({a},) * {n}}}",
        f"({a}) + ({b})",
        f"({a}) ** {rng.choice(['2', '100', '10_000', '10_001', '0.5', '-3'])}",
        f"upper({a}) + ({b})",
    ]
    other = [
        f"[{a}, {a}, {b}]",
        f"({a}) not in ({b})",
        f"len({a})",
        f"({a})[::{rng.choice(['1', '-1', '2', '0'])}]",
        f"({a})[{rng.choice(['0', '-1', '1:', ':10'])}]",
        f"{{{a}, {b}}}",
        f"{{{a}: {b}}}",
        f"lower({a})",
        f"({a}) if ({b}) else ({a})",
        f"({a}) - ({b})",
        f"({a}) // ({b})",
        f"({a}) % ({b})",
        f"round({a}, {rng.choice(['2', '-3', '1_001'])})",
        f"abs({a})",
        f"not ({a})",
        f"({a}) and ({b})",
    ]
    return rng.choice(expensive if rng.random() < 0.7 else other)


def _row(rng: random.Random) -> dict[str, Any]:
    size = rng.choice([0, 3, 1000, 100_000])
    deep: Any = []
    for _ in range(rng.choice([1, 20, 2000])):
        deep = [deep, 1]
    return {
        "n": rng.choice([0, 1, 7, 10**6, -2]),
        "s": "é" * rng.choice([0, 5, 100_000]),
        "l": [rng.random() for _ in range(size)],
        "d": {f"k{i}": [i, str(i)] for i in range(rng.choice([0, 10, 5000]))},
        "deep": deep,
    }


def _clean_chain(error: BaseException) -> bool:
    """No MemoryError or RecursionError anywhere in the error's causes."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, MemoryError | RecursionError):
            return False
        seen = seen.__cause__
    return True


def _fuzz_case(rows: list[dict[str, Any]], case: tuple[str, int]) -> tuple[str, str]:
    source, row = case
    return outcome(source, rows[row])


@pytest.mark.timeout(300)
def test_fuzzed_expensive_expressions_return_or_fail_cleanly_and_never_hang() -> None:
    rng = random.Random(20_260_519)
    rows = [_row(rng) for _ in range(8)]
    cases = [
        (_expression(rng, rng.choice([1, 2, 3, 4])), rng.randrange(len(rows)))
        for _ in range(FUZZ_EXPRESSIONS)
    ]
    results = run_watched(functools.partial(_fuzz_case, rows), cases)
    unexpected = [
        (case, reason)
        for case, (kind, reason) in zip(cases, results, strict=True)
        if kind == "unexpected"
    ]
    assert unexpected == []
    kinds = Counter(kind for kind, _ in results)
    # The fuzzer reaches every kind of outcome, limits included.
    assert all(kinds[kind] > 20 for kind in ("value", "limit", "other error")), kinds
