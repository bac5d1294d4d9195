"""Coalesce joins: each policy and merge strategy, on arrival, on time-outs and on lost
branches, with the sink contents and the whole audit trail of every run checked.

Timeouts run on a :class:`ManualClock`; branch order is made exact by transforms that
hold their rows until the test releases them.  One test runs on the real clock.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import select

from engine import ConfigError, ManualClock, Pipeline, RunResult
from landscape import Landscape
from landscape import _schema as t
from plugins import (
    Artifact,
    Discard,
    PluginSetup,
    Row,
    RowContext,
    Sink,
    SinkItem,
    SinkRejection,
    Transform,
    TransformResult,
)

Config = dict[str, Any]
Driver = Callable[[Pipeline], Awaitable[None]]

BRANCHES = ("a", "b", "c")
TIMEOUT = 5.0

# -- plugins the tests steer -------------------------------------------------------------


class Hold(Transform):
    """Tags each row ``{branch: f"{branch}{id}"}``, but only once :meth:`release` is called.

    A row whose ``lose`` maps this branch to ``discard`` or ``error`` is discarded or
    fails here instead.  The test learns how many rows went through from
    :meth:`wait_passed`; a row counted there is in the next node's inbox by the time the
    waiting test runs again (the node sends it on without yielding).
    """

    def __init__(self, branch: str, *, held: bool = True) -> None:
        super().__init__({}, PluginSetup(node_name=f"hold_{branch}"))
        self.branch = branch
        self.passed = 0
        self._open = anyio.Event()
        self._progress = anyio.Event()
        if not held:
            self._open.set()

    def release(self) -> None:
        self._open.set()

    async def wait_passed(self, count: int) -> None:
        while self.passed < count:
            await self._progress.wait()

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        await self._open.wait()
        self.passed += 1
        self._progress.set()
        self._progress = anyio.Event()
        lose = row.get("lose", {}).get(self.branch)
        if lose == "discard":
            return Discard(f"{self.branch} drops row {row['id']}")
        if lose == "error":
            raise ValueError(f"{self.branch} fails row {row['id']}")
        return {**row, self.branch: f"{self.branch}{row['id']}"}


class Memory(Sink):
    """Keeps what it is given; :meth:`wait_rows` waits until it holds that many rows."""

    def __init__(self, name: str) -> None:
        super().__init__({}, PluginSetup(node_name=name))
        self.node_name = name
        self.items: list[SinkItem] = []
        self._progress = anyio.Event()

    @property
    def rows(self) -> list[Row]:
        return [item.row for item in self.items]

    async def wait_rows(self, count: int) -> None:
        while len(self.items) < count:
            await self._progress.wait()

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        self.items.extend(items)
        self._progress.set()
        self._progress = anyio.Event()
        return []

    def artifact(self) -> Artifact:
        content = json.dumps(self.rows, sort_keys=True).encode()
        return Artifact(
            uri=f"memory:{self.node_name}",
            content_hash=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content),
            rows_written=len(self.items),
        )


async def rows_until(rows: Iterable[Row], done: anyio.Event) -> AsyncIterator[Row]:
    """A source that yields ``rows`` and then stays idle until ``done`` is set."""
    for row in rows:
        yield row
    await done.wait()


# -- pipelines ---------------------------------------------------------------------------


def sink(memory: Memory) -> Config:
    return {"name": memory.node_name, "plugin": memory, "flush_interval_ms": 0}


def join_config(rows: Any, holds: Mapping[str, Hold], out: Memory, **coalesce: Any) -> Config:
    """source -> fork ``split`` into one :class:`Hold` per branch -> coalesce ``join`` -> out."""
    return {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "gates": [{"name": "split", "input": "raw", "fork_to": {b: f"{b}_in" for b in holds}}],
        "transforms": [
            {"name": f"hold_{b}", "plugin": hold, "input": f"{b}_in", "on_success": f"{b}_out"}
            for b, hold in holds.items()
        ],
        "coalesce": [
            {
                "name": "join",
                "branches": {b: f"{b}_out" for b in holds},
                "on_success": out.node_name,
                **coalesce,
            }
        ],
        "sinks": [sink(out)],
    }


def steer_branch_b(config: Config, side: Memory) -> None:
    """Put a gate at the end of branch ``b`` that sends a row by its ``steer`` field on to
    the join (``keep``, the default), to the ``side`` sink or to ``discard``."""
    config["transforms"][1]["on_success"] = "b_mid"
    config["gates"].append(
        {
            "name": "steer_b",
            "input": "b_mid",
            "condition": "row.get('steer', 'keep')",
            "routes": {"keep": "b_out", "side": side.node_name, "drop": "discard"},
        }
    )
    config["sinks"].append(sink(side))


def holds(*branches: str, held: bool = True) -> dict[str, Hold]:
    return {b: Hold(b, held=held) for b in branches}


def node_outcomes(pipeline: Pipeline, node: str) -> dict[str, int]:
    """The outcomes recorded at ``node`` so far in the running pipeline."""
    stats = pipeline.statistics()
    assert stats is not None
    return next(dict(n.outcomes) for n in stats.nodes if n.node_id == node)


async def settle() -> None:
    """Let every task of the run go as far as it can."""
    await anyio.wait_all_tasks_blocked()


# -- reading the audit trail -------------------------------------------------------------


@dataclass
class Tok:
    """One token as the Landscape recorded it."""

    token_id: str
    row_index: int
    branch: str | None
    parents: list[str] = field(default_factory=list)
    outcome: str | None = None
    sink: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    #: node id -> {"status", "error", "context"} of the token's visit there
    states: dict[str, dict[str, Any]] = field(default_factory=dict)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass
class Trail:
    """A finished run's tokens with their parents, terminal outcome and node states."""

    result: RunResult
    tokens: dict[str, Tok]

    @classmethod
    async def load(cls, url: str, result: RunResult) -> Trail:
        run = result.run_id
        async with Landscape.connect(url) as landscape:
            report = await landscape.verify(run)
            assert report.ok, [str(v) for v in report.violations]
            async with landscape.engine.connect() as conn:
                tokens = await conn.execute(
                    select(t.tokens.c.token_id, t.tokens.c.branch_name, t.rows.c.row_index)
                    .join(t.rows, t.rows.c.row_id == t.tokens.c.row_id)
                    .where(t.tokens.c.run_id == run)
                )
                parents = await conn.execute(
                    select(t.token_parents)
                    .where(t.token_parents.c.run_id == run)
                    .order_by(t.token_parents.c.token_id, t.token_parents.c.ordinal)
                )
                outcomes = await conn.execute(
                    select(t.token_outcomes).where(
                        t.token_outcomes.c.run_id == run, t.token_outcomes.c.is_terminal
                    )
                )
                states = await conn.execute(
                    select(t.node_states).where(t.node_states.c.run_id == run)
                )
                trail = cls(
                    result,
                    {r.token_id: Tok(r.token_id, r.row_index, r.branch_name) for r in tokens.all()},
                )
                for p in parents.mappings():
                    trail.tokens[p["token_id"]].parents.append(p["parent_token_id"])
                for o in outcomes.mappings():
                    tok = trail.tokens[o["token_id"]]
                    assert tok.outcome is None, f"two terminal outcomes for {tok.token_id}"
                    tok.outcome, tok.sink = o["outcome"], o["sink_name"]
                    tok.context = _loads(o["context_json"]) or {}
                for s in states.mappings():
                    tok = trail.tokens[s["token_id"]]
                    assert s["status"] != "open", f"open node state {s['state_id']}"
                    assert s["node_id"] not in tok.states, f"{tok.token_id} twice at {s['node_id']}"
                    tok.states[s["node_id"]] = {
                        "status": s["status"],
                        "error": _loads(s["error_json"]),
                        "context": _loads(s["context_json"]) or {},
                    }
        return trail

    def root(self, row_index: int) -> Tok:
        (tok,) = [x for x in self.tokens.values() if x.row_index == row_index and not x.parents]
        return tok

    def forked(self, tok: Tok) -> dict[str, Tok]:
        """The branch tokens ``tok`` was forked into, by branch."""
        assert tok.outcome == "forked", tok
        children = [x for x in self.tokens.values() if x.parents == [tok.token_id]]
        assert sorted(tok.context["children"]) == sorted(c.token_id for c in children)
        by_branch = {c.branch: c for c in children}
        assert None not in by_branch
        return by_branch  # type: ignore[return-value]

    def joined_into(self, tok: Tok, node: str = "join") -> Tok:
        """The output token of the join ``tok`` was coalesced into (checked both ways)."""
        assert tok.outcome == "coalesced", tok
        out = self.tokens[tok.context["joined_into"]]
        assert tok.context == {"node": node, "joined_into": out.token_id, "branch": tok.branch}
        assert tok.token_id in out.parents
        state = tok.states[node]
        assert state["status"] == "completed"
        assert state["context"]["joined_into"] == out.token_id
        return out


