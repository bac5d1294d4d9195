"""explain(): the lineage tree of one source row, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import event

from landscape._lineage import Lineage, LineageNotFound, RunNotFound, TokenLineage
from landscape._store import Landscape
from tests.landscape._sample import CLEAN_ERROR, GATE_CONDITION, SampleRun, record_sample_run


@pytest.fixture
async def sample(landscape: Landscape) -> SampleRun:
    return await record_sample_run(landscape)


def _only(lineage: Lineage) -> TokenLineage:
    assert len(lineage.tokens) == 1
    return lineage.tokens[0]


def _nodes(token: TokenLineage) -> list[str]:
    return [state.node_id for state in token.states]


async def test_linear_row_lists_its_states_in_order(
    landscape: Landscape, sample: SampleRun
) -> None:
    lineage = await landscape.explain(sample.run_id, row_index=0)
    assert (lineage.run.run_id, lineage.run.status) == (sample.run_id, "completed")
    assert lineage.row.row_id == sample.rows[0]
    assert lineage.row.source_data_hash == sample.hashes["raw-0"]
    assert lineage.row.data == {"id": "0", "text": "hello"}
    assert lineage.row.validation_errors == ()
    token = _only(lineage)
    assert token.token_id == sample.tokens["0"]
    assert _nodes(token) == ["src", "clean", "out"]
    assert [s.node_type for s in token.states] == ["source", "transform", "sink"]
    assert [s.step_index for s in token.states] == [0, 1, 2]
    clean = token.states[1]
    assert clean.output == {"id": 0, "text": "hello", "label": "greeting"}
    assert clean.input_hash == token.states[0].output_hash
    assert clean.duration_ms == pytest.approx(2.5, abs=0.01)
    assert token.children == ()


async def test_linear_row_shows_every_call_attempt(landscape: Landscape, sample: SampleRun) -> None:
    token = _only(await landscape.explain(sample.run_id, row_index=0))
    failed, answered = token.states[1].calls
    assert (failed.attempt, failed.status, failed.http_status) == (1, "error", 503)
    assert failed.error == {"message": "overloaded"}
    assert failed.response is None
    assert failed.request == {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    assert (answered.attempt, answered.status, answered.latency_ms) == (2, "success", 80.0)
    assert answered.response_hash == sample.hashes["response"]
    assert answered.response == {"choices": [{"message": {"content": "greeting"}}]}
    assert (answered.prompt_tokens, answered.completion_tokens) == (20, 3)


async def test_linear_row_ends_completed_in_its_sink(
    landscape: Landscape, sample: SampleRun
) -> None:
    token = _only(await landscape.explain(sample.run_id, row_index=0))
    outcome = token.terminal_outcome
    assert outcome is not None
    assert (outcome.outcome, outcome.sink_name, outcome.is_terminal) == ("completed", "out", True)


async def test_gate_records_decision_and_route(landscape: Landscape, sample: SampleRun) -> None:
    token = _only(await landscape.explain(sample.run_id, row_index=1))
    assert _nodes(token) == ["src", "clean", "risk", "review"]
    gate = token.states[2]
    assert gate.context == {"condition": GATE_CONDITION, "value": True, "route": "true"}
    (route,) = gate.routes
    assert (route.route_label, route.edge_id) == ("true", "e-risk-review")
    assert (route.from_node, route.to_node, route.mode) == ("risk", "review", "move")
    assert route.reason == gate.context
    outcome = token.terminal_outcome
    assert outcome is not None
    assert (outcome.outcome, outcome.sink_name) == ("routed", "review")


async def test_fork_nests_branches_and_their_join(landscape: Landscape, sample: SampleRun) -> None:
    lineage = await landscape.explain(sample.run_id, row_index=2)
    parent = _only(lineage)
    assert [o.outcome for o in parent.outcomes] == ["forked"]
    assert [r.route_label for r in parent.states[-1].routes] == ["sentiment", "topics"]
    assert [r.mode for r in parent.states[-1].routes] == ["copy", "copy"]
    sentiment, topics = parent.children
    assert (sentiment.branch_name, topics.branch_name) == ("sentiment", "topics")
    assert sentiment.parent_ids == topics.parent_ids == (parent.token_id,)
    (merged,) = sentiment.children
    assert merged.token_id == sample.tokens["2m"]
    assert merged.parent_ids == (sentiment.token_id, topics.token_id)
    assert topics.children == ()
    assert topics.merged_into == (merged.token_id,)
    assert merged.states[0].output == {"id": 2, "sentiment": "positive", "topics": ["a"]}
    assert [t.token_id for t in lineage.walk()].count(merged.token_id) == 1
    assert len(list(lineage.walk())) == 4


async def test_failed_row_shows_the_error(landscape: Landscape, sample: SampleRun) -> None:
    token = _only(await landscape.explain(sample.run_id, row_index=3))
    failed = token.states[-1]
    assert (failed.node_id, failed.status, failed.error) == ("clean", "failed", CLEAN_ERROR)
    assert failed.output is None
    outcome = token.terminal_outcome
    assert outcome is not None
    assert outcome.outcome == "failed"
    assert outcome.context == {"error": CLEAN_ERROR, "node": "clean"}


async def test_quarantined_row_keeps_raw_data_and_validation_error(
    landscape: Landscape, sample: SampleRun
) -> None:
    lineage = await landscape.explain(sample.run_id, row_index=4)
    assert lineage.row.data == {"id": "four"}
    assert lineage.row.validation_errors == ("id: not an int",)
    token = _only(lineage)
    assert [(s.node_id, s.status) for s in token.states] == [
        ("src", "failed"),
        ("quarantine", "completed"),
    ]
    outcome = token.terminal_outcome
    assert outcome is not None
    assert (outcome.outcome, outcome.sink_name) == ("quarantined", "quarantine")


@pytest.mark.parametrize("row_index", [5, 6])
async def test_aggregated_rows_show_batch_and_output(
    landscape: Landscape, sample: SampleRun, row_index: int
) -> None:
    token = _only(await landscape.explain(sample.run_id, row_index=row_index))
    (batch,) = token.batches
    batch_id = f"{sample.run_id}/batch-1"
    assert (batch.batch_id, batch.aggregation_node_id, batch.status) == (
        batch_id,
        "daily",
        "completed",
    )
    assert batch.ordinal == row_index - 5
    assert batch.trigger_reason == "count"
    assert batch.aggregation_state_id == sample.states[f"{sample.tokens['agg']}@daily"]
    assert [(o.outcome, o.batch_id) for o in token.outcomes] == [("consumed_in_batch", batch_id)]
    (output,) = token.children
    assert output.token_id == sample.tokens["agg"]
    assert output.parent_ids == (sample.tokens["5"], sample.tokens["6"])
    assert output.states[0].output == {"count": 2}


async def test_failed_coalesce_context_is_kept(landscape: Landscape, sample: SampleRun) -> None:
    parent = _only(await landscape.explain(sample.run_id, row_index=7))
    sentiment = next(c for c in parent.children if c.branch_name == "sentiment")
    outcome = sentiment.terminal_outcome
    assert outcome is not None
    assert outcome.context["missing_branches"] == ["topics"]
    assert outcome.context["policy"] == "require_all"


async def test_selectors_agree(landscape: Landscape, sample: SampleRun) -> None:
    by_index = await landscape.explain(sample.run_id, row_index=2)
    by_id = await landscape.explain(sample.run_id, row_id=sample.rows[2])
    by_token = await landscape.explain(sample.run_id, token_id=sample.tokens["2m"])
    assert by_index == by_id
    assert by_token.focus_token_id == sample.tokens["2m"]
    assert by_token.to_dict() == {**by_index.to_dict(), "focus_token_id": sample.tokens["2m"]}


async def test_to_dict_is_json(landscape: Landscape, sample: SampleRun) -> None:
    lineage = await landscape.explain(sample.run_id, row_index=0)
    data: dict[str, Any] = json.loads(json.dumps(lineage.to_dict()))
    assert data["run"] == {"run_id": sample.run_id, "status": "completed"}
    assert data["row"]["row_index"] == 0
    (token,) = data["tokens"]
    assert [s["node_id"] for s in token["states"]] == ["src", "clean", "out"]
    assert [c["attempt"] for c in token["states"][1]["calls"]] == [1, 2]
    assert token["outcomes"][0]["sink_name"] == "out"
    assert token["children"] == []


async def test_explain_uses_a_fixed_number_of_queries(
    landscape: Landscape, sample: SampleRun
) -> None:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(landscape.engine.sync_engine, "before_cursor_execute", count)
    try:
        await landscape.explain(sample.run_id, row_index=2)
    finally:
        event.remove(landscape.engine.sync_engine, "before_cursor_execute", count)
    assert len(statements) <= 14


@pytest.mark.parametrize(
    "selectors",
    [{}, {"row_index": 0, "row_id": "row-0"}, {"row_id": "row-0", "token_id": "tok-0"}],
)
async def test_exactly_one_selector(
    landscape: Landscape, sample: SampleRun, selectors: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await landscape.explain(sample.run_id, **selectors)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"row_index": 99}, "no row index 99"),
        ({"row_id": "row-x"}, "no row 'row-x'"),
        ({"token_id": "tok-x"}, "no token 'tok-x'"),
    ],
)
async def test_unknown_row_or_token(
    landscape: Landscape, sample: SampleRun, selector: dict[str, Any], message: str
) -> None:
    with pytest.raises(LineageNotFound, match=message):
        await landscape.explain(sample.run_id, **selector)


async def test_unknown_run(landscape: Landscape, sample: SampleRun) -> None:
    with pytest.raises(RunNotFound, match="no run 'nope'") as caught:
        await landscape.explain("nope", row_index=0)
    assert isinstance(caught.value, LookupError)


async def test_rows_of_other_runs_are_not_explained(
    landscape: Landscape, sample: SampleRun
) -> None:
    other = await record_sample_run(landscape, "run-other")
    with pytest.raises(LineageNotFound):
        await landscape.explain(other.run_id, row_id=sample.rows[0])
