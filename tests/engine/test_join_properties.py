"""Property: random pipelines of transforms, gates, fork/coalesce joins and aggregations,
run over random rows with random failures and latencies, write exactly what a sequential
reference model of the same pipeline writes, record the same outcomes, and leave an audit
trail that verifies (one terminal outcome per token, no open state, closed batches,
parents, coalesce failure contexts).

The engine may legitimately interleave rows differently from run to run; the strategy,
not a looser comparison, keeps that out of the result: sinks are compared as multisets;
an aggregation counts rows into batches only where its input order is fixed (else it
flushes at end of input only, and a ``collect`` there lists its rows in any order); a
join whose result would depend on which branch arrives first (``first``, ``quorum``
below the branch count) gets branches that never change a row; and the ``_error`` text of
a failed join is not compared (it tells *how* the failure was noticed, e.g.
``late_arrival`` or ``missing_branches``, which depends on timing), its ``_error_node`` is.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from engine import Pipeline
from landscape import Landscape
from landscape import _schema as t
from plugins import Aggregation, BatchContext, Row, RowContext, Transform

OUT, SIDE, ERRORS, DISCARD = "out", "side", "errors", "discard"
SINKS = (OUT, SIDE, ERRORS)
#: The list field of a ``collect`` whose input order is not fixed (compared sorted).
ANY_ORDER = "rows_any"
#: Transforms, gates, aggregations and coalesces per pipeline, at most.
MAX_NODES = 12


# -- the pipeline grammar ----------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A :class:`Tag` transform: fails rows whose id is in ``fail``, else sets ``field``
    (if any) to ``value``, after a latency of ``delays_ms[id % 4]``."""

    name: str
    field: str | None = None
    value: int | str = 0
    fail: frozenset[int] = frozenset()
    delays_ms: tuple[int, ...] = (0, 0, 0, 0)
    concurrency: int = 1
    ordered: bool = True
    on_error: str | None = None


@dataclass(frozen=True)
class Route:
    """A gate sending rows with ``id % modulus == remainder`` to ``target``, the rest on."""

    name: str
    modulus: int
    remainder: int
    target: str


@dataclass(frozen=True)
class Batch:
    """An aggregation; ``count`` is its only trigger besides end of input."""

    name: str
    plugin: str = "batch_stats"
    mode: str = "transform"
    count: int | None = None
    group_by: str | None = None
    retries: int = 0
    fail: frozenset[int] = frozenset()
    fail_attempts: int = 0
    on_error: str | None = None
    list_field: str = "rows"


@dataclass(frozen=True)
class Join:
    """A fork gate into ``branches`` (name -> chain), joined by one coalesce."""

    fork: str
    coalesce: str
    branches: tuple[tuple[str, Chain], ...]
    policy: str = "require_all"
    quorum: int | None = None
    merge: str = "union"
    prefer: str | None = None
    select_branch: str | None = None
    on_error: str | None = None


Segment = Step | Route | Batch | Join
Chain = tuple[Segment, ...]


# -- plugins -----------------------------------------------------------------------------


class Tag(Transform):
    """What :class:`Step` describes; options ``field``, ``value``, ``fail``, ``delays_ms``."""

    name: ClassVar[str] = ""

    async def process(self, row: Row, ctx: RowContext) -> Row:
        row_id, delays = row.get("id"), self.options["delays_ms"]
        delay = delays[row_id % len(delays)] if isinstance(row_id, int) else 0
        if delay:
            await anyio.sleep(delay / 1000)
        else:
            await anyio.lowlevel.checkpoint()
        if row_id in self.options["fail"]:
            raise RuntimeError(f"scripted failure of {row_id}")
        name = self.options["field"]
        return row if name is None else {**row, name: self.options["value"]}


