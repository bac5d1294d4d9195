"""Prompt templates render under bounded cost: a runaway template is its row's error.

Each limit of :func:`plugins.llm._prompts.limits` is shown refusing what goes over it,
ordinary templates render as before, the ``llm`` transform routes a row whose prompt
runs away by ``on_error`` while the other rows get their answers (alone and batched),
and a seeded fuzzer builds templates with loops, checking that every render returns or
fails with a PromptError well before a hang timeout.
"""

from __future__ import annotations

import datetime
import functools
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

import plugins.llm._prompts as prompts
from engine import Pipeline
from engine._docs import render_configuration_reference
from landscape import Landscape
from landscape import _schema as t
from plugins.llm import MockLlmServer, MockSettings
from plugins.llm._prompts import (
    MAX_MEMORY,
    MAX_OUTPUT,
    MAX_STEPS,
    PromptError,
    PromptTemplate,
    limits,
)
from tests._read import read_jsonl, table_rows
from tests._watchdog import run_watched

from .conftest import llm_node, pipeline

NESTED_RANGES = "{% for i in range(row.n) %}{% for j in range(row.n) %}{% endfor %}{% endfor %}"
STEP_LIMIT = f"limit of {MAX_STEPS:,} steps"
MEMORY_LIMIT = f"limit of {MAX_MEMORY:,} bytes"


def outcome(source: str, row: dict[str, Any]) -> tuple[str, str]:
    """How rendering ``source`` for ``row`` ends: ``("prompt", the prompt)``, or the kind
    of error and its message (``"unexpected"``: not a PromptError, or a prompt over the
    output limit).  Made to run in a watched child process."""
    try:
        prompt = PromptTemplate(source, origin="prompt").render(row)
    except PromptError as error:
        return ("limit" if "limit" in str(error) else "other error"), str(error)
    except BaseException as error:
        return "unexpected", repr(error)
    if len(prompt) > MAX_OUTPUT:
        return "unexpected", f"a prompt of {len(prompt):,} characters"
    return "prompt", prompt


def failure(source: str, row: dict[str, Any] | None = None) -> str:
    """The message of the PromptError rendering ``source`` (in a watched child process)
    raises; the test fails if it does not."""
    [(kind, message)] = run_watched(functools.partial(outcome, source), [row or {}])
    assert kind in ("limit", "other error"), (kind, message[:200])
    return message


def render(source: str, row: dict[str, Any] | None = None) -> str:
    return PromptTemplate(source, origin="prompt").render(row or {})


# --------------------------------------------------------------------------- the issue


def test_nested_range_loops_fail_at_once_naming_the_step_limit() -> None:
    runaway, small = run_watched(
        functools.partial(outcome, NESTED_RANGES), [{"n": 100_000}, {"n": 30}]
    )
    assert runaway == ("limit", f"prompt: the loop would exceed the {STEP_LIMIT}")
    assert small == ("prompt", "")


# --------------------------------------------------------------------------- each limit

OVER: dict[str, tuple[str, str]] = {
    "steps": ("{% for i in range(100000) %}{% if i == -1 %}x{% endif %}{% endfor %}", STEP_LIMIT),
    "memory": (
        "{% set s = 'x' * 1000000 %}{% set b %}{% for i in range(40) %}{{ s }}{% endfor %}"
        "{% endset %}{{ b|length }}",
        MEMORY_LIMIT,
    ),
    "output": (
        "{% for i in range(3) %}{{ 'x' * 400000 }}{% endfor %}",
        f"over the limit of {MAX_OUTPUT:,} characters",
    ),
    "range": ("{% for i in range(100001) %}{% endfor %}", "MAX_RANGE (100000)"),
    "sequence length": ("{{ 'x' * 1000001 }}", "the limit is 1,000,000"),
    "exponent": ("{{ 2 ** 10001 }}", "over the limit of 10,000"),
    "integer size": ("{{ (2 ** 9000) * (2 ** 9000) }}", "the limit is 14,000 bits"),
}


def test_the_module_docstring_and_the_reference_state_every_limit() -> None:
    reference = render_configuration_reference()
    for limit in limits():
        assert f"{limit.value:,}" in (prompts.__doc__ or ""), limit.name
        assert f"| {limit.name} | {limit.value:,}" in reference, limit.name


