"""Aggregation nodes end to end: triggers, groups, output modes and failed flushes, each
run's sink contents checked together with its Landscape records (batches, members,
outcomes, parents, node states) and its audit verified."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from sqlalchemy import select

from engine import ConfigError, ManualClock, Pipeline, RunResult
from landscape import Landscape
from landscape import _schema as t
from plugins import (
    Aggregation,
    BatchContext,
    PluginSetup,
    Row,
    Sink,
    SinkItem,
    SinkRejection,
)

Run = Callable[..., Any]
Config = dict[str, Any]

AGG = "agg"


# -- plugins of these tests -----------------------------------------------------------------


class RecordingSink(Sink):
    """Keeps every item it writes, in write order."""

    def __init__(self, options: Any = None, setup: PluginSetup | None = None) -> None:
        super().__init__(options or {}, setup or PluginSetup(node_name="sink"))
        self.items: list[SinkItem] = []

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        self.items.extend(items)
        return []

    @property
    def rows(self) -> list[Row]:
        return [item.row for item in self.items]


class Repeat(Aggregation):
    """Each member ``row['n']`` times, tagged with the batch's trigger: M rows from N."""

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        return [
            {"id": row["id"], "copy": i, "trigger": ctx.trigger}
            for row in rows
            for i in range(row["n"])
        ]


class Explode(Aggregation):
    """Always fails."""

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        raise RuntimeError("flush exploded")


class FailsFirstAttempt(Aggregation):
    """Fails attempt 1 of every batch, then returns the member ids with the attempt."""

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        if ctx.attempt == 1:
            raise ConnectionError("backend busy")
        return [{"ids": [row["id"] for row in rows], "attempt": ctx.attempt}]


class OneTooMany(Aggregation):
    """Returns one row more than it was given."""

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        return [dict(row) for row in rows] + [{"extra": True}]


class ReturnsADict(Aggregation):
    """Returns a row, not a list of rows."""

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        return {"count": len(rows)}  # type: ignore[return-value]


class SeesContexts(Aggregation):
    """Remembers the context of every flush; returns one row naming its members."""

    contexts: ClassVar[list[BatchContext]]

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        self.contexts.append(ctx)
        return [{"ids": [row["id"] for row in rows], "trigger": ctx.trigger}]


def seen_contexts() -> type[SeesContexts]:
    """A fresh :class:`SeesContexts` class with its own list of contexts."""
    return type("SeesContextsFresh", (SeesContexts,), {"contexts": []})


# -- building pipelines -----------------------------------------------------------------------


def aggregation_config(
    rows: Any,
    sink: Sink,
    *,
    errors: Sink | None = None,
    sink_batch_size: int = 500,
    **aggregation: Any,
) -> Config:
    """memory source -> aggregation ``agg`` -> sink ``out`` (and error sink ``errors``)."""
    sinks: list[Config] = [{"name": "out", "plugin": sink, "batch_size": sink_batch_size}]
    if errors is not None:
        sinks.append({"name": "errors", "plugin": errors})
        aggregation.setdefault("on_error", "errors")
    return {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "aggregations": [{"name": AGG, "input": "raw", "on_success": "out", **aggregation}],
        "sinks": sinks,
    }


async def run_with_clock(config: Config, clock: ManualClock, url: str, base_dir: Path) -> RunResult:
    """Run with ``clock`` driving the timeouts, and assert the audit verifies."""
    pipeline = Pipeline.from_dict(config, base_dir=base_dir, landscape_url=url, clock=clock)
    result = await pipeline.run()
    await assert_verified(url, result)
    return result


async def assert_verified(url: str, result: RunResult) -> None:
    assert result.status == "completed"
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(result.run_id)
    assert report.ok, [str(v) for v in report.violations]


# -- reading the Landscape --------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """A run's aggregation records, as plain dicts."""

    batches: list[dict[str, Any]]
    members: list[dict[str, Any]]
    outcomes: list[dict[str, Any]]
    parents: list[dict[str, Any]]
    states: list[dict[str, Any]]
    tokens: list[dict[str, Any]]

    def batches_in_order(self) -> list[dict[str, Any]]:
        """Batches by their first member's row index, then attempt."""
        return sorted(
            self.batches, key=lambda b: (self.member_rows(b["batch_id"])[:1], b["attempt"])
        )

    def _members(self, batch_id: str) -> list[dict[str, Any]]:
        return sorted(
            (m for m in self.members if m["batch_id"] == batch_id), key=lambda m: m["ordinal"]
        )

    def member_rows(self, batch_id: str) -> list[int]:
        return [m["row_index"] for m in self._members(batch_id)]

    def member_tokens(self, batch_id: str) -> list[str]:
        return [m["token_id"] for m in self._members(batch_id)]

    def ordinals(self, batch_id: str) -> list[int]:
        return [m["ordinal"] for m in self._members(batch_id)]

    def outcomes_of(self, token_id: str) -> list[dict[str, Any]]:
        found = [o for o in self.outcomes if o["token_id"] == token_id]
        return sorted(found, key=lambda o: (o["is_terminal"], o["recorded_at"]))

    def terminal(self, token_id: str) -> dict[str, Any]:
        (outcome,) = [o for o in self.outcomes_of(token_id) if o["is_terminal"]]
        return outcome

    def parents_of(self, token_id: str) -> list[str]:
        rows = sorted(
            (p for p in self.parents if p["token_id"] == token_id), key=lambda p: p["ordinal"]
        )
        return [p["parent_token_id"] for p in rows]

    def source_token(self, row_index: int) -> str:
        children = {p["token_id"] for p in self.parents}
        (token,) = [
            str(tok["token_id"])
            for tok in self.tokens
            if tok["row_index"] == row_index and tok["token_id"] not in children
        ]
        return token

    def state(self, state_id: str) -> dict[str, Any]:
        (state,) = [s for s in self.states if s["state_id"] == state_id]
        return state

    def states_at(self, token_id: str, node_id: str = AGG) -> list[dict[str, Any]]:
        return [s for s in self.states if s["token_id"] == token_id and s["node_id"] == node_id]