def assert_failed_at_join(
    tok: Tok,
    reason: str,
    arrived: list[str],
    missing: list[str],
    *,
    node: str = "join",
    **rest: Any,
) -> dict[str, Any]:
    """``tok`` ended ``failed`` at the coalesce with a complete failure context; returns
    the recorded error."""
    assert tok.outcome == "failed", tok
    context = tok.context
    assert context["node"] == node
    assert context["coalesce"] == node
    assert context["reason"] == reason, context
    # arrived_branches may list the branches in their order of arrival
    assert sorted(context["arrived_branches"]) == sorted(arrived), context
    assert context["missing_branches"] == missing, context
    for key, value in rest.items():
        assert context[key] == value, (key, context)
    error = context["error"]
    assert error["type"] == "CoalesceError"
    assert error["message"]
    state = tok.states[node]
    assert state["status"] == "failed"
    assert state["error"] == error
    assert state["context"]["reason"] == reason
    assert state["context"]["missing_branches"] == missing
    return dict(error)


@pytest.fixture
def run_join(sqlite_url: str, tmp_path: Path) -> Callable[..., Awaitable[Trail]]:
    """``await run_join(config, driver=..., clock=...)`` runs a pipeline while ``driver``
    steers it, then checks (``verify``, no open state) and returns its audit trail."""

    async def run(
        config: Config,
        *,
        driver: Driver | None = None,
        clock: ManualClock | None = None,
        url: str | None = None,
    ) -> Trail:
        url = url or sqlite_url
        # The drivers steer the run step by step: a node must send on what it released
        # without yielding, whatever the machine's speed (no time slices).
        config.setdefault("runtime", {})["time_slice_ms"] = 0
        pipeline = Pipeline.from_dict(config, base_dir=tmp_path, landscape_url=url, clock=clock)
        results: list[RunResult] = []

        async def run_pipeline() -> None:
            results.append(await pipeline.run())

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_pipeline)
                if driver is not None:
                    await driver(pipeline)
        (result,) = results
        assert result.status == "completed"
        return await Trail.load(url, result)

    return run


Run = Callable[..., Awaitable[Trail]]

# -- 1. every policy x every merge, all arriving or one timing out -----------------------

POLICIES: dict[str, dict[str, Any]] = {
    "require_all": {},
    "quorum": {"quorum": 2},
    "best_effort": {},
    "first": {},
}
MERGES: dict[str, dict[str, Any]] = {
    "union": {},
    "nested": {},
    "select": {"select_branch": "b"},
}