class FlakyCount(Aggregation):
    """Counts the batch and lists its ids; a batch holding an id of ``fail`` fails while
    its attempt number is at most ``fail_attempts``."""

    name: ClassVar[str] = ""

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        ids = sorted(row["id"] for row in rows if isinstance(row.get("id"), int))
        if ctx.attempt <= self.options["fail_attempts"] and set(ids) & set(self.options["fail"]):
            raise RuntimeError(f"scripted failure of attempt {ctx.attempt}")
        values = {"flaky_count": len(rows), "flaky_ids": ids}
        if ctx.output_mode == "passthrough":
            return [{**row, **values} for row in rows]
        return [values if ctx.group_key is None else {"group": ctx.group_key, **values}]


# -- strategies --------------------------------------------------------------------------


@dataclass
class _Names:
    """Node names for one drawn pipeline, and how many more nodes it may have."""

    budget: int = MAX_NODES
    issued: int = 0

    def take(self, cost: int) -> int:
        self.budget -= cost
        self.issued += 1
        return self.issued


@st.composite
def steps(draw: st.DrawFn, names: _Names, ordered: bool, plain: bool) -> tuple[Step, bool]:
    concurrency = draw(st.integers(1, 4))
    in_order = draw(st.booleans())
    step = Step(
        name=f"t{names.take(1)}",
        # Values clash across branches (1 vs "1" too) or agree, for merges to resolve.
        field=None if plain else draw(st.sampled_from([None, "a", "b"])),
        value=draw(st.sampled_from([0, 1, "1"])),
        fail=draw(st.frozensets(st.integers(0, 29), max_size=6)),
        delays_ms=tuple(draw(st.lists(st.integers(0, 3), min_size=4, max_size=4))),
        concurrency=concurrency,
        ordered=in_order,
        on_error=draw(st.sampled_from([None, ERRORS])),
    )
    return step, ordered and (in_order or concurrency == 1)


@st.composite
def routes(draw: st.DrawFn, names: _Names, ordered: bool) -> tuple[Route, bool]:
    modulus = draw(st.integers(2, 4))
    route = Route(
        name=f"r{names.take(1)}",
        modulus=modulus,
        remainder=draw(st.integers(0, modulus - 1)),
        target=draw(st.sampled_from([SIDE, DISCARD])),
    )
    return route, ordered


@st.composite
def batches(draw: st.DrawFn, names: _Names, ordered: bool, in_branch: bool) -> tuple[Batch, bool]:
    """In a branch only ``passthrough`` (a new token could not join its siblings) and no
    ``collect`` (its list would be compared with a sibling's)."""
    plugins = ["batch_stats", "flaky"] if in_branch else ["batch_stats", "collect", "flaky"]
    plugin = draw(st.sampled_from(plugins))
    modes = ["passthrough"] if in_branch else ["transform", "single", "passthrough"]
    flaky = plugin == "flaky"
    batch = Batch(
        name=f"a{names.take(1)}",
        plugin=plugin,
        mode=draw(st.sampled_from(modes)),
        count=draw(st.none() | st.integers(1, 5)) if ordered else None,
        group_by=draw(st.sampled_from([None, "g", "row.get('g', -1)"])),
        retries=draw(st.integers(0, 1)),
        fail=draw(st.frozensets(st.integers(0, 29), max_size=3)) if flaky else frozenset(),
        fail_attempts=draw(st.integers(0, 2)) if flaky else 0,
        on_error=draw(st.sampled_from([None, ERRORS])),
        list_field="rows" if ordered else ANY_ORDER,
    )
    return batch, ordered


