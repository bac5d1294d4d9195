"""verify(): the audit invariants hold for a sound run, and each kind of damage is reported."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, text, update

from landscape import _schema as t
from landscape._outcomes import RunStatus
from landscape._store import Landscape
from landscape._verify import Invariant, RunNotFound, VerifyReport, verify
from tests.landscape._sample import SampleRun, record_sample_run

Damage = Callable[[SampleRun], list[Any]]


@pytest.fixture
async def sample(landscape: Landscape, tmp_path: Path) -> SampleRun:
    return await record_sample_run(landscape, out_dir=tmp_path)


async def _damage(landscape: Landscape, statements: list[Any]) -> None:
    async with landscape.engine.begin() as conn:
        for statement in statements:
            await conn.execute(statement)


def _found(report: VerifyReport, invariant: Invariant, fragment: str, token: str | None) -> bool:
    return any(
        v.invariant == invariant
        and fragment in v.message
        and (token is None or v.token_id == token)
        for v in report.violations
    )


async def test_sound_run_passes(landscape: Landscape, sample: SampleRun) -> None:
    report = await landscape.verify(sample.run_id)
    assert report.violations == []
    assert report.ok
    assert report.checked_tokens == sample.token_count() == 14
    assert report.watermark is None


async def test_report_to_dict_is_json(landscape: Landscape, sample: SampleRun) -> None:
    await _damage(
        landscape,
        [delete(t.token_outcomes).where(t.token_outcomes.c.token_id == sample.tokens["3"])],
    )
    data = json.loads(json.dumps((await landscape.verify(sample.run_id)).to_dict()))
    assert data["run_id"] == sample.run_id
    assert data["ok"] is False
    assert data["violations"] == [
        {
            "invariant": "1-terminal-outcome",
            "message": "token has no terminal outcome",
            "token_id": sample.tokens["3"],
            "row_index": 3,
        }
    ]


async def test_unknown_run_raises(landscape: Landscape, sample: SampleRun) -> None:
    with pytest.raises(RunNotFound, match="no run 'nope'") as caught:
        await landscape.verify("nope")
    assert isinstance(caught.value, LookupError)


def _outcome_of(s: SampleRun, name: str) -> Any:
    return t.token_outcomes.c.token_id == s.tokens[name]


def _state(s: SampleRun, name: str, node: str) -> Any:
    return t.node_states.c.state_id == s.states[f"{s.tokens[name]}@{node}"]


def _call(s: SampleRun, attempt: int) -> Any:
    return t.calls.c.call_id == f"{s.run_id}/call-0-{attempt}"


def _second_outcome(s: SampleRun) -> list[Any]:
    values = {
        "outcome_id": "o-extra", "run_id": s.run_id, "token_id": s.tokens["1"],
        "outcome": "discarded", "is_terminal": True, "recorded_at": 0.0,
    }  # fmt: skip
    return [text("DROP INDEX ux_token_outcomes_terminal"), insert(t.token_outcomes).values(values)]


def _parent_link(s: SampleRun) -> list[Any]:
    values = {
        "token_id": s.tokens["0"],
        "parent_token_id": "tok-ghost",
        "ordinal": 0,
        "run_id": s.run_id,
    }
    return [insert(t.token_parents).values(values)]


TP, TO, NS = t.token_parents, t.token_outcomes, t.node_states

# name -> (damage, invariant reported, message fragment, token named in the violation)
DAMAGE: dict[str, tuple[Damage, Invariant, str, str | None]] = {
    "no terminal outcome": (
        lambda s: [delete(TO).where(_outcome_of(s, "0"))],
        Invariant.TERMINAL_OUTCOME, "token has no terminal outcome", "0",
    ),
    "two terminal outcomes": (
        _second_outcome, Invariant.TERMINAL_OUTCOME, "2 terminal outcomes", "1",
    ),
    "unknown outcome": (
        lambda s: [update(TO).where(_outcome_of(s, "3")).values(outcome="exploded")],
        Invariant.TERMINAL_OUTCOME, "outcome 'exploded'", "3",
    ),
    "buffered marked terminal": (
        lambda s: [update(TO).where(_outcome_of(s, "3")).values(outcome="buffered")],
        Invariant.TERMINAL_OUTCOME, "outcome 'buffered' recorded with is_terminal=True", "3",
    ),
    "state left open": (
        lambda s: [update(NS).where(_state(s, "0", "clean")).values(status="open")],
        Invariant.NODE_STATE, "was left open", "0",
    ),
    "unknown state status": (
        lambda s: [update(NS).where(_state(s, "3", "clean")).values(status="weird")],
        Invariant.NODE_STATE, "unknown status 'weird'", "3",
    ),
    "pending without job": (
        lambda s: [update(NS).where(_state(s, "0", "clean")).values(status="pending")],
        Invariant.NODE_STATE, "pending without a job id", "0",
    ),
    "batch left executing": (
        lambda s: [update(t.batches).values(status="executing")],
        Invariant.BATCH, "status 'executing'", None,
    ),
    "batch without flush state": (
        lambda s: [update(t.batches).values(aggregation_state_id="st-missing")],
        Invariant.BATCH, "st-missing names no node_state", None,
    ),
    "batch never linked": (
        lambda s: [update(t.batches).values(aggregation_state_id=None)],
        Invariant.BATCH, "no aggregation_state_id", None,
    ),
    "fork without children": (
        lambda s: [delete(TP).where(TP.c.parent_token_id == s.tokens["2"])],
        Invariant.TOKEN_PARENTS, "forked but no token names it as parent", "2",
    ),
    "branch without parent": (
        lambda s: [delete(TP).where(TP.c.token_id == s.tokens["2s"])],
        Invariant.TOKEN_PARENTS, "branch 'sentiment' has no parent", "2s",
    ),
    "join without parents": (
        lambda s: [delete(TP).where(TP.c.token_id == s.tokens["2m"])],
        Invariant.TOKEN_PARENTS, "has 2 tokens without parents", None,
    ),
    "coalesced without output": (
        lambda s: [delete(TP).where(TP.c.token_id == s.tokens["2m"])],
        Invariant.TOKEN_PARENTS, "coalesced but no token names it as parent", "2t",
    ),
    "consumed outside any batch": (
        lambda s: [delete(t.batch_members).where(t.batch_members.c.token_id == s.tokens["5"])],
        Invariant.TOKEN_PARENTS, "consumed_in_batch but not a member of batch", "5",
    ),
    "coalesce failure without context": (
        lambda s: [update(TO).where(_outcome_of(s, "7s")).values(context_json='{"node": "join"}')],
        Invariant.COALESCE_FAILURE, "lacks coalesce, policy, missing_branches", "7s",
    ),
    "call without latency": (
        lambda s: [update(t.calls).where(_call(s, 1)).values(latency_ms=None)],
        Invariant.CALL, "lacks latency_ms", "0",
    ),
    "answered call without response": (
        lambda s: [update(t.calls).where(_call(s, 2)).values(response_hash=None)],
        Invariant.CALL, "lacks response_hash", "0",
    ),
    "call with unknown status": (
        lambda s: [update(t.calls).where(_call(s, 2)).values(status="maybe")],
        Invariant.CALL, "unknown status 'maybe'", "0",
    ),
    "sink count off": (
        lambda s: [update(t.artifacts).where(t.artifacts.c.sink_node_id == "out").values(rows_written=2)],  # noqa: E501
        Invariant.SINK_COUNT, "sink 'out': 3 tokens landed there but its artifacts record 2", None,
    ),
    "completed outcome without sink": (
        lambda s: [update(TO).where(_outcome_of(s, "0")).values(sink_name=None)],
        Invariant.SINK_COUNT, "1 completed/routed outcomes name no sink", None,
    ),
    "missing payload": (
        lambda s: [delete(t.payloads).where(t.payloads.c.hash == s.hashes[f"{s.tokens['3']}@src"])],
        Invariant.REFERENCE, "output_hash", "3",
    ),
    "missing source payload": (
        lambda s: [delete(t.payloads).where(t.payloads.c.hash == s.hashes["raw-0"])],
        Invariant.REFERENCE, "source_data_ref", None,
    ),
    "missing call payload": (
        lambda s: [update(t.calls).where(_call(s, 1)).values(request_ref="f" * 64)],
        Invariant.REFERENCE, "request_ref 'ffff", None,
    ),
    "missing node": (
        lambda s: [delete(t.nodes).where(t.nodes.c.node_id == "risk")],
        Invariant.REFERENCE, "node_id 'risk' not found in nodes", "1",
    ),
    "missing row": (
        lambda s: [delete(t.rows).where(t.rows.c.row_id == s.rows[3])],
        Invariant.REFERENCE, "not found in rows", "3",
    ),
    "missing edge": (
        lambda s: [update(t.routing_events).values(edge_id="e-nope")],
        Invariant.REFERENCE, "edge_id 'e-nope' not found in edges", None,
    ),
    "missing parent token": (
        _parent_link, Invariant.REFERENCE, "parent_token_id 'tok-ghost' not found in tokens", None,
    ),
    "missing token": (
        lambda s: [delete(t.tokens).where(t.tokens.c.token_id == s.tokens["3"])],
        Invariant.REFERENCE, "token_id", "3",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DAMAGE))
async def test_damage_is_reported(landscape: Landscape, sample: SampleRun, name: str) -> None:
    damage, invariant, fragment, token = DAMAGE[name]
    await _damage(landscape, damage(sample))
    report = await landscape.verify(sample.run_id)
    assert not report.ok
    token_id = None if token is None else sample.tokens[token]
    assert _found(report, invariant, fragment, token_id), report.violations


async def test_violation_names_the_row(landscape: Landscape, sample: SampleRun) -> None:
    await _damage(landscape, [update(NS).where(_state(sample, "3", "clean")).values(status="open")])
    (violation,) = (await landscape.verify(sample.run_id)).violations
    assert violation.row_index == 3
    assert (
        violation.message
        == f"node_state {sample.states[sample.tokens['3'] + '@clean']} at 'clean' was left open"
    )


@pytest.mark.parametrize("context", [{"job_id": "job-1"}, {"external_job_id": "job-1"}])
async def test_pending_state_with_job_id_is_sound(
    landscape: Landscape, sample: SampleRun, context: dict[str, str]
) -> None:
    pending = update(NS).where(_state(sample, "0", "clean"))
    await _damage(landscape, [pending.values(status="pending", context_json=json.dumps(context))])
    assert (await landscape.verify(sample.run_id)).ok


async def test_pending_batch_with_external_job_is_sound(
    landscape: Landscape, sample: SampleRun
) -> None:
    flush = sample.states[f"{sample.tokens['agg']}@daily"]
    await _damage(
        landscape,
        [
            update(t.batches).values(status="pending", external_job_id="batch-job-9"),
            update(NS).where(NS.c.state_id == flush).values(status="pending"),
        ],
    )
    assert (await landscape.verify(sample.run_id)).ok


async def test_each_check_caps_its_violations(landscape: Landscape, sample: SampleRun) -> None:
    await _damage(
        landscape, [delete(TO).where(TO.c.token_id.in_([sample.tokens["3"], sample.tokens["7t"]]))]
    )
    async with landscape.engine.connect() as conn:
        report = await verify(conn, sample.run_id, limit=1)
    assert [v.message for v in report.violations] == [
        "token has no terminal outcome",
        "... and 1 more like these",
    ]


async def test_runs_are_checked_apart(landscape: Landscape, sample: SampleRun) -> None:
    other = await record_sample_run(landscape, "run-other")
    await _damage(landscape, [delete(TO).where(_outcome_of(other, "0"))])
    assert (await landscape.verify(sample.run_id)).ok
    assert not (await landscape.verify(other.run_id)).ok


# -- interrupted runs: only rows at or below the watermark must be terminal ------------------


async def test_interrupted_run_without_checkpoint_checks_no_token(landscape: Landscape) -> None:
    sample = await record_sample_run(landscape, status=RunStatus.INTERRUPTED)
    await _damage(landscape, [delete(TO).where(_outcome_of(sample, "0"))])
    report = await landscape.verify(sample.run_id)
    assert report.ok
    assert (report.checked_tokens, report.watermark) == (0, None)


async def test_interrupted_run_checks_rows_up_to_the_watermark(landscape: Landscape) -> None:
    sample = await record_sample_run(landscape, status=RunStatus.INTERRUPTED, watermark=1)
    await _damage(landscape, [delete(TO).where(_outcome_of(sample, "3"))])
    report = await landscape.verify(sample.run_id)
    assert report.ok
    assert (report.checked_tokens, report.watermark) == (2, 1)
    await _damage(landscape, [delete(TO).where(_outcome_of(sample, "1"))])
    report = await landscape.verify(sample.run_id)
    assert [(v.token_id, v.row_index) for v in report.violations] == [(sample.tokens["1"], 1)]


async def test_interrupted_run_skips_sink_counts_and_open_batches(landscape: Landscape) -> None:
    sample = await record_sample_run(landscape, status=RunStatus.INTERRUPTED, watermark=4)
    await _damage(
        landscape,
        [
            update(t.artifacts).values(rows_written=0),
            update(t.batches).values(status="draft"),
        ],
    )
    assert (await landscape.verify(sample.run_id)).ok


async def test_interrupted_run_still_checks_references(landscape: Landscape) -> None:
    sample = await record_sample_run(landscape, status=RunStatus.INTERRUPTED)
    await _damage(landscape, [delete(t.nodes).where(t.nodes.c.node_id == "clean")])
    report = await landscape.verify(sample.run_id)
    assert _found(report, Invariant.REFERENCE, "node_id 'clean' not found in nodes", None)


async def test_latest_checkpoint_sets_the_watermark(landscape: Landscape) -> None:
    sample = await record_sample_run(landscape, status=RunStatus.COMPLETED, watermark=7)
    report = await landscape.verify(sample.run_id)
    assert (report.ok, report.watermark) == (True, 7)


# -- what the run left: sink files and payload content ---------------------------------------


async def test_an_edited_or_missing_sink_file_is_reported(
    landscape: Landscape, sample: SampleRun, tmp_path: Path
) -> None:
    assert (await landscape.verify(sample.run_id)).ok
    out = tmp_path / "out.jsonl"
    out.write_bytes(out.read_bytes().replace(b'"row": 1', b'"row": 7'))  # same size
    (tmp_path / "review.jsonl").write_bytes(b"")
    (tmp_path / "quarantine.jsonl").unlink()
    report = await landscape.verify(sample.run_id)
    assert _found(report, Invariant.SINK_FILE, f"sink 'out': {out} differs from what", None)
    assert _found(report, Invariant.SINK_FILE, "has 0 bytes where the run recorded 11", None)
    assert _found(report, Invariant.SINK_FILE, "quarantine.jsonl is missing", None)


async def test_a_running_runs_files_are_not_compared(landscape: Landscape, tmp_path: Path) -> None:
    sample = await record_sample_run(landscape, status=RunStatus.RUNNING, out_dir=tmp_path)
    (tmp_path / "out.jsonl").write_bytes(b"more rows written since\n")
    assert (await landscape.verify(sample.run_id)).ok


async def test_deep_verify_hashes_every_payload_again(
    landscape: Landscape, sample: SampleRun
) -> None:
    report = await landscape.verify(sample.run_id, deep=True)
    assert report.ok, report.violations
    assert report.payloads_checked is not None
    assert report.payloads_checked > 10
    edited = sample.hashes["response"]
    payloads = t.payloads
    await _damage(
        landscape,
        [
            update(payloads)
            .where(payloads.c.hash == edited)
            .values(content='{"choices":[{"message":{"content":"forged"}}]}')
        ],
    )
    assert (await landscape.verify(sample.run_id)).ok  # the structure is intact
    report = await landscape.verify(sample.run_id, deep=True)
    assert [v.invariant for v in report.violations] == [Invariant.PAYLOAD_CONTENT.value]
    assert f"payload {edited}: its content hashes to" in report.violations[0].message