@dataclass(frozen=True)
class Join:
    """How a row's join ends: the branches in it when it resolved, those arriving after,
    and the failure reason (``None``: it succeeded)."""

    arrived: tuple[str, ...]
    late: tuple[str, ...] = ()
    failure: str | None = None

    @property
    def missing(self) -> list[str]:
        return [b for b in BRANCHES if b not in self.arrived]


#: Branches arrive a, b, c in that order, each before the next is let go.
ALL_ARRIVE = {
    "require_all": Join(("a", "b", "c")),
    "quorum": Join(("a", "b"), late=("c",)),
    "best_effort": Join(("a", "b", "c")),
    "first": Join(("a",), late=("b", "c")),
}
#: a and b arrive, the join's timeout passes, then c arrives.
C_TIMES_OUT = {
    "require_all": Join(("a", "b"), late=("c",), failure="timeout"),
    "quorum": Join(("a", "b"), late=("c",)),
    "best_effort": Join(("a", "b"), late=("c",)),
    "first": Join(("a",), late=("b", "c")),
}


def expected_join(table: Mapping[str, Join], policy: str, merge: str) -> Join:
    join = table[policy]
    select_branch = MERGES[merge].get("select_branch")
    if join.failure is None and select_branch is not None and select_branch not in join.arrived:
        return replace(join, failure="merge_failed")
    return join


def branch_row(branch: str, i: int) -> Row:
    return {"id": i, branch: f"{branch}{i}"}


def merged_row(merge: str, branches: Sequence[str], i: int) -> Row:
    if merge == "union":
        return {"id": i, **{b: f"{b}{i}" for b in branches}}
    if merge == "nested":
        return {b: branch_row(b, i) for b in branches}
    return branch_row(MERGES[merge]["select_branch"], i)


def expected_outcomes(join: Join, policy: str, rows: int) -> Counter[str]:
    per_row: Counter[str] = Counter(forked=1)
    if join.failure is None:
        per_row.update(coalesced=len(join.arrived), completed=1)
        per_row.update({"coalesced" if policy == "first" else "failed": len(join.late)})
    else:
        per_row.update(failed=len(join.arrived) + len(join.late))
    return Counter({k: v * rows for k, v in per_row.items() if v})


def assert_names_the_join(context: Mapping[str, Any], arrived: Iterable[str]) -> None:
    """A straggler's context: whichever way it counts the straggler itself, it never
    calls a branch that was in the join missing."""
    assert set(arrived) <= set(context["arrived_branches"]), context
    assert set(arrived).isdisjoint(context["missing_branches"]), context


def assert_join(trail: Trail, row_index: int, join: Join, policy: str, merge: str) -> None:
    """Row ``row_index`` was forked into a, b, c and its join ended as ``join`` says."""
    kids = trail.forked(trail.root(row_index))
    assert sorted(kids) == list(BRANCHES)
    settings = {"coalesce": "join", "policy": policy, "merge": merge}
    if join.failure is None:
        out = trail.joined_into(kids[join.arrived[0]])
        for b in join.arrived:
            assert trail.joined_into(kids[b]) is out
        straggled = list(join.late) if policy == "first" else []
        assert out.parents == [kids[b].token_id for b in [*join.arrived, *straggled]]
        assert out.branch is None
        assert (out.outcome, out.sink) == ("completed", "out")
        state = out.states["join"]
        assert state["status"] == "completed"
        assert state["context"] == {
            **settings,
            "arrived_branches": list(join.arrived),
            "missing_branches": join.missing,
        }
    else:
        for b in join.arrived:
            assert_failed_at_join(
                kids[b], join.failure, list(join.arrived), join.missing, policy=policy, merge=merge
            )
        kid_ids = {k.token_id for k in kids.values()}
        assert not [x for x in trail.tokens.values() if kid_ids & set(x.parents)]
    for b in join.late:
        late = kids[b]
        if policy == "first" and join.failure is None:
            assert trail.joined_into(late) is trail.joined_into(kids[join.arrived[0]])
        else:
            assert late.outcome == "failed", late
            assert late.context["reason"] == "late_arrival"
            assert late.context["coalesce"] == "join"
            assert late.context["policy"] == policy
            assert_names_the_join(late.context, join.arrived)
            assert late.states["join"]["status"] == "failed"


ROWS = [{"id": 0}, {"id": 1}]

matrix = pytest.mark.parametrize(("policy", "merge"), [(p, m) for p in POLICIES for m in MERGES])


@matrix
async def test_every_policy_and_merge_when_all_branches_arrive(
    run_join: Run, policy: str, merge: str
) -> None:
    hold = holds(*BRANCHES)
    out = Memory("out")
    config = join_config(ROWS, hold, out, policy=policy, merge=merge, **POLICIES[policy])
    config["coalesce"][0].update(MERGES[merge])

    resolved: list[bool] = []

    async def arrive_in_order(pipeline: Pipeline) -> None:
        for branch in BRANCHES:
            hold[branch].release()
            await hold[branch].wait_passed(len(ROWS))
            await settle()
            resolved.append(bool(node_outcomes(pipeline, "join")))

    trail = await run_join(config, driver=arrive_in_order)
    join = expected_join(ALL_ARRIVE, policy, merge)
    # each join is decided by the arrival of its last joined branch, not later
    assert resolved == [i >= len(join.arrived) - 1 for i in range(len(BRANCHES))]
    expected = [] if join.failure else [merged_row(merge, join.arrived, r["id"]) for r in ROWS]
    assert sorted(out.rows, key=json.dumps) == sorted(expected, key=json.dumps)
    assert trail.result.outcomes == expected_outcomes(join, policy, len(ROWS))
    for i in range(len(ROWS)):
        assert_join(trail, i, join, policy, merge)