@st.composite
def joins(draw: st.DrawFn, names: _Names, depth: int, ordered: bool) -> tuple[Join, bool]:
    number = names.take(2)
    labels = [f"f{number}{letter}" for letter in "xyz"[: draw(st.integers(2, 3))]]
    policy = draw(st.sampled_from(["require_all", "best_effort", "quorum", "first"]))
    quorum = draw(st.integers(1, len(labels))) if policy == "quorum" else None
    # Which branches win a race decides the result of `first` and of a quorum smaller than
    # the branch count: their branches may only drop rows, never change them.
    plain = policy == "first" or (quorum is not None and quorum < len(labels))
    merge = "union" if plain else draw(st.sampled_from(["union", "union", "nested", "select"]))
    branches = []
    for label in labels:
        chain, _ = draw(chains(names, depth=depth + 1, ordered=ordered, plain=plain))
        branches.append((label, chain))
    join = Join(
        fork=f"f{number}",
        coalesce=f"j{number}",
        branches=tuple(branches),
        policy=policy,
        quorum=quorum,
        merge=merge,
        prefer=draw(st.none() | st.sampled_from(labels)) if merge == "union" else None,
        select_branch=draw(st.sampled_from(labels)) if merge == "select" else None,
        on_error=draw(st.sampled_from([None, ERRORS])),
    )
    return join, False


@st.composite
def chains(
    draw: st.DrawFn, names: _Names, *, depth: int, ordered: bool, plain: bool = False
) -> tuple[Chain, bool]:
    """A chain of segments and whether its output order is still the source order.

    Top level: 1-3 segments, joins likelier; a branch: 0-2 (0-1 in a nested fork).
    Forks nest two deep at most.
    """
    max_length = (3, 2, 1)[depth]
    segments: list[Segment] = []
    for _ in range(draw(st.integers(0 if depth else 1, max_length))):
        if names.budget < 1:
            break
        kinds = ["step", "route"] if depth == 0 else ["step", "step", "route"]
        if not plain:
            kinds.append("batch")
            if depth < 2 and names.budget >= 4:
                kinds += ["join"] * (2 if depth == 0 else 1)
        kind = draw(st.sampled_from(kinds))
        segment: Segment
        if kind == "step":
            segment, ordered = draw(steps(names, ordered, plain))
        elif kind == "route":
            segment, ordered = draw(routes(names, ordered))
        elif kind == "batch":
            segment, ordered = draw(batches(names, ordered, in_branch=depth > 0))
        else:
            segment, ordered = draw(joins(names, depth, ordered))
        segments.append(segment)
    return tuple(segments), ordered


@st.composite
def pipelines(draw: st.DrawFn) -> Chain:
    chain, _ = draw(chains(_Names(), depth=0, ordered=True))
    return chain


def _source_row(index: int, v: int, g: int | None, a: int | str | None = None) -> Row:
    return {"id": index, "v": v} | ({} if g is None else {"g": g}) | ({} if a is None else {"a": a})


@st.composite
def source_rows(draw: st.DrawFn) -> list[Row]:
    """0-30 rows (drawn as a length first: plain lists would be mostly tiny); ``g`` and
    ``a`` may be missing."""
    size = draw(st.integers(0, 30) | st.integers(10, 30))
    optional = st.none() | st.sampled_from([0, 1, "1"])
    values = st.tuples(st.integers(-3, 3), st.none() | st.integers(0, 2), optional)
    items = draw(st.lists(values, min_size=size, max_size=size))
    return [_source_row(i, *value) for i, value in enumerate(items)]


# -- the reference model -----------------------------------------------------------------


@dataclass
class Tok:
    row: Row
    #: Index of the forked token (in the stream entering the fork) this one joins back to.
    key: int | None = None