async def read_audit(url: str, run_id: str) -> Audit:
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:

        async def fetch(query: Any) -> list[dict[str, Any]]:
            return [dict(row) for row in (await conn.execute(query)).mappings().all()]

        bm, tok, rows = t.batch_members, t.tokens, t.rows
        return Audit(
            batches=await fetch(select(t.batches).where(t.batches.c.run_id == run_id)),
            members=await fetch(
                select(bm.c.batch_id, bm.c.token_id, bm.c.ordinal, rows.c.row_index)
                .select_from(
                    bm.join(tok, tok.c.token_id == bm.c.token_id).join(
                        rows, rows.c.row_id == tok.c.row_id
                    )
                )
                .where(bm.c.run_id == run_id)
            ),
            outcomes=await fetch(
                select(t.token_outcomes).where(t.token_outcomes.c.run_id == run_id)
            ),
            parents=await fetch(select(t.token_parents).where(t.token_parents.c.run_id == run_id)),
            states=await fetch(select(t.node_states).where(t.node_states.c.run_id == run_id)),
            tokens=await fetch(
                select(tok.c.token_id, rows.c.row_index)
                .select_from(tok.join(rows, rows.c.row_id == tok.c.row_id))
                .where(tok.c.run_id == run_id)
            ),
        )


def assert_batches_well_formed(audit: Audit) -> None:
    """Every batch settled, linked to its own closed flush state on its first member, with
    ordinals 0..n-1; no node state left open."""
    flush_states = [b["aggregation_state_id"] for b in audit.batches]
    assert len(set(flush_states)) == len(flush_states), "each attempt has its own flush state"
    for batch in audit.batches:
        assert batch["status"] in ("completed", "failed"), batch
        assert batch["aggregation_node_id"] == AGG
        ordinals = audit.ordinals(batch["batch_id"])
        assert ordinals, batch
        assert ordinals == list(range(len(ordinals))), batch
        state = audit.state(batch["aggregation_state_id"])
        assert state["node_id"] == AGG
        assert state["status"] == batch["status"]
        assert state["attempt"] == batch["attempt"]
        assert state["token_id"] == audit.member_tokens(batch["batch_id"])[0]
        assert json.loads(state["context_json"])["batch_id"] == batch["batch_id"]
    assert not [s for s in audit.states if s["status"] == "open"]


def assert_consumed(audit: Audit, batch: dict[str, Any]) -> None:
    """Each member of ``batch`` ended ``consumed_in_batch`` naming it."""
    for token_id in audit.member_tokens(batch["batch_id"]):
        outcome = audit.terminal(token_id)
        assert outcome["outcome"] == "consumed_in_batch"
        assert outcome["batch_id"] == batch["batch_id"]


def outputs_of(audit: Audit, sink: RecordingSink, batch: dict[str, Any]) -> list[SinkItem]:
    """Sink items whose token's parents are exactly ``batch``'s members, in order."""
    members = audit.member_tokens(batch["batch_id"])
    return [item for item in sink.items if audit.parents_of(item.token_id) == members]


def gated_rows(
    rows: Sequence[Row], between: Callable[[int], Any]
) -> Callable[[], AsyncIterator[Row]]:
    """An async generator of ``rows`` that awaits ``between(i)`` before yielding row ``i``."""

    async def produce() -> AsyncIterator[Row]:
        for i, row in enumerate(rows):
            await between(i)
            yield row

    return produce


# -- count -----------------------------------------------------------------------------------