@matrix
async def test_every_policy_and_merge_when_a_branch_misses_the_timeout(
    run_join: Run, policy: str, merge: str
) -> None:
    clock = ManualClock()
    hold = holds(*BRANCHES)
    out = Memory("out")
    config = join_config(
        ROWS, hold, out, policy=policy, merge=merge, timeout_seconds=TIMEOUT, **POLICIES[policy]
    )
    config["coalesce"][0].update(MERGES[merge])
    join = expected_join(C_TIMES_OUT, policy, merge)
    seen: dict[str, tuple[dict[str, int], int]] = {}

    async def c_comes_after_the_timeout(pipeline: Pipeline) -> None:
        for branch in ("a", "b"):
            hold[branch].release()
            await hold[branch].wait_passed(len(ROWS))
        await settle()
        clock.advance(TIMEOUT - 1)
        await settle()
        seen["before"] = node_outcomes(pipeline, "join"), len(out.items)
        clock.advance(1)
        await settle()
        seen["after"] = node_outcomes(pipeline, "join"), len(out.items)
        hold["c"].release()

    trail = await run_join(config, driver=c_comes_after_the_timeout, clock=clock)
    expected = [] if join.failure else [merged_row(merge, join.arrived, r["id"]) for r in ROWS]
    assert sorted(out.rows, key=json.dumps) == sorted(expected, key=json.dumps)
    assert trail.result.outcomes == expected_outcomes(join, policy, len(ROWS))
    for i in range(len(ROWS)):
        assert_join(trail, i, join, policy, merge)
    if policy in ("require_all", "best_effort"):
        # nothing is decided one second before the deadline; all of it at the deadline
        assert seen["before"] == ({}, 0)
        joined = len(join.arrived) * len(ROWS)
        at_deadline = {"failed": joined} if join.failure else {"coalesced": joined}
        assert seen["after"] == (at_deadline, 0 if join.failure else len(ROWS))
    else:
        # decided as the branches arrived: the deadline changes nothing
        assert seen["before"] == seen["after"]
        assert seen["before"][0]


@pytest.mark.parametrize("policy", ["quorum", "best_effort", "first"])
async def test_select_of_a_branch_that_missed_the_join_fails_without_fallback(
    run_join: Run, policy: str
) -> None:
    clock = ManualClock()
    hold = holds(*BRANCHES)
    out = Memory("out")
    config = join_config(
        ROWS,
        hold,
        out,
        policy=policy,
        merge="select",
        select_branch="c",
        timeout_seconds=TIMEOUT,
        **POLICIES[policy],
    )

    async def c_comes_after_the_timeout(pipeline: Pipeline) -> None:
        for branch in ("a", "b"):
            hold[branch].release()
            await hold[branch].wait_passed(len(ROWS))
        await settle()
        clock.advance(TIMEOUT)
        await settle()
        hold["c"].release()

    trail = await run_join(config, driver=c_comes_after_the_timeout, clock=clock)
    assert out.rows == []
    arrived = ("a",) if policy == "first" else ("a", "b")
    join = Join(
        arrived, late=tuple(b for b in BRANCHES if b not in arrived), failure="merge_failed"
    )
    for i in range(len(ROWS)):
        assert_join(trail, i, join, policy, "select")
        kids = trail.forked(trail.root(i))
        error = kids["a"].context["error"]
        assert error["select_branch"] == "c"
        assert "'c'" in error["message"]


async def test_quorum_not_reached_by_the_timeout_fails_what_arrived(run_join: Run) -> None:
    clock = ManualClock()
    hold = holds(*BRANCHES)
    out = Memory("out")
    config = join_config(
        ROWS, hold, out, policy="quorum", quorum=2, merge="union", timeout_seconds=TIMEOUT
    )

    async def only_a_in_time(pipeline: Pipeline) -> None:
        hold["a"].release()
        await hold["a"].wait_passed(len(ROWS))
        await settle()
        clock.advance(TIMEOUT)
        await settle()
        assert node_outcomes(pipeline, "join") == {"failed": len(ROWS)}
        hold["b"].release()
        hold["c"].release()

    trail = await run_join(config, driver=only_a_in_time, clock=clock)
    assert out.rows == []
    for i in range(len(ROWS)):
        assert_join(trail, i, Join(("a",), late=("b", "c"), failure="timeout"), "quorum", "union")


def join_in_flight(pipeline: Pipeline) -> int:
    stats = pipeline.statistics()
    assert stats is not None
    return next(n.in_flight for n in stats.nodes if n.node_id == "join")


async def test_in_flight_counts_pending_joins_until_they_time_out(run_join: Run) -> None:
    clock = ManualClock()
    hold = holds("a", "b")
    config = join_config(ROWS, hold, Memory("out"), timeout_seconds=TIMEOUT)
    seen: list[int] = []

    async def b_comes_after_the_timeout(pipeline: Pipeline) -> None:
        hold["a"].release()
        await hold["a"].wait_passed(len(ROWS))
        await settle()
        seen.append(join_in_flight(pipeline))
        clock.advance(TIMEOUT)
        await settle()
        seen.append(join_in_flight(pipeline))
        hold["b"].release()

    await run_join(config, driver=b_comes_after_the_timeout, clock=clock)
    assert seen == [len(ROWS), 0]


# -- 2. a branch that ends elsewhere decides its join at once ----------------------------

LOSSES: dict[str, Row] = {
    "routed to a sink": {"steer": "side"},
    "discarded by a gate": {"steer": "drop"},
    "discarded by a transform": {"lose": {"b": "discard"}},
    "failed in a transform": {"lose": {"b": "error"}},
}
LOST_OUTCOME = {
    "routed to a sink": ("routed", "side"),
    "discarded by a gate": ("discarded", None),
    "discarded by a transform": ("discarded", None),
    "failed in a transform": ("failed", None),
}