def test_every_limit_has_a_template_over_it() -> None:
    assert sorted(OVER) == sorted(limit.name for limit in limits())


@pytest.mark.parametrize("name", sorted(OVER))
def test_a_template_over_a_limit_fails_naming_it(name: str) -> None:
    source, reason = OVER[name]
    message = failure(source)
    assert reason in message
    assert message.startswith("prompt: ")


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{{ 'x'.ljust(1000000000) }}", MEMORY_LIMIT),
        ("{{ 'x'.zfill(1000000000) }}", MEMORY_LIMIT),
        ("{{ '{:>1000000000}'.format(1) }}", MEMORY_LIMIT),
        ("{{ '{:>{w}}'.format(1, w=1000000000) }}", MEMORY_LIMIT),
        ("{{ '%1000000000d' % 1 }}", MEMORY_LIMIT),
        ("{{ '%*d' % (5, 1) }}", "'*' widths"),
        ("{{ '%1000000000s'|format('x') }}", MEMORY_LIMIT),
        ("{{ 'abc'|center(1000000000) }}", MEMORY_LIMIT),
        ("{{ 'a\nb'|indent(1000000000) }}", MEMORY_LIMIT),
        ("{{ [1]|batch(1000000000, 'x')|list }}", MEMORY_LIMIT),
        ("{{ ('x' * 100000).replace('x', 'x' * 100000) }}", MEMORY_LIMIT),
        ("{{ ('x' * 100000)|replace('x', 'x' * 100000) }}", MEMORY_LIMIT),
        ("{{ row.day.strftime('%1000000000Y') }}", MEMORY_LIMIT),
        ("{{ (5).to_bytes(100000000) }}", "unsafe"),
        ("{{ true.to_bytes(100000000) }}", "unsafe"),
        ("{{ lipsum(1000000) }}", "'lipsum' is undefined"),
    ],
)
def test_what_would_build_a_huge_value_is_refused_before_it_is_built(
    source: str, reason: str
) -> None:
    assert reason in failure(source, {"day": datetime.date(2026, 5, 19)})


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        # Each call doubles the work: 2 ** 40 calls without the limit.
        (
            "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
            "{{ f(40) }}",
            STEP_LIMIT,
        ),
        # The string doubles with each iteration: 2 ** 40 characters without the limit.
        (
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s|length }}",
            MEMORY_LIMIT,
        ),
        # A list of a thousand references to one list of a thousand items, compared.
        ("{% set l = [1] * 1000 %}{{ [l] * 1000 == [l] * 1000 }}", STEP_LIMIT),
        # Items an `if` skips are paid for too.
        (
            "{% for i in range(99999) %}{% for j in range(99999) if j < 0 %}{% endfor %}"
            "{% endfor %}",
            STEP_LIMIT,
        ),
        (
            "{% for n in [row] recursive %}{{ loop(range(99999)) if n is mapping }}{% endfor %}",
            STEP_LIMIT,
        ),
        (
            "{{ range(99999)|map('string')|join(',')|length * 0 }}{{ range(99999)|list|sort"
            "|join|length }}{{ range(99999)|list|unique|list|length }}",
            STEP_LIMIT,
        ),
    ],
)
def test_runaway_templates_fail_naming_the_limit(source: str, reason: str) -> None:
    assert reason in failure(source, {"x": 1})


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "{% for it in row.lines %}{{ loop.index }}. {{ it.name }}: {{ '%.2f' % it.price }}\n"
            "{% endfor %}",
            "".join(f"{i + 1}. n{i}: {i * 1.5:.2f}\n" for i in range(500)),
        ),
        (
            "{{ row.tags|join(', ') }} {{ row.text.upper() }} {{ row.text|title }}",
            "a, b CANNOT LOG IN Cannot Log In",
        ),
        (
            "{% for n in row.tree recursive %}{{ n.name }}({{ loop(n.children) }}){% endfor %}",
            "a(b())",
        ),
        (
            "{{ '{:>6}'.format(row.id) }}|{{ row.lines|map(attribute='name')|first }}|"
            "{{ row.lines|sort(attribute='price', reverse=true)|map(attribute='name')|first }}",
            "     7|n0|n499",
        ),
        ("{% if row.id == 7 and 'a' in row.tags and 0 < row.id < 10 %}yes{% endif %}", "yes"),
        (
            "{{ row.text ~ '!' ~ row.id }} {{ row.id * 3 }} {{ 2 ** 10 }} {{ 'ab' * 3 }}",
            "cannot log in!7 21 1024 ababab",
        ),
        (
            "{% set ns = namespace(n=0) %}{% for i in range(1000) %}{% set ns.n = ns.n + i %}"
            "{% endfor %}{{ ns.n }}",
            "499500",
        ),
        (
            "{{ row.text|replace('log', 'sign')|center(17) }}|{{ row.big|length }}",
            "cannot sign in".center(17) + "|2000000",
        ),
        (
            "{{ row.get('text') }} {{ row.lines[0]['name'] }} {{ row.text[:3] }} "
            "{{ row.tags|select('equalto', 'a')|list }}",
            "cannot log in n0 can ['a']",
        ),
        (
            "{% macro m(x) %}<{{ x }}{{ caller() }}>{% endmacro %}{% call m(row.id) %}c"
            "{% endcall %}",
            "<7c>",
        ),
    ],
)
def test_ordinary_templates_render_as_before(source: str, expected: str) -> None:
    row = {
        "id": 7,
        "text": "cannot log in",
        "tags": ["a", "b"],
        "lines": [{"name": f"n{i}", "price": i * 1.5} for i in range(500)],
        "tree": [{"name": "a", "children": [{"name": "b", "children": []}]}],
        "big": "x" * 2_000_000,
    }
    assert render(source, row) == expected