async def test_count_trigger_flushes_full_batches_and_the_rest_at_end_of_source(
    landscape_url: str, tmp_path: Path
) -> None:
    sink = RecordingSink()
    rows = [{"id": i, "v": i} for i in range(25)]
    config = aggregation_config(rows, sink, plugin="collect", trigger={"count": 10})
    result = await run_with_clock(config, ManualClock(), landscape_url, tmp_path)

    assert result.outcomes == {"consumed_in_batch": 25, "completed": 3}
    assert [row["count"] for row in sink.rows] == [10, 10, 5]
    assert [[r["id"] for r in row["rows"]] for row in sink.rows] == [
        list(range(10)),
        list(range(10, 20)),
        list(range(20, 25)),
    ]
    audit = await read_audit(landscape_url, result.run_id)
    assert_batches_well_formed(audit)
    batches = audit.batches_in_order()
    assert [(b["trigger_reason"], b["status"], b["attempt"]) for b in batches] == [
        ("count", "completed", 1),
        ("count", "completed", 1),
        ("end_of_source", "completed", 1),
    ]
    assert [audit.member_rows(b["batch_id"]) for b in batches] == [
        list(range(10)),
        list(range(10, 20)),
        list(range(20, 25)),
    ]
    assert all(b["group_key"] is None for b in batches)
    for batch in batches:
        assert audit.member_tokens(batch["batch_id"]) == [
            audit.source_token(i) for i in audit.member_rows(batch["batch_id"])
        ]
        assert_consumed(audit, batch)
        (output,) = outputs_of(audit, sink, batch)
        assert audit.terminal(output.token_id)["outcome"] == "completed"
        assert audit.terminal(output.token_id)["sink_name"] == "out"
    for token_id in {m["token_id"] for m in audit.members}:
        states = audit.states_at(token_id)
        assert states
        assert all(s["status"] == "completed" for s in states)


# -- timeout ---------------------------------------------------------------------------------


async def test_timeout_flushes_a_batch_while_the_source_is_idle(
    sqlite_url: str, tmp_path: Path
) -> None:
    clock = ManualClock()
    sink = RecordingSink()
    seen_before: dict[str, list[Row]] = {}

    async def between(i: int) -> None:
        await anyio.wait_all_tasks_blocked()
        if i == 1:
            clock.advance(3)  # row 1 joins at t=3: the batch still began at t=0
        elif i == 2:
            clock.advance(1.5)  # t=4.5: not yet
            await anyio.wait_all_tasks_blocked()
            seen_before["t=4.5"] = list(sink.rows)
            clock.advance(1)  # t=5.5: 5 s after the first row, 2.5 s after the last
            await anyio.wait_all_tasks_blocked()
            seen_before["t=5.5"] = list(sink.rows)

    rows = gated_rows([{"id": i} for i in range(3)], between)
    config = aggregation_config(
        rows(),
        sink,
        sink_batch_size=1,
        plugin="collect",
        trigger={"count": 100, "timeout_seconds": 5},
    )
    result = await run_with_clock(config, clock, sqlite_url, tmp_path)

    assert seen_before["t=4.5"] == []
    assert [(r["count"], [m["id"] for m in r["rows"]]) for r in seen_before["t=5.5"]] == [
        (2, [0, 1])
    ]
    assert [[m["id"] for m in r["rows"]] for r in sink.rows] == [[0, 1], [2]]
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    batches = audit.batches_in_order()
    assert [(b["trigger_reason"], audit.member_rows(b["batch_id"])) for b in batches] == [
        ("timeout", [0, 1]),
        ("end_of_source", [2]),
    ]
    for batch in batches:
        assert_consumed(audit, batch)


async def test_a_new_batch_after_a_timeout_gets_its_own_deadline(
    sqlite_url: str, tmp_path: Path
) -> None:
    clock = ManualClock()
    sink = RecordingSink()
    seen: list[list[list[int]]] = []

    def snapshot() -> None:
        seen.append([[m["id"] for m in r["rows"]] for r in sink.rows])

    async def between(i: int) -> None:
        await anyio.wait_all_tasks_blocked()
        if i == 1:
            clock.advance(10)  # t=10: batch [0] times out
            await anyio.wait_all_tasks_blocked()
            snapshot()
        elif i == 2:
            clock.advance(9)  # t=19: batch [1] began at t=10, not due
            await anyio.wait_all_tasks_blocked()
            snapshot()
            clock.advance(1)  # t=20: due
            await anyio.wait_all_tasks_blocked()
            snapshot()

    rows = gated_rows([{"id": i} for i in range(3)], between)
    config = aggregation_config(
        rows(), sink, sink_batch_size=1, plugin="collect", trigger={"timeout_seconds": 10}
    )
    result = await run_with_clock(config, clock, sqlite_url, tmp_path)

    assert seen == [[[0]], [[0]], [[0], [1]]]
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    assert [b["trigger_reason"] for b in audit.batches_in_order()] == [
        "timeout",
        "timeout",
        "end_of_source",
    ]


async def test_a_deadline_that_passes_during_another_flush_fires_before_more_input(
    sqlite_url: str, tmp_path: Path
) -> None:
    clock = ManualClock()
    sink = RecordingSink()
    release = anyio.Event()

    class SlowForA(Aggregation):
        """Holds the flush of group ``a`` until the test releases it."""

        async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
            if ctx.group_key == "a":
                await release.wait()
            return [{"ids": [row["id"] for row in rows], "trigger": ctx.trigger}]

    async def rows() -> AsyncIterator[Row]:
        yield {"id": 0, "k": "a"}  # a begins at t=0, due at t=5
        await anyio.wait_all_tasks_blocked()
        clock.advance(1)
        yield {"id": 1, "k": "b"}  # b begins at t=1, due at t=6
        await anyio.wait_all_tasks_blocked()
        clock.advance(4)  # t=5: a's flush starts and is held
        await anyio.wait_all_tasks_blocked()
        clock.advance(2)  # t=7: b is due while a's flush runs
        yield {"id": 2, "k": "b"}  # arrives after b's deadline
        await anyio.wait_all_tasks_blocked()
        release.set()

    config = aggregation_config(
        rows(), sink, plugin=SlowForA, group_by="k", trigger={"timeout_seconds": 5}
    )
    result = await run_with_clock(config, clock, sqlite_url, tmp_path)

    assert [(r["ids"], r["trigger"]) for r in sink.rows] == [
        ([0], "timeout"),
        ([1], "timeout"),
        ([2], "end_of_source"),
    ]
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)