def lossy_join(
    loss: str, policy: str, source_done: anyio.Event
) -> tuple[Config, dict[str, Hold], Memory]:
    """One row forked into a, b, c whose branch b ends by ``loss``; the source then idles."""
    out = Memory("out")
    hold = holds(*BRANCHES)
    rows = [{"id": 0, **LOSSES[loss]}]
    config = join_config(rows_until(rows, source_done), hold, out, policy=policy, merge="union")
    steer_branch_b(config, Memory("side"))
    return config, hold, out


def assert_lost_b(trail: Trail, loss: str) -> Tok:
    kids = trail.forked(trail.root(0))
    lost = kids["b"]
    assert (lost.outcome, lost.sink) == LOST_OUTCOME[loss]
    assert "join" not in lost.states
    return lost


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("policy", ["require_all", "best_effort"])
async def test_a_branch_ending_elsewhere_resolves_the_join_at_once(
    run_join: Run, loss: str, policy: str
) -> None:
    source_done = anyio.Event()
    config, hold, out = lossy_join(loss, policy, source_done)
    seen: dict[str, int] = {}

    async def lose_b_after_a_and_c_arrived(pipeline: Pipeline) -> None:
        for branch in ("a", "c", "b"):
            hold[branch].release()
            await hold[branch].wait_passed(1)
            await settle()
        # no timeout is configured and the source is still open: only b's loss decides
        seen.update(node_outcomes(pipeline, "join"))
        source_done.set()

    trail = await run_join(config, driver=lose_b_after_a_and_c_arrived)
    assert_lost_b(trail, loss)
    kids = trail.forked(trail.root(0))
    if policy == "require_all":
        assert seen == {"failed": 2}
        assert out.rows == []
        for b in ("a", "c"):
            assert_failed_at_join(kids[b], "missing_branches", ["a", "c"], ["b"], policy=policy)
    else:
        assert seen == {"coalesced": 2}
        assert out.rows == [{"id": 0, **LOSSES[loss], "a": "a0", "c": "c0"}]
        joined = trail.joined_into(kids["a"])
        assert joined.parents == [kids["a"].token_id, kids["c"].token_id]
        assert joined.states["join"]["context"]["missing_branches"] == ["b"]


@pytest.mark.parametrize("policy", ["require_all", "best_effort"])
async def test_a_branch_lost_before_any_sibling_arrived_still_decides_by_policy(
    run_join: Run, policy: str
) -> None:
    source_done = anyio.Event()
    config, hold, out = lossy_join("failed in a transform", policy, source_done)
    seen: dict[str, int] = {}

    async def lose_b_first(pipeline: Pipeline) -> None:
        for branch in ("b", "a", "c"):
            hold[branch].release()
            await hold[branch].wait_passed(1)
            await settle()
        seen.update(node_outcomes(pipeline, "join"))
        source_done.set()

    trail = await run_join(config, driver=lose_b_first)
    assert_lost_b(trail, "failed in a transform")
    kids = trail.forked(trail.root(0))
    if policy == "require_all":
        assert seen == {"failed": 2}
        assert out.rows == []
        for b in ("a", "c"):
            context = kids[b].context
            assert kids[b].outcome == "failed"
            assert context["coalesce"] == "join"
            assert context["reason"] == "missing_branches", context
            assert "b" in context["missing_branches"], context
            assert b not in context["missing_branches"], context
    else:
        assert seen == {"coalesced": 2}
        assert out.rows == [{"id": 0, "lose": {"b": "error"}, "a": "a0", "c": "c0"}]
        joined = trail.joined_into(kids["a"])
        assert joined.parents == [kids["a"].token_id, kids["c"].token_id]


async def test_quorum_that_lost_too_many_branches_fails_at_once(run_join: Run) -> None:
    source_done = anyio.Event()
    out = Memory("out")
    hold = holds(*BRANCHES)
    rows = [{"id": 0, "lose": {"b": "error", "c": "discard"}}]
    config = join_config(rows_until(rows, source_done), hold, out, policy="quorum", quorum=2)

    async def lose_b_and_c(pipeline: Pipeline) -> None:
        for branch in ("a", "b", "c"):
            hold[branch].release()
            await hold[branch].wait_passed(1)
            await settle()
        assert node_outcomes(pipeline, "join") == {"failed": 1}
        source_done.set()

    trail = await run_join(config, driver=lose_b_and_c)
    assert out.rows == []
    kids = trail.forked(trail.root(0))
    assert_failed_at_join(kids["a"], "quorum_not_met", ["a"], ["b", "c"], policy="quorum")
    assert (kids["b"].outcome, kids["c"].outcome) == ("failed", "discarded")


async def test_a_lost_branch_with_policy_first_does_not_stop_the_first_arrival(
    run_join: Run,
) -> None:
    source_done = anyio.Event()
    config, hold, out = lossy_join("discarded by a transform", "first", source_done)

    async def lose_b_then_a_and_c_arrive(pipeline: Pipeline) -> None:
        for branch in ("b", "a", "c"):
            hold[branch].release()
            await hold[branch].wait_passed(1)
            await settle()
        source_done.set()

    trail = await run_join(config, driver=lose_b_then_a_and_c_arrive)
    assert out.rows == [{"id": 0, "lose": {"b": "discard"}, "a": "a0"}]
    kids = trail.forked(trail.root(0))
    joined = trail.joined_into(kids["a"])
    assert trail.joined_into(kids["c"]) is joined
    assert joined.parents == [kids["a"].token_id, kids["c"].token_id]
    assert_lost_b(trail, "discarded by a transform")


# -- 3. union conflicts ------------------------------------------------------------------