@dataclass
class Model:
    """Evaluates a chain sequentially: each segment on the whole stream, in order."""

    sinks: dict[str, list[Row]] = field(default_factory=lambda: {name: [] for name in SINKS})
    outcomes: Counter[str] = field(default_factory=Counter)

    def run(self, chain: Chain, rows: list[Row]) -> Model:
        arrival = "routed" if chain and isinstance(chain[-1], Route) else "completed"
        for tok in self.chain(chain, [Tok(dict(row)) for row in rows]):
            self.write(OUT, tok.row, arrival)
        return self

    def write(self, sink: str, row: Row, outcome: str) -> None:
        self.sinks[sink].append(row)
        self.outcomes[outcome] += 1

    def fail(self, tok: Tok, node: str, on_error: str | None, message: str | None) -> None:
        if on_error is None:
            self.outcomes["failed"] += 1
            return
        row = {**tok.row, "_error_node": node}
        if message is not None:
            row["_error"] = message
        self.write(on_error, row, "quarantined")

    def chain(self, chain: Chain, toks: list[Tok]) -> list[Tok]:
        for segment in chain:
            match segment:
                case Step():
                    toks = self.step(segment, toks)
                case Route():
                    toks = self.route(segment, toks)
                case Batch():
                    toks = self.batch(segment, toks)
                case Join():
                    toks = self.join(segment, toks)
        return toks

    def step(self, step: Step, toks: list[Tok]) -> list[Tok]:
        out = []
        for tok in toks:
            row_id = tok.row.get("id")
            if row_id in step.fail:
                self.fail(tok, step.name, step.on_error, f"scripted failure of {row_id}")
            elif step.field is None:
                out.append(tok)
            else:
                out.append(Tok({**tok.row, step.field: step.value}, tok.key))
        return out

    def route(self, route: Route, toks: list[Tok]) -> list[Tok]:
        out = []
        for tok in toks:
            if tok.row.get("id", -1) % route.modulus != route.remainder:
                out.append(tok)
            elif route.target == DISCARD:
                self.outcomes["discarded"] += 1
            else:
                self.write(route.target, tok.row, "routed")
        return out

    def batch(self, batch: Batch, toks: list[Tok]) -> list[Tok]:
        drafts: dict[Any, list[Tok]] = {}  # group -> members, in the order batches began
        out = []
        for tok in toks:
            if batch.group_by == "g" and "g" not in tok.row:
                self.fail(tok, batch.name, batch.on_error, None)
                continue
            key = None if batch.group_by is None else tok.row.get("g", -1)
            members = drafts.setdefault(key, [])
            members.append(tok)
            if batch.mode == "passthrough":
                self.outcomes["buffered"] += 1
            if batch.count is not None and len(members) >= batch.count:
                del drafts[key]
                out += self.flush(batch, key, members)
        for key, members in drafts.items():
            out += self.flush(batch, key, members)
        return out

    def flush(self, batch: Batch, key: Any, members: list[Tok]) -> list[Tok]:
        rows = [tok.row for tok in members]
        ids = sorted(row["id"] for row in rows if isinstance(row.get("id"), int))
        if (
            batch.plugin == "flaky"
            and batch.fail_attempts > batch.retries
            and batch.fail & set(ids)
        ):
            message = f"scripted failure of attempt {batch.retries + 1}"
            for tok in members:
                self.fail(tok, batch.name, batch.on_error, message)
            return []
        values: Row
        if batch.plugin == "batch_stats":
            values = {"count": len(rows), **_stats("id", rows), **_stats("v", rows)}
        elif batch.plugin == "collect":
            values = {"count": len(rows), batch.list_field: [dict(row) for row in rows]}
        else:
            values = {"flaky_count": len(rows), "flaky_ids": ids}
        if batch.mode == "passthrough":
            return [Tok({**tok.row, **values}, tok.key) for tok in members]
        self.outcomes["consumed_in_batch"] += len(members)
        return [Tok(values if key is None else {"group": key, **values})]

    def join(self, join: Join, toks: list[Tok]) -> list[Tok]:
        self.outcomes["forked"] += len(toks)
        reached: dict[str, dict[int | None, Tok]] = {}
        for label, chain in join.branches:
            survivors = self.chain(chain, [Tok(tok.row, i) for i, tok in enumerate(toks)])
            reached[label] = {tok.key: tok for tok in survivors}
            assert len(reached[label]) == len(survivors), "a branch yields one token per fork"
        out = []
        for i, parent in enumerate(toks):
            arrived = [
                (label, reached[label][i]) for label, _ in join.branches if i in reached[label]
            ]
            row = self.resolve(join, arrived)
            if row is not None:
                out.append(Tok(row, parent.key))
        return out

    def resolve(self, join: Join, arrived: list[tuple[str, Tok]]) -> Row | None:
        """The joined row, recording what happens to the arrived tokens."""
        if not arrived:
            return None
        if join.policy == "require_all":
            taken = arrived if len(arrived) == len(join.branches) else []
        elif join.policy == "quorum":
            assert join.quorum is not None
            taken = arrived[: join.quorum] if len(arrived) >= join.quorum else []
        elif join.policy == "best_effort":
            taken = arrived
        else:  # first
            taken = arrived[:1]
        row = _merge(join, taken) if taken else None
        if row is None:
            for _, tok in arrived:
                self.fail(tok, join.coalesce, join.on_error, None)
            return None
        joined = arrived if join.policy == "first" else taken
        self.outcomes["coalesced"] += len(joined)
        for _, tok in arrived[len(joined) :]:  # too late for a quorum already met
            self.fail(tok, join.coalesce, join.on_error, None)
        return row