def test_each_render_has_a_budget_of_its_own() -> None:
    template = PromptTemplate("{% for i in range(20000) %}{% endfor %}done", origin="prompt")
    assert [template.render({}) for _ in range(10)] == ["done"] * 10


# --------------------------------------------------------------------------- the transform


def runaway_prompt_pipeline(base_url: str, tmp_path: Path, **node: Any) -> dict[str, Any]:
    """Ten tickets; for rows 3 and 8 the prompt's nested loops run away."""
    rows = [
        {"id": i, "text": "cannot log in", "n": 100_000 if i in (3, 8) else 2} for i in range(10)
    ]
    prompt = "Ticket {{ row.id }}: {{ row.text }}" + NESTED_RANGES
    transform = llm_node(options={"prompt": prompt}, **node)
    return pipeline(base_url, rows, tmp_path, transforms=[transform])


def run_against_mock(
    base_dir: Path, url: str, node: dict[str, Any]
) -> tuple[str, dict[str, int], list[str]]:
    """Run the pipeline against the mock server and verify its audit trail: the run id,
    its outcomes and the violations.  Made to run in a watched child process."""

    async def run() -> tuple[str, dict[str, int], list[str]]:
        async with MockLlmServer(MockSettings(seed=5)) as server:
            config = runaway_prompt_pipeline(server.base_url, base_dir, **node)
            pipeline = Pipeline.from_dict(config, base_dir=base_dir, landscape_url=url)
            result = await pipeline.run()
        async with Landscape.connect(url) as landscape:
            report = await landscape.verify(result.run_id)
        return result.run_id, dict(result.outcomes), [str(v) for v in report.violations]

    return anyio.run(run)


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
def test_a_runaway_prompt_is_its_rows_error_and_the_other_rows_get_answers(
    batched: bool, tmp_path: Path, sqlite_url: str
) -> None:
    node = {"batch_size": 4, "batch_wait_ms": 600_000} if batched else {}
    run = functools.partial(run_against_mock, tmp_path, sqlite_url)
    [(run_id, outcomes, violations)] = run_watched(run, [node], hang_seconds=60)
    assert violations == []  # verify passes
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [row["id"] for row in out] == [0, 1, 2, 4, 5, 6, 7, 9]
    assert all(row["label"] in {"billing", "login", "other"} for row in out)
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert [row["id"] for row in errors] == [3, 8]
    assert all(STEP_LIMIT in row["_error"] for row in errors)
    assert outcomes == {"completed": 8, "quarantined": 2}
    states = anyio.run(table_rows, sqlite_url, t.node_states, t.node_states.c.run_id == run_id)
    failed = [json.loads(s["error_json"]) for s in states if s["error_json"]]
    assert [error["type"] for error in failed] == ["PromptError", "PromptError"]
    assert all(STEP_LIMIT in error["message"] for error in failed)