def constants_join(values: Mapping[str, Mapping[str, Any]], out: Memory, **coalesce: Any) -> Config:
    """Each branch adds its ``values`` (field_map constants); all arrive at once."""
    return {
        "source": {"plugin": "memory", "options": {"rows": [{"id": 7}]}, "on_success": "raw"},
        "gates": [{"name": "split", "input": "raw", "fork_to": {b: f"{b}_in" for b in values}}],
        "transforms": [
            {
                "name": f"set_{b}",
                "plugin": "field_map",
                "input": f"{b}_in",
                "on_success": f"{b}_out",
                "options": {"constants": dict(fields)},
            }
            for b, fields in values.items()
        ],
        "coalesce": [
            {
                "name": "join",
                "branches": {b: f"{b}_out" for b in values},
                "on_success": "out",
                "merge": "union",
                **coalesce,
            }
        ],
        "sinks": [sink(out)],
    }


@pytest.mark.parametrize(
    ("a", "b"), [(1, 2), (1, 1.0), ("x", None)], ids=["values", "types", "null"]
)
async def test_union_conflict_fails_the_join_with_both_values(
    run_join: Run, a: Any, b: Any
) -> None:
    out = Memory("out")
    trail = await run_join(constants_join({"a": {"score": a}, "b": {"score": b}}, out))
    assert out.rows == []
    kids = trail.forked(trail.root(0))
    for branch in ("a", "b"):
        error = assert_failed_at_join(
            kids[branch], "merge_failed", ["a", "b"], [], policy="require_all", merge="union"
        )
        assert error["conflicts"] == {"score": {"a": a, "b": b}}
        assert "score" in error["message"]
        assert [type(v) for v in error["conflicts"]["score"].values()] == [type(a), type(b)]


@pytest.mark.parametrize("prefer", ["a", "b"])
async def test_prefer_resolves_a_union_conflict(run_join: Run, prefer: str) -> None:
    out = Memory("out")
    values = {"a": {"score": 1, "from_a": True}, "b": {"score": 2, "from_b": True}}
    trail = await run_join(constants_join(values, out, prefer=prefer))
    score = values[prefer]["score"]
    assert out.rows == [{"id": 7, "score": score, "from_a": True, "from_b": True}]
    kids = trail.forked(trail.root(0))
    joined = trail.joined_into(kids["a"])
    assert joined.parents == [kids["a"].token_id, kids["b"].token_id]
    assert joined.outcome == "completed"


async def test_prefer_of_a_branch_without_the_field_leaves_the_conflict(run_join: Run) -> None:
    out = Memory("out")
    values = {"a": {"score": 1}, "b": {"score": 2}, "c": {"other": 3}}
    trail = await run_join(constants_join(values, out, prefer="c"))
    assert out.rows == []
    kids = trail.forked(trail.root(0))
    error = assert_failed_at_join(kids["c"], "merge_failed", ["a", "b", "c"], [])
    assert error["conflicts"] == {"score": {"a": 1, "b": 2}}


async def test_equal_values_in_two_branches_are_no_conflict(run_join: Run) -> None:
    out = Memory("out")
    await run_join(constants_join({"a": {"score": 1, "x": 1}, "b": {"score": 1, "y": 2}}, out))
    assert out.rows == [{"id": 7, "score": 1, "x": 1, "y": 2}]


# -- 4. on_error: failed joins go to the error sink --------------------------------------


async def test_on_error_sends_timed_out_and_late_tokens_to_the_error_sink(
    run_join: Run, landscape_url: str
) -> None:
    clock = ManualClock()
    hold = holds("a", "b")
    out, errors = Memory("out"), Memory("errors")
    config = join_config(
        ROWS, hold, out, policy="require_all", timeout_seconds=TIMEOUT, on_error="errors"
    )
    config["sinks"].append(sink(errors))

    async def b_comes_after_the_timeout(pipeline: Pipeline) -> None:
        hold["a"].release()
        await hold["a"].wait_passed(len(ROWS))
        await settle()
        clock.advance(TIMEOUT)
        await errors.wait_rows(len(ROWS))
        hold["b"].release()

    trail = await run_join(config, driver=b_comes_after_the_timeout, clock=clock, url=landscape_url)
    assert out.rows == []
    assert trail.result.outcomes == {"forked": 2, "quarantined": 4}
    by_token = {item.token_id: item.row for item in errors.items}
    for i in range(len(ROWS)):
        kids = trail.forked(trail.root(i))
        for branch, reason in (("a", "timeout"), ("b", "late_arrival")):
            tok = kids[branch]
            assert (tok.outcome, tok.sink) == ("quarantined", "errors")
            assert tok.context["error"]["type"] == "CoalesceError"
            row = by_token[tok.token_id]
            assert row["_error_node"] == "join"
            assert row["_error"] == tok.context["error"]["message"]
            assert {k: v for k, v in row.items() if not k.startswith("_")} == branch_row(branch, i)
            state = tok.states["join"]
            assert state["status"] == "failed"
            assert state["context"]["reason"] == reason
            assert state["context"]["policy"] == "require_all"
            assert_names_the_join(state["context"], ["a"])
            if branch == "a":
                assert state["context"]["arrived_branches"] == ["a"]
                assert state["context"]["missing_branches"] == ["b"]
            assert tok.states["errors"]["status"] == "completed"
    async with Landscape.connect(landscape_url) as landscape, landscape.engine.connect() as conn:
        events = (
            await conn.execute(
                select(t.routing_events.c.edge_id).where(
                    t.routing_events.c.run_id == trail.result.run_id,
                    t.routing_events.c.route_label == "error",
                )
            )
        ).scalars()
        assert sorted(events) == ["join:error->errors"] * 4


async def test_on_error_takes_the_tokens_of_a_join_that_lost_a_branch(run_join: Run) -> None:
    source_done = anyio.Event()
    hold = holds("a", "b")
    out, errors = Memory("out"), Memory("errors")
    rows = [{"id": 0, "lose": {"b": "error"}}]
    config = join_config(rows_until(rows, source_done), hold, out, on_error="errors")
    config["sinks"].append(sink(errors))

    async def lose_b(pipeline: Pipeline) -> None:
        hold["a"].release()
        await hold["a"].wait_passed(1)
        await settle()
        hold["b"].release()
        await errors.wait_rows(1)
        source_done.set()

    trail = await run_join(config, driver=lose_b)
    kids = trail.forked(trail.root(0))
    assert (kids["a"].outcome, kids["a"].sink) == ("quarantined", "errors")
    assert kids["a"].states["join"]["context"]["reason"] == "missing_branches"
    assert kids["b"].outcome == "failed"  # failed in its transform, which has no on_error
    assert errors.rows == [
        {**rows[0], "a": "a0", "_error": errors.rows[0]["_error"], "_error_node": "join"}
    ]