def _stats(name: str, rows: list[Row]) -> Row:
    numbers = [row[name] for row in rows if row.get(name) is not None]
    if not numbers:
        return {f"{name}_{stat}": None for stat in ("sum", "mean", "min", "max")}
    total = sum(numbers)
    return {
        f"{name}_sum": total,
        f"{name}_mean": total / len(numbers),
        f"{name}_min": min(numbers),
        f"{name}_max": max(numbers),
    }


def _merge(join: Join, taken: list[tuple[str, Tok]]) -> Row | None:
    """The documented merges; ``None`` when the merge fails."""
    rows = {label: tok.row for label, tok in taken}
    if join.merge == "nested":
        return rows
    if join.merge == "select":
        assert join.select_branch is not None
        return rows.get(join.select_branch)
    merged: Row = {}
    conflicts = set()
    for row in rows.values():
        for name, value in row.items():
            if name not in merged:
                merged[name] = value
            elif type(merged[name]) is not type(value) or merged[name] != value:
                conflicts.add(name)
    preferred = rows.get(join.prefer) if join.prefer is not None else None
    for name in conflicts:
        if preferred is None or name not in preferred:
            return None
        merged[name] = preferred[name]
    return merged


# -- running the engine ------------------------------------------------------------------


class _Wiring:
    """The pipeline config of a chain: every segment reads a fresh connection."""

    def __init__(self) -> None:
        self.sections: dict[str, list[dict[str, Any]]] = {
            "transforms": [],
            "gates": [],
            "coalesce": [],
            "aggregations": [],
        }
        self.fed = {OUT}
        self.connections = 0

    def connection(self) -> str:
        self.connections += 1
        return f"c{self.connections}"

    def chain(self, chain: Chain, target: str) -> str:
        """Wire ``chain`` to write into ``target``; returns the connection its head reads."""
        for segment in reversed(chain):
            head = self.connection()
            self.segment(segment, head, target)
            target = head
        return target

    def error_route(self, on_error: str | None) -> str | None:
        if on_error is not None:
            self.fed.add(on_error)
        return on_error

    def segment(self, segment: Segment, source: str, target: str) -> None:
        match segment:
            case Step():
                self.sections["transforms"].append(
                    {
                        "name": segment.name,
                        "plugin": Tag,
                        "input": source,
                        "on_success": target,
                        "on_error": self.error_route(segment.on_error),
                        "concurrency": segment.concurrency,
                        "ordered": segment.ordered,
                        "options": {
                            "field": segment.field,
                            "value": segment.value,
                            "fail": sorted(segment.fail),
                            "delays_ms": list(segment.delays_ms),
                        },
                    }
                )
            case Route():
                if segment.target != DISCARD:
                    self.fed.add(segment.target)
                condition = f"row.get('id', -1) % {segment.modulus} == {segment.remainder}"
                self.sections["gates"].append(
                    {
                        "name": segment.name,
                        "input": source,
                        "condition": condition,
                        "routes": {"true": segment.target, "false": target},
                    }
                )
            case Batch():
                self.sections["aggregations"].append(self.aggregation(segment, source, target))
            case Join():
                self.join(segment, source, target)

    def aggregation(self, batch: Batch, source: str, target: str) -> dict[str, Any]:
        options: dict[str, Any]
        if batch.plugin == "batch_stats":
            plugin, options = "batch_stats", {"fields": ["id", "v"]}
        elif batch.plugin == "collect":
            plugin, options = "collect", {"field": batch.list_field}
        else:
            plugin = FlakyCount
            options = {"fail": sorted(batch.fail), "fail_attempts": batch.fail_attempts}
        return {
            "name": batch.name,
            "plugin": plugin,
            "input": source,
            "on_success": target,
            "on_error": self.error_route(batch.on_error),
            "trigger": {"count": batch.count},
            "group_by": batch.group_by,
            "output_mode": batch.mode,
            "retries": batch.retries,
            "options": options,
        }

    def join(self, join: Join, source: str, target: str) -> None:
        fork_to, arrive_on = {}, {}
        for label, chain in join.branches:
            arrive_on[label] = self.connection()
            fork_to[label] = self.chain(chain, arrive_on[label])
        self.sections["gates"].append({"name": join.fork, "input": source, "fork_to": fork_to})
        self.sections["coalesce"].append(
            {
                "name": join.coalesce,
                "branches": arrive_on,
                "policy": join.policy,
                "quorum": join.quorum,
                "merge": join.merge,
                "prefer": join.prefer,
                "select_branch": join.select_branch,
                "on_success": target,
                "on_error": self.error_route(join.on_error),
            }
        )