# --------------------------------------------------------------------------- fuzzing

#: About 20 s of fuzzing on a 2-core machine (a count, not a time: the run is repeatable).
FUZZ_TEMPLATES = 1_000
COUNTS = ["0", "3", "100", "99999", "row.n", "row.l|length"]


def _value(rng: random.Random, depth: int) -> str:
    """A random Jinja expression, biased towards what costs most."""
    if depth <= 0 or rng.random() < 0.25:
        return rng.choice(
            ["i", "row.n", "row.s", "row.l", "row.d", "'ab'", "[1, 'x', [2]]", "ns.v", "3"]
        )
    a, b = _value(rng, depth - 1), _value(rng, depth - 1)
    n = rng.choice(COUNTS)
    return rng.choice(
        [
            f"({a}) * {n}",
            f"[{a}] * {n}",
            f"({a}) ~ ({b})",
            f"({a}) + ({b})",
            f"({a}) == ({b})",
            f"({a}) in ({b})",
            f"({a}) ** {rng.choice(['2', '10', '10000', '10001'])}",
            f"({a})|{rng.choice(['string', 'list', 'sort', 'unique|list', 'length', 'join'])}",
            f"({a})|center({n})",
            f"({a})|replace('a', {b})",
            f"range({n})|map('string')|join({a})",
            f"'%5s' % ({a})",
            f"'{{:>{rng.choice(['5', '99999'])}}}'.format({a})",
            f"({a})[::{rng.choice(['1', '-1', '2'])}]",
            f"f({a}, {rng.choice(['2', '12', '40'])})",
        ]
    )


def _statement(rng: random.Random, depth: int) -> str:
    if depth <= 0 or rng.random() < 0.3:
        return rng.choice(
            [
                f"{{{{ {_value(rng, 2)} }}}}",
                f"{{% set ns.v = {_value(rng, 2)} %}}",
                "text " * rng.choice([1, 50]),
            ]
        )
    body = "".join(_statement(rng, depth - 1) for _ in range(rng.choice([1, 2])))
    n = rng.choice(COUNTS)
    return rng.choice(
        [
            f"{{% for i in range({n}) %}}{body}{{% endfor %}}",
            f"{{% for i in range({n}) if i % 2 %}}{body}{{% endfor %}}",
            f"{{% for i in row.l %}}{body}{{% endfor %}}",
            f"{{% if {_value(rng, 1)} %}}{body}{{% endif %}}",
            f"{{% set b %}}{body}{{% endset %}}{{{{ b|length }}}}",
        ]
    )


def _template(rng: random.Random) -> str:
    macro = (
        "{% macro f(x, n) %}{% if n %}{{ f(x ~ x, n - 1) }}{{ f(x, n - 1) }}{% endif %}"
        "{% endmacro %}"
    )
    return macro + "{% set ns = namespace(v=1) %}" + _statement(rng, rng.choice([1, 2, 3]))


def _fuzz_case(rows: list[dict[str, Any]], case: tuple[str, int]) -> tuple[str, str]:
    source, row = case
    kind, text = outcome(source, rows[row])
    return kind, text[:200]


@pytest.mark.timeout(300)
def test_fuzzed_templates_with_loops_return_or_fail_cleanly_and_never_hang() -> None:
    rng = random.Random(20_260_519)
    rows = [
        {"n": n, "s": "é" * size, "l": list(range(size)), "d": {str(i): i for i in range(size)}}
        for n, size in ((2, 3), (1000, 100), (100_000, 10_000))
    ]
    cases = [(_template(rng), rng.randrange(len(rows))) for _ in range(FUZZ_TEMPLATES)]
    results = run_watched(functools.partial(_fuzz_case, rows), cases)
    unexpected = [
        (case, text)
        for case, (kind, text) in zip(cases, results, strict=True)
        if kind == "unexpected"
    ]
    assert unexpected == []
    kinds = Counter(kind for kind, _ in results)
    # The fuzzer reaches every kind of outcome, limits included.
    assert all(kinds[kind] > 20 for kind in ("prompt", "limit", "other error")), kinds