# -- 5. nested and repeated forks --------------------------------------------------------


def nested_config(rows: Any, hold: Mapping[str, Hold], out: Memory, outer_policy: str) -> Config:
    """x/y fork; x forked again into x1/x2 and joined by ``inner``; ``outer`` joins x and y."""
    return {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "gates": [
            {"name": "outer_fork", "input": "raw", "fork_to": {"x": "x_in", "y": "y_in"}},
            {"name": "inner_fork", "input": "x_in", "fork_to": {"x1": "x1_in", "x2": "x2_in"}},
        ],
        "transforms": [
            {"name": f"hold_{b}", "plugin": hold[b], "input": f"{b}_in", "on_success": f"{b}_out"}
            for b in ("x1", "x2", "y")
        ],
        "coalesce": [
            {
                "name": "inner",
                "branches": {"x1": "x1_out", "x2": "x2_out"},
                "merge": "nested",
                "on_success": "x_out",
            },
            {
                "name": "outer",
                "branches": {"x": "x_out", "y": "y_out"},
                "merge": "nested",
                "policy": outer_policy,
                "on_success": "out",
            },
        ],
        "sinks": [sink(out)],
    }


async def test_a_nested_fork_is_joined_inside_then_outside(run_join: Run) -> None:
    out = Memory("out")
    rows = [{"id": i} for i in range(3)]
    trail = await run_join(
        nested_config(rows, holds("x1", "x2", "y", held=False), out, "require_all")
    )
    assert sorted(out.rows, key=lambda r: r["y"]["id"]) == [
        {"x": {"x1": branch_row("x1", i), "x2": branch_row("x2", i)}, "y": branch_row("y", i)}
        for i in range(3)
    ]
    assert trail.result.outcomes == {"forked": 6, "coalesced": 12, "completed": 3}
    for i in range(3):
        outer = trail.forked(trail.root(i))
        inner = trail.forked(outer["x"])
        x_joined = trail.joined_into(inner["x1"], "inner")
        assert trail.joined_into(inner["x2"], "inner") is x_joined
        assert x_joined.parents == [inner["x1"].token_id, inner["x2"].token_id]
        assert x_joined.branch == "x"
        assert x_joined.states["inner"]["status"] == "completed"
        final = trail.joined_into(x_joined, "outer")
        assert trail.joined_into(outer["y"], "outer") is final
        assert final.parents == [x_joined.token_id, outer["y"].token_id]
        assert final.branch is None
        assert (final.outcome, final.sink) == ("completed", "out")
        assert {tok.row_index for tok in (x_joined, final)} == {i}


@pytest.mark.parametrize("outer_policy", ["require_all", "best_effort"])
async def test_a_failed_inner_join_resolves_the_outer_join_at_once(
    run_join: Run, outer_policy: str
) -> None:
    source_done = anyio.Event()
    out = Memory("out")
    hold = holds("x1", "x2", "y")
    rows = [{"id": 0, "lose": {"x2": "error"}}]
    seen: dict[str, int] = {}

    async def x2_fails_last(pipeline: Pipeline) -> None:
        for branch in ("y", "x1", "x2"):
            hold[branch].release()
            await hold[branch].wait_passed(1)
            await settle()
        seen.update(node_outcomes(pipeline, "outer"))
        source_done.set()

    config = nested_config(rows_until(rows, source_done), hold, out, outer_policy)
    trail = await run_join(config, driver=x2_fails_last)
    outer = trail.forked(trail.root(0))
    inner = trail.forked(outer["x"])
    assert inner["x2"].outcome == "failed"
    assert inner["x2"].states["hold_x2"]["status"] == "failed"
    assert_failed_at_join(
        inner["x1"], "missing_branches", ["x1"], ["x2"], node="inner", policy="require_all"
    )
    if outer_policy == "require_all":
        assert seen == {"failed": 1}
        assert out.rows == []
        assert_failed_at_join(
            outer["y"], "missing_branches", ["y"], ["x"], node="outer", policy="require_all"
        )
    else:
        assert seen == {"coalesced": 1}
        assert out.rows == [{"y": {**rows[0], "y": "y0"}}]
        final = trail.joined_into(outer["y"], "outer")
        assert final.parents == [outer["y"].token_id]
        assert final.states["outer"]["context"]["missing_branches"] == ["x"]