def pipeline_config(chain: Chain, rows: list[Row], out: Path, buffer: int) -> dict[str, Any]:
    wiring = _Wiring()
    head = wiring.chain(chain, OUT)
    sinks = [
        {
            "name": name,
            "plugin": "jsonl",
            "options": {"path": str(out / f"{name}.jsonl")},
            "flush_interval_ms": 5,
        }
        for name in SINKS
        if name in wiring.fed
    ]
    return {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": head},
        **wiring.sections,
        "sinks": sinks,
        "runtime": {"max_buffer_size": buffer},
    }


@dataclass
class Observed:
    status: str
    sinks: dict[str, list[Row]]
    counted: Counter[str]
    recorded: Counter[str]
    violations: list[str]


async def run_pipeline(chain: Chain, rows: list[Row], out: Path, url: str, buffer: int) -> Observed:
    config = pipeline_config(chain, rows, out, buffer)
    result = await Pipeline.from_dict(config, landscape_url=url).run()
    sinks = {name: _read_jsonl(out / f"{name}.jsonl") for name in SINKS}
    outcomes = t.token_outcomes
    query = (
        select(outcomes.c.outcome, func.count())
        .where(outcomes.c.run_id == result.run_id)
        .group_by(outcomes.c.outcome)
    )
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(result.run_id)
        async with landscape.engine.connect() as conn:
            recorded = Counter(dict((await conn.execute(query)).all()))
    violations = [str(v) for v in report.violations]
    return Observed(result.status, sinks, Counter(result.outcomes), recorded, violations)


async def run_in_tmp(chain: Chain, rows: list[Row], buffer: int) -> Observed:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        return await run_pipeline(
            chain, rows, out, f"sqlite+aiosqlite:///{out / 'audit.db'}", buffer
        )


def _read_jsonl(path: Path) -> list[Row]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- comparing ---------------------------------------------------------------------------