async def test_timeout_fires_on_the_event_loop_clock_while_the_source_waits(
    sqlite_url: str, tmp_path: Path
) -> None:
    flushed = anyio.Event()

    class SignallingSink(RecordingSink):
        async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
            await super().write(items)
            flushed.set()
            return []

    sink = SignallingSink()

    async def rows() -> AsyncIterator[Row]:
        yield {"id": 0}
        with anyio.fail_after(30):  # a guard against a hang, not a timing assertion
            await flushed.wait()
        yield {"id": 1}

    config = aggregation_config(
        rows(), sink, sink_batch_size=1, plugin="collect", trigger={"timeout_seconds": 0.05}
    )
    pipeline = Pipeline.from_dict(config, base_dir=tmp_path, landscape_url=sqlite_url)
    result = await pipeline.run()
    await assert_verified(sqlite_url, result)
    assert [[m["id"] for m in r["rows"]] for r in sink.rows] == [[0], [1]]
    audit = await read_audit(sqlite_url, result.run_id)
    assert [b["trigger_reason"] for b in audit.batches_in_order()] == ["timeout", "end_of_source"]


# -- condition ----------------------------------------------------------------------------


async def test_condition_sees_the_newest_row_and_the_batch_count(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    flags = [False, True, False, False, False, False, False]
    rows = [{"id": i, "urgent": flag} for i, flag in enumerate(flags)]
    config = aggregation_config(
        rows,
        sink,
        plugin=seen_contexts(),
        trigger={"condition": "row['urgent'] or batch_count >= 3"},
    )
    result = await run_verified(config)

    assert [(r["ids"], r["trigger"]) for r in sink.rows] == [
        ([0, 1], "condition"),
        ([2, 3, 4], "condition"),
        ([5, 6], "end_of_source"),
    ]
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    assert [b["trigger_reason"] for b in audit.batches_in_order()] == [
        "condition",
        "condition",
        "end_of_source",
    ]


async def test_condition_sees_the_batch_age_on_the_run_clock(
    sqlite_url: str, tmp_path: Path
) -> None:
    clock = ManualClock()
    sink = RecordingSink()
    ages = {1: 4.0, 2: 7.0, 3: 1.0}  # seconds before row i arrives

    async def between(i: int) -> None:
        await anyio.wait_all_tasks_blocked()
        clock.advance(ages.get(i, 0.0))

    rows = gated_rows([{"id": i} for i in range(5)], between)
    config = aggregation_config(
        rows(),
        sink,
        plugin=seen_contexts(),
        trigger={"condition": "batch_age_seconds >= 10"},
    )
    result = await run_with_clock(config, clock, sqlite_url, tmp_path)

    # row 2 arrives at t=11, 11 s after the batch began: it flushes with it
    assert [(r["ids"], r["trigger"]) for r in sink.rows] == [
        ([0, 1, 2], "condition"),
        ([3, 4], "end_of_source"),
    ]
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)