async def test_a_row_forked_twice_in_sequence_is_joined_per_fork(run_join: Run) -> None:
    def tag(name: str, input_: str, output: str) -> Config:
        return {
            "name": name,
            "plugin": "field_map",
            "input": input_,
            "on_success": output,
            "options": {"constants": {name: True}},
        }

    out = Memory("out")
    rows = [{"id": i} for i in range(4)]
    config: Config = {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "gates": [
            {"name": "fork1", "input": "raw", "fork_to": {"p": "p1_in", "q": "q1_in"}},
            {"name": "fork2", "input": "mid", "fork_to": {"p": "p2_in", "q": "q2_in"}},
        ],
        "transforms": [
            tag("p1", "p1_in", "p1_out"),
            tag("q1", "q1_in", "q1_out"),
            tag("p2", "p2_in", "p2_out"),
            tag("q2", "q2_in", "q2_out"),
        ],
        "coalesce": [
            {"name": "join1", "branches": {"p": "p1_out", "q": "q1_out"}, "on_success": "mid"},
            {
                "name": "join2",
                "branches": {"p": "p2_out", "q": "q2_out"},
                "merge": "nested",
                "on_success": "out",
            },
        ],
        "sinks": [sink(out)],
    }
    trail = await run_join(config)
    first = {"p1": True, "q1": True}
    assert sorted(out.rows, key=lambda r: r["p"]["id"]) == [
        {"p": {"id": i, **first, "p2": True}, "q": {"id": i, **first, "q2": True}} for i in range(4)
    ]
    assert trail.result.outcomes == {"forked": 8, "coalesced": 16, "completed": 4}
    for i in range(4):
        once = trail.forked(trail.root(i))
        middle = trail.joined_into(once["p"], "join1")
        assert trail.joined_into(once["q"], "join1") is middle
        assert middle.branch is None
        twice = trail.forked(middle)
        final = trail.joined_into(twice["p"], "join2")
        assert trail.joined_into(twice["q"], "join2") is final
        assert final.parents == [twice["p"].token_id, twice["q"].token_id]
        assert (final.outcome, final.sink, final.row_index) == ("completed", "out", i)


# -- 6. the real clock -------------------------------------------------------------------


async def test_a_join_times_out_on_the_real_clock_while_the_source_is_idle(
    run_join: Run,
) -> None:
    source_done = anyio.Event()
    hold = {"a": Hold("a", held=False), "b": Hold("b")}
    out, errors = Memory("out"), Memory("errors")
    rows = [{"id": 0}]
    config = join_config(
        rows_until(rows, source_done), hold, out, timeout_seconds=0.2, on_error="errors"
    )
    config["sinks"].append(sink(errors))
    seen: dict[str, Any] = {}

    async def wait_for_the_timeout(pipeline: Pipeline) -> None:
        # b never comes and no other row is read: only the deadline can end the join
        await errors.wait_rows(1)
        stats = pipeline.statistics()
        assert stats is not None
        seen.update(rows_read=stats.rows_read, outcomes=dict(stats.outcomes))
        source_done.set()
        hold["b"].release()

    trail = await run_join(config, driver=wait_for_the_timeout)
    assert seen == {"rows_read": 1, "outcomes": {"forked": 1, "quarantined": 1}}
    kids = trail.forked(trail.root(0))
    assert kids["a"].states["join"]["context"]["reason"] == "timeout"
    assert kids["a"].states["join"]["context"]["missing_branches"] == ["b"]
    assert kids["b"].states["join"]["context"]["reason"] == "late_arrival"
    assert [item.token_id for item in errors.items] == [kids["a"].token_id, kids["b"].token_id]
    assert out.rows == []


# -- 7. configuration errors -------------------------------------------------------------


def coalesce_base(**coalesce: Any) -> Config:
    return {
        "source": {"plugin": "memory", "options": {"rows": []}, "on_success": "raw"},
        "gates": [{"name": "split", "input": "raw", "fork_to": {"a": "a_in", "b": "b_in"}}],
        "transforms": [
            {"name": "ta", "plugin": "passthrough", "input": "a_in", "on_success": "a_out"},
            {"name": "tb", "plugin": "passthrough", "input": "b_in", "on_success": "b_out"},
        ],
        "coalesce": [
            {
                "name": "join",
                "branches": {"a": "a_out", "b": "b_out"},
                "on_success": "out",
                **coalesce,
            }
        ],
        "sinks": [{"name": "out", "plugin": "jsonl", "options": {"path": "out.jsonl"}}],
    }


def config_issues(config: Config, tmp_path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(config, base_dir=tmp_path)
    return [(issue.path, issue.message) for issue in info.value.issues]


def test_the_coalesce_base_config_is_valid(tmp_path: Path) -> None:
    graph = Pipeline.from_dict(coalesce_base(), base_dir=tmp_path).graph
    assert graph.nodes["join"].joins == "split"


def test_a_coalesce_without_a_fork_upstream_is_refused(tmp_path: Path) -> None:
    config = coalesce_base()
    config["gates"][0] = {
        "name": "split",
        "input": "raw",
        "condition": "row['id'] > 1",
        "routes": {"true": "a_in", "false": "b_in"},
    }
    [(path, message)] = config_issues(config, tmp_path)
    assert path == "coalesce[0].branches"
    assert "fork" in message


def test_a_coalesce_whose_branches_no_fork_makes_is_refused(tmp_path: Path) -> None:
    config = coalesce_base()
    config["gates"][0]["fork_to"] = {"a": "a_in", "z": "b_in"}
    [(path, message)] = config_issues(config, tmp_path)
    assert path == "coalesce[0].branches"
    assert "a, b" in message


@pytest.mark.parametrize(
    ("settings", "key", "words"),
    [
        ({"policy": "quorum"}, "quorum", "quorum"),
        ({"policy": "quorum", "quorum": 3}, "quorum", "exceeds"),
        ({"quorum": 1}, "quorum", "only for policy quorum"),
        ({"merge": "select"}, "select_branch", "select_branch"),
        ({"merge": "select", "select_branch": "zz"}, "select_branch", "select_branch"),
        ({"prefer": "zz"}, "prefer", "'zz'"),
        ({"merge": "nested", "prefer": "a"}, "prefer", "union"),
    ],
    ids=[
        "quorum-missing",
        "quorum-too-big",
        "quorum-without-policy",
        "select-without-branch",
        "select-unknown-branch",
        "prefer-unknown-branch",
        "prefer-without-union",
    ],
)
def test_inconsistent_coalesce_settings_are_refused_at_their_key(
    tmp_path: Path, settings: dict[str, Any], key: str, words: str
) -> None:
    [(path, message)] = config_issues(coalesce_base(**settings), tmp_path)
    assert path == f"coalesce[0].{key}", (path, message)
    assert words in message