@dataclass
class Untold:
    """Rows of failures whose ``_error`` text the model does not predict: a failed join's
    (it says how the failure was noticed, e.g. ``late_arrival``, which depends on timing)
    and a ``group_by: g`` on a row without ``g`` (the expression engine's wording)."""

    coalesces: set[str] = field(default_factory=set)
    grouped_by_g: set[str] = field(default_factory=set)

    def add(self, chain: Chain) -> Untold:
        for segment in chain:
            if isinstance(segment, Batch) and segment.group_by == "g":
                self.grouped_by_g.add(segment.name)
            elif isinstance(segment, Join):
                self.coalesces.add(segment.coalesce)
                for _, branch in segment.branches:
                    self.add(branch)
        return self

    def __contains__(self, row: Row) -> bool:
        node = row.get("_error_node")
        return node in self.coalesces or (node in self.grouped_by_g and "g" not in row)


def _normal(value: Any) -> Any:
    if isinstance(value, list):
        return [_normal(item) for item in value]
    if not isinstance(value, dict):
        return value
    normal = {key: _normal(item) for key, item in value.items()}
    if isinstance(normal.get(ANY_ORDER), list):
        normal[ANY_ORDER] = sorted(normal[ANY_ORDER], key=_canonical)
    return normal


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def contents(sinks: dict[str, list[Row]], untold: Untold) -> dict[str, list[str]]:
    """Each sink's rows as a sorted list of canonical JSON (a multiset)."""
    result = {}
    for name, rows in sinks.items():
        lines = []
        for row in rows:
            row = dict(row)
            if row in untold:
                row.pop("_error", None)
            lines.append(_canonical(_normal(row)))
        result[name] = sorted(lines)
    return result


def assert_agrees(chain: Chain, rows: list[Row], observed: Observed) -> None:
    expected = Model().run(chain, rows)
    untold = Untold().add(chain)
    assert observed.violations == []
    assert observed.status == "completed"
    for row in observed.sinks[ERRORS]:
        assert row["_error"]
        assert isinstance(row["_error"], str)
    assert contents(observed.sinks, untold) == contents(expected.sinks, untold)
    assert observed.recorded == expected.outcomes
    assert observed.counted == expected.outcomes


# -- the tests ---------------------------------------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(chain=pipelines(), rows=source_rows(), buffer=st.sampled_from([1, 4, 64]))
def test_random_joins_and_batches_agree_with_a_sequential_model(
    chain: Chain, rows: list[Row], buffer: int
) -> None:
    observed = anyio.run(run_in_tmp, chain, rows, buffer)
    assert_agrees(chain, rows, observed)


#: Rows failing early, a gate losing a branch (require_all fails), a nested best-effort
#: join, a union conflict resolved by ``prefer``, then one batch per group at end of input.
NESTED: Chain = (
    Step("t1", "a", 1, fail=frozenset({3}), delays_ms=(0, 1, 0, 2), concurrency=3, ordered=False),
    Join(
        "f2",
        "j2",
        branches=(
            ("f2x", (Route("r3", 4, 1, SIDE), Step("t4", "a", "1", delays_ms=(2, 0, 0, 1)))),
            (
                "f2y",
                (
                    Join(
                        "f5",
                        "j5",
                        branches=(("f5x", (Step("t6", "b", 0, fail=frozenset({5})),)), ("f5y", ())),
                        policy="best_effort",
                        merge="nested",
                    ),
                ),
            ),
            ("f2z", ()),
        ),
        prefer="f2x",
        on_error=ERRORS,
    ),
    Batch("a7", group_by="row.get('g', -1)", list_field=ANY_ORDER),
)


async def test_a_nested_join_feeding_a_grouped_batch_agrees_with_the_model(
    landscape_url: str, tmp_path: Path
) -> None:
    rows = [_source_row(i, i % 3 - 1, None if i == 7 else i % 2) for i in range(12)]
    observed = await run_pipeline(NESTED, rows, tmp_path, landscape_url, buffer=2)
    assert_agrees(NESTED, rows, observed)
    assert observed.recorded["coalesced"] > 0
    assert observed.sinks[SIDE]
    assert observed.sinks[ERRORS]