async def test_the_first_trigger_to_fire_wins(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    flags = [False, True, False, False, False, False]
    rows = [{"id": i, "urgent": flag} for i, flag in enumerate(flags)]
    config = aggregation_config(
        rows,
        sink,
        plugin=seen_contexts(),
        trigger={"count": 3, "timeout_seconds": 3600, "condition": "row['urgent']"},
    )
    result = await run_verified(config)

    assert [(r["ids"], r["trigger"]) for r in sink.rows] == [
        ([0, 1], "condition"),
        ([2, 3, 4], "count"),
        ([5], "end_of_source"),
    ]
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    assert [b["trigger_reason"] for b in audit.batches_in_order()] == [
        "condition",
        "count",
        "end_of_source",
    ]


async def test_a_row_whose_condition_fails_is_that_rows_error(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink, errors = RecordingSink(), RecordingSink()
    rows = [{"id": 0, "n": 1}, {"id": 1}, {"id": 2, "n": 5}]
    config = aggregation_config(
        rows, sink, errors=errors, plugin=seen_contexts(), trigger={"condition": "row['n'] > 3"}
    )
    result = await run_verified(config)

    assert [(r["ids"], r["trigger"]) for r in sink.rows] == [([0, 2], "condition")]
    (error,) = errors.rows
    assert error["id"] == 1
    assert error["_error_node"] == AGG
    assert "'n'" in error["_error"]
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    assert audit.terminal(audit.source_token(1))["outcome"] == "quarantined"
    assert not [m for m in audit.members if m["row_index"] == 1]


# -- group_by -------------------------------------------------------------------------------


async def test_group_by_field_keeps_one_batch_per_key_each_with_its_own_count(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    keys = ["a", "b", "a", "b", "a", "c"]
    rows = [{"id": i, "k": k, "v": i * 10} for i, k in enumerate(keys)]
    config = aggregation_config(
        rows,
        sink,
        plugin="batch_stats",
        group_by="k",
        trigger={"count": 2},
        options={"fields": ["v"]},
    )
    result = await run_verified(config)

    summaries = {(r["group"], r["count"], r["v_sum"]) for r in sink.rows}
    assert summaries == {("a", 2, 20), ("b", 2, 40), ("a", 1, 40), ("c", 1, 50)}
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    assert [
        (b["group_key"], b["trigger_reason"], audit.member_rows(b["batch_id"]))
        for b in audit.batches_in_order()
    ] == [
        ('"a"', "count", [0, 2]),
        ('"b"', "count", [1, 3]),
        ('"a"', "end_of_source", [4]),
        ('"c"', "end_of_source", [5]),
    ]
    for batch in audit.batches:
        assert_consumed(audit, batch)
        (output,) = outputs_of(audit, sink, batch)
        assert output.row["group"] == json.loads(batch["group_key"])


async def test_group_by_expression_keys_batches_by_its_value(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    rows = [{"id": i, "n": i} for i in range(7)]
    config = aggregation_config(
        rows,
        sink,
        plugin="collect",
        group_by="row['n'] % 3 == 0",
        options={"field": "members"},
    )
    result = await run_verified(config)

    grouped = {r["group"]: [m["id"] for m in r["members"]] for r in sink.rows}
    assert grouped == {True: [0, 3, 6], False: [1, 2, 4, 5]}
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    assert {b["group_key"]: audit.member_rows(b["batch_id"]) for b in audit.batches} == {
        "true": [0, 3, 6],
        "false": [1, 2, 4, 5],
    }


async def test_groups_time_out_each_from_their_own_first_row(
    sqlite_url: str, tmp_path: Path
) -> None:
    clock = ManualClock()
    sink = RecordingSink()
    seen: list[list[str]] = []

    async def between(i: int) -> None:
        await anyio.wait_all_tasks_blocked()
        if i == 1:
            clock.advance(3)  # group b begins at t=3
        elif i == 2:
            clock.advance(2)  # t=5: group a is due, b is not
            await anyio.wait_all_tasks_blocked()
            seen.append([r["group"] for r in sink.rows])
            clock.advance(3)  # t=8: b is due
            await anyio.wait_all_tasks_blocked()
            seen.append([r["group"] for r in sink.rows])

    rows = gated_rows([{"id": 0, "k": "a"}, {"id": 1, "k": "b"}, {"id": 2, "k": "a"}], between)
    config = aggregation_config(
        rows(),
        sink,
        sink_batch_size=1,
        plugin="collect",
        group_by="k",
        trigger={"timeout_seconds": 5},
    )
    result = await run_with_clock(config, clock, sqlite_url, tmp_path)

    assert seen == [["a"], ["a", "b"]]
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    assert [
        (b["group_key"], b["trigger_reason"], audit.member_rows(b["batch_id"]))
        for b in audit.batches_in_order()
    ] == [('"a"', "timeout", [0]), ('"b"', "timeout", [1]), ('"a"', "end_of_source", [2])]


async def test_a_row_whose_group_by_fails_goes_to_on_error_and_the_run_goes_on(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink, errors = RecordingSink(), RecordingSink()
    rows = [{"id": 0, "k": "a"}, {"id": 1}, {"id": 2, "k": "a"}]
    config = aggregation_config(rows, sink, errors=errors, plugin="collect", group_by="row['k']")
    result = await run_verified(config)

    assert [[m["id"] for m in r["rows"]] for r in sink.rows] == [[0, 2]]
    (error,) = errors.rows
    assert error["id"] == 1
    assert error["_error_node"] == AGG
    assert "'k'" in error["_error"]
    assert result.outcomes == {"consumed_in_batch": 2, "completed": 1, "quarantined": 1}
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    failing = audit.source_token(1)
    (state,) = audit.states_at(failing)
    assert state["status"] == "failed"
    assert json.loads(state["error_json"])["group_by"] == "row['k']"
    assert audit.terminal(failing)["sink_name"] == "errors"


async def test_without_on_error_a_row_whose_group_by_fails_ends_failed(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    config = aggregation_config(
        [{"id": 0, "k": 1}, {"id": 1}], sink, plugin="collect", group_by="k"
    )
    result = await run_verified(config)

    assert result.outcomes == {"consumed_in_batch": 1, "completed": 1, "failed": 1}
    audit = await read_audit(sqlite_url, result.run_id)
    outcome = audit.terminal(audit.source_token(1))
    assert outcome["outcome"] == "failed"
    context = json.loads(outcome["context_json"])
    assert context["node"] == AGG
    assert "'k'" in context["error"]["message"]


async def test_a_null_group_key_is_a_group_of_its_own_recorded_as_json_null(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    rows = [{"id": 0, "k": None}, {"id": 1, "k": "x"}, {"id": 2, "k": None}]
    config = aggregation_config(rows, sink, plugin="collect", group_by="row.get('k')")
    result = await run_verified(config)

    audit = await read_audit(sqlite_url, result.run_id)
    assert {b["group_key"]: audit.member_rows(b["batch_id"]) for b in audit.batches} == {
        "null": [0, 2],
        '"x"': [1],
    }


# -- output modes ---------------------------------------------------------------------------


async def test_transform_mode_makes_m_new_tokens_from_n_members_including_none(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    rows = [{"id": i, "n": n} for i, n in enumerate([0, 0, 1, 2, 3])]
    config = aggregation_config(rows, sink, plugin=Repeat, trigger={"count": 2})
    result = await run_verified(config)

    assert [(r["id"], r["copy"]) for r in sink.rows] == [
        (2, 0),
        (3, 0),
        (3, 1),
        (4, 0),
        (4, 1),
        (4, 2),
    ]
    assert result.outcomes == {"consumed_in_batch": 5, "completed": 6}
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    batches = audit.batches_in_order()
    assert [len(outputs_of(audit, sink, b)) for b in batches] == [0, 3, 3]
    for batch in batches:
        assert batch["status"] == "completed"
        assert_consumed(audit, batch)
    output_ids = {item.token_id for item in sink.items}
    source_ids = {audit.source_token(i) for i in range(5)}
    assert not output_ids & source_ids
    assert all(audit.parents_of(token) for token in output_ids)


async def test_single_mode_gives_one_summary_row_per_batch(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    rows = [{"id": i, "amount": float(i)} for i in range(5)]
    config = aggregation_config(
        rows,
        sink,
        plugin="batch_stats",
        output_mode="single",
        trigger={"count": 3},
        options={"fields": ["amount"]},
    )
    result = await run_verified(config)

    assert sink.rows == [
        {
            "count": 3,
            "amount_sum": 3.0,
            "amount_mean": 1.0,
            "amount_min": 0.0,
            "amount_max": 2.0,
        },
        {
            "count": 2,
            "amount_sum": 7.0,
            "amount_mean": 3.5,
            "amount_min": 3.0,
            "amount_max": 4.0,
        },
    ]
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    batches = audit.batches_in_order()
    assert [audit.member_rows(b["batch_id"]) for b in batches] == [[0, 1, 2], [3, 4]]
    for batch in batches:
        assert_consumed(audit, batch)
        (output,) = outputs_of(audit, sink, batch)
        assert audit.terminal(output.token_id)["outcome"] == "completed"


async def test_passthrough_members_are_buffered_then_go_on_enriched_as_the_same_tokens(
    landscape_url: str, tmp_path: Path
) -> None:
    sink = RecordingSink()
    rows = [{"id": i, "v": i} for i in range(5)]
    config = aggregation_config(
        rows,
        sink,
        plugin="batch_stats",
        output_mode="passthrough",
        trigger={"count": 3},
        options={"fields": ["v"]},
    )
    result = await run_with_clock(config, ManualClock(), landscape_url, tmp_path)

    assert [(r["id"], r["count"], r["v_sum"]) for r in sink.rows] == [
        (0, 3, 3),
        (1, 3, 3),
        (2, 3, 3),
        (3, 2, 7),
        (4, 2, 7),
    ]
    assert result.outcomes == {"buffered": 5, "completed": 5}
    audit = await read_audit(landscape_url, result.run_id)
    assert_batches_well_formed(audit)
    assert not audit.parents
    assert [item.token_id for item in sink.items] == [audit.source_token(i) for i in range(5)]
    batches = audit.batches_in_order()
    assert [audit.member_rows(b["batch_id"]) for b in batches] == [[0, 1, 2], [3, 4]]
    for batch in batches:
        for token_id in audit.member_tokens(batch["batch_id"]):
            outcomes = audit.outcomes_of(token_id)
            assert [(o["outcome"], bool(o["is_terminal"])) for o in outcomes] == [
                ("buffered", False),
                ("completed", True),
            ]
            assert outcomes[0]["batch_id"] == batch["batch_id"]
            assert outcomes[0]["recorded_at"] <= outcomes[1]["recorded_at"]
            flushes = {b["aggregation_state_id"] for b in audit.batches}
            (state,) = [s for s in audit.states_at(token_id) if s["state_id"] not in flushes]
            assert state["status"] == "completed"
            assert state["output_hash"] != state["input_hash"]


# -- failing flushes ------------------------------------------------------------------------


async def test_a_failing_flush_fails_its_batch_and_sends_members_to_on_error(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink, errors = RecordingSink(), RecordingSink()
    rows = [{"id": i} for i in range(3)]
    config = aggregation_config(rows, sink, errors=errors, plugin=Explode, trigger={"count": 2})
    result = await run_verified(config)

    assert sink.items == []
    assert [(r["id"], r["_error_node"], r["_error"]) for r in errors.rows] == [
        (0, AGG, "flush exploded"),
        (1, AGG, "flush exploded"),
        (2, AGG, "flush exploded"),
    ]
    assert result.outcomes == {"quarantined": 3}
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    batches = audit.batches_in_order()
    assert [(b["status"], b["trigger_reason"]) for b in batches] == [
        ("failed", "count"),
        ("failed", "end_of_source"),
    ]
    for batch in batches:
        flush = audit.state(batch["aggregation_state_id"])
        assert flush["status"] == "failed"
        error = json.loads(flush["error_json"])
        assert error["type"] == "RuntimeError"
        assert error["message"] == "flush exploded"
        for token_id in audit.member_tokens(batch["batch_id"]):
            outcome = audit.terminal(token_id)
            assert (outcome["outcome"], outcome["sink_name"]) == ("quarantined", "errors")
            assert "failed" in {s["status"] for s in audit.states_at(token_id)}


async def test_without_on_error_the_members_of_a_failed_batch_end_failed(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    config = aggregation_config([{"id": 0}, {"id": 1}], sink, plugin=Explode)
    result = await run_verified(config)

    assert result.outcomes == {"failed": 2}
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    (batch,) = audit.batches
    assert batch["status"] == "failed"
    for token_id in audit.member_tokens(batch["batch_id"]):
        context = json.loads(audit.terminal(token_id)["context_json"])
        assert context["node"] == AGG
        assert context["error"]["message"] == "flush exploded"
        assert context["error"]["batch_id"] == batch["batch_id"]


async def test_passthrough_members_of_a_failed_batch_leave_buffered_for_on_error(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink, errors = RecordingSink(), RecordingSink()
    config = aggregation_config(
        [{"id": 0}, {"id": 1}], sink, errors=errors, plugin=Explode, output_mode="passthrough"
    )
    result = await run_verified(config)

    assert [r["id"] for r in errors.rows] == [0, 1]
    assert result.outcomes == {"buffered": 2, "quarantined": 2}
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    for token_id in (audit.source_token(0), audit.source_token(1)):
        assert [o["outcome"] for o in audit.outcomes_of(token_id)] == ["buffered", "quarantined"]


async def test_a_retried_flush_is_a_new_batch_attempt_with_its_own_state(
    landscape_url: str, tmp_path: Path
) -> None:
    sink = RecordingSink()
    rows = [{"id": i} for i in range(3)]
    config = aggregation_config(
        rows, sink, plugin=FailsFirstAttempt, retries=1, trigger={"count": 3}
    )
    result = await run_with_clock(config, ManualClock(), landscape_url, tmp_path)

    assert sink.rows == [{"ids": [0, 1, 2], "attempt": 2}]
    assert result.outcomes == {"consumed_in_batch": 3, "completed": 1}
    audit = await read_audit(landscape_url, result.run_id)
    assert_batches_well_formed(audit)
    first, second = audit.batches_in_order()
    assert [(b["attempt"], b["status"], b["trigger_reason"]) for b in (first, second)] == [
        (1, "failed", "count"),
        (2, "completed", "count"),
    ]
    assert first["batch_id"] != second["batch_id"]
    assert first["aggregation_state_id"] != second["aggregation_state_id"]
    assert (
        audit.member_rows(first["batch_id"]) == audit.member_rows(second["batch_id"]) == [0, 1, 2]
    )
    failed_state = audit.state(first["aggregation_state_id"])
    assert failed_state["status"] == "failed"
    assert json.loads(failed_state["error_json"])["type"] == "ConnectionError"
    assert audit.state(second["aggregation_state_id"])["status"] == "completed"
    assert_consumed(audit, second)
    (output,) = sink.items
    assert audit.parents_of(output.token_id) == audit.member_tokens(second["batch_id"])


async def test_a_flush_failing_every_attempt_fails_each_batch_then_the_members(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    sink = RecordingSink()
    config = aggregation_config([{"id": 0}, {"id": 1}], sink, plugin=Explode, retries=2)
    result = await run_verified(config)

    assert result.outcomes == {"failed": 2}
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    batches = audit.batches_in_order()
    assert [(b["attempt"], b["status"]) for b in batches] == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
    ]
    last = batches[-1]["batch_id"]
    for token_id in audit.member_tokens(last):
        assert json.loads(audit.terminal(token_id)["context_json"])["error"]["batch_id"] == last


@pytest.mark.parametrize(
    ("plugin", "output_mode", "message"),
    [
        (OneTooMany, "single", "output_mode single needs 1 row, flush returned 3"),
        (
            OneTooMany,
            "passthrough",
            "output_mode passthrough needs 2 rows (one per member), flush returned 3",
        ),
        (ReturnsADict, "transform", "flush returned dict, not a list of rows"),
    ],
)
async def test_a_flush_returning_what_its_output_mode_does_not_allow_fails_the_batch(
    run_verified: Run,
    tmp_path: Path,
    sqlite_url: str,
    plugin: type[Aggregation],
    output_mode: str,
    message: str,
) -> None:
    sink, errors = RecordingSink(), RecordingSink()
    config = aggregation_config(
        [{"id": 0}, {"id": 1}], sink, errors=errors, plugin=plugin, output_mode=output_mode
    )
    result = await run_verified(config)

    assert sink.items == []
    assert [(r["id"], r["_error"]) for r in errors.rows] == [(0, message), (1, message)]
    assert result.outcomes.get("quarantined") == 2
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    (batch,) = audit.batches
    assert batch["status"] == "failed"
    assert json.loads(audit.state(batch["aggregation_state_id"])["error_json"])["message"] == (
        message
    )


# -- what the plugin is told ----------------------------------------------------------------


async def test_the_plugin_gets_a_fresh_context_per_flush(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    plugin = seen_contexts()
    sink = RecordingSink()
    rows = [{"id": i, "k": i % 2} for i in range(5)]
    config = aggregation_config(rows, sink, plugin=plugin, group_by="k", trigger={"count": 2})
    result = await run_verified(config)

    audit = await read_audit(sqlite_url, result.run_id)
    by_id = {b["batch_id"]: b for b in audit.batches}
    assert sorted((c.group_key, c.trigger) for c in plugin.contexts) == [
        (0, "count"),
        (0, "end_of_source"),
        (1, "count"),
    ]
    for ctx in plugin.contexts:
        batch = by_id[ctx.batch_id]
        assert ctx.state_id == batch["aggregation_state_id"]
        assert ctx.attempt == batch["attempt"] == 1
        assert ctx.output_mode == "transform"
        assert ctx.run_id == result.run_id
        assert ctx.node_name == AGG


async def read_committed(pipeline: Pipeline, url: str, table: Any) -> list[dict[str, Any]]:
    """``table``'s rows once everything the running pipeline recorded is committed."""
    assert pipeline._run is not None
    await pipeline._run.recorder.flush()
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(select(table))).mappings().all()]


async def test_a_batch_is_draft_while_it_fills_and_executing_while_its_plugin_runs(
    sqlite_url: str, tmp_path: Path
) -> None:
    entered, release = anyio.Event(), anyio.Event()
    contexts: list[BatchContext] = []
    drafts: list[list[dict[str, Any]]] = []

    class Held(Aggregation):
        async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
            contexts.append(ctx)
            entered.set()
            await release.wait()
            return [{"n": len(rows)}]

    async def rows() -> AsyncIterator[Row]:
        yield {"id": 0}
        await anyio.wait_all_tasks_blocked()
        drafts.append(await read_committed(pipeline, sqlite_url, t.batches))
        yield {"id": 1}

    sink = RecordingSink()
    config = aggregation_config(rows(), sink, plugin=Held)
    pipeline = Pipeline.from_dict(config, base_dir=tmp_path, landscape_url=sqlite_url)
    results: list[RunResult] = []

    async def run() -> None:
        results.append(await pipeline.run())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await entered.wait()
        (batch,) = await read_committed(pipeline, sqlite_url, t.batches)
        states = await read_committed(pipeline, sqlite_url, t.node_states)
        members = await read_committed(pipeline, sqlite_url, t.batch_members)
        release.set()

    ((draft,),) = drafts
    assert (draft["status"], draft["aggregation_state_id"]) == ("draft", None)
    assert draft["batch_id"] == batch["batch_id"]
    assert (batch["status"], batch["trigger_reason"]) == ("executing", "end_of_source")
    (state,) = [s for s in states if s["state_id"] == batch["aggregation_state_id"]]
    assert state["status"] == "open"
    assert state["node_id"] == AGG
    assert (contexts[0].state_id, contexts[0].batch_id) == (state["state_id"], batch["batch_id"])
    assert sorted(m["ordinal"] for m in members) == [0, 1]
    (result,) = results
    await assert_verified(sqlite_url, result)
    audit = await read_audit(sqlite_url, result.run_id)
    assert_batches_well_formed(audit)
    assert audit.state(state["state_id"])["status"] == "completed"


# -- configuration errors -------------------------------------------------------------------


def config_issues(tmp_path: Path, **aggregation: Any) -> list[str]:
    config = aggregation_config([], RecordingSink(), **{"plugin": "collect", **aggregation})
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(config, base_dir=tmp_path)
    return [str(issue) for issue in info.value.issues]


@pytest.mark.parametrize(
    ("condition", "complaint"),
    [
        ("row.keys()", "not allowed"),
        ("__import__('os')", "dunder"),
        ("[x for x in row]", "comprehension"),
        ("rows_seen > 3", "rows_seen"),
        ("batch_count >", "syntax"),
    ],
)
def test_a_bad_trigger_condition_is_refused_at_its_key_path(
    tmp_path: Path, condition: str, complaint: str
) -> None:
    found = config_issues(tmp_path, trigger={"condition": condition})
    assert [i for i in found if i.startswith("aggregations[0].trigger.condition:")], found
    assert any(complaint in i for i in found), found


@pytest.mark.parametrize(
    "group_by", ["row['k'] +", "row.items()", "__import__('os')", "unknown_name + 1"]
)
def test_a_bad_group_by_is_refused_at_its_key_path(tmp_path: Path, group_by: str) -> None:
    found = config_issues(tmp_path, group_by=group_by)
    assert [i for i in found if i.startswith("aggregations[0].group_by:")], found


def test_batch_stats_without_fields_is_refused_at_its_options_key_path(tmp_path: Path) -> None:
    found = config_issues(tmp_path, plugin="batch_stats")
    assert [i for i in found if i.startswith("aggregations[0].options.fields:")], found


def test_an_unknown_plugin_option_is_refused(tmp_path: Path) -> None:
    found = config_issues(tmp_path, options={"feild": "x"})
    assert [i for i in found if i.startswith("aggregations[0].options.feild:")], found
