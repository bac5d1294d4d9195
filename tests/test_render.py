"""The CLI's renderables: explain trees, verify reports and the runs table, as text."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rich.console import Console, RenderableType

from engine._render import render_lineage, render_runs, render_verify, short_hash
from landscape._lineage import (
    BatchMembership,
    CallRecord,
    Lineage,
    NodeStateRecord,
    OutcomeRecord,
    RouteRecord,
    RunInfo,
    SourceRow,
    TokenLineage,
)
from landscape._store import RunSummary
from landscape._verify import VerifyReport, Violation

H_IN, H_OUT, H_SRC = "a" * 64, "b" * 64, "c" * 64


def text_of(renderable: RenderableType) -> str:
    console = Console(record=True, width=120, color_system=None)
    console.print(renderable)
    return console.export_text()


def state(node: str, node_type: str, **changes: Any) -> NodeStateRecord:
    base = NodeStateRecord(
        state_id=f"st-{node}",
        node_id=node,
        node_type=node_type,
        step_index=0,
        attempt=1,
        status="completed",
        input_hash=H_IN,
        output_hash=H_OUT,
        started_at=0.0,
        completed_at=0.0042,
        duration_ms=4.2,
        error=None,
        context=None,
        output=None,
        routes=(),
        calls=(),
    )
    return replace(base, **changes)


def token(token_id: str, *states: NodeStateRecord, **changes: Any) -> TokenLineage:
    base = TokenLineage(
        token_id=token_id,
        row_id="row-1",
        branch_name=None,
        parent_ids=(),
        states=states,
        batches=(),
        outcomes=(),
        children=(),
        merged_into=(),
    )
    return replace(base, **changes)


def outcome(name: str, sink: str | None = None, context: Any = None) -> OutcomeRecord:
    return OutcomeRecord(name, True, sink, None, context, 0.0)


def lineage(*tokens: TokenLineage, **row_changes: Any) -> Lineage:
    row = SourceRow(
        row_id="row-1",
        row_index=1,
        source_node_id="src",
        source_data_hash=H_SRC,
        data={"id": 1, "score": 0.9},
        validation_errors=(),
    )
    return Lineage(RunInfo("run-1", "completed"), replace(row, **row_changes), tokens)


CALL = CallRecord(
    call_id="c1",
    call_index=0,
    call_type="llm",
    provider="openai",
    model="gpt-x",
    status="error",
    attempt=1,
    http_status=503,
    request_hash="d" * 64,
    request_ref="d" * 64,
    response_hash=None,
    response_ref=None,
    error={"message": "overloaded"},
    latency_ms=12.5,
    prompt_tokens=None,
    completion_tokens=None,
    cost=None,
    created_at=0.0,
    request={},
    response=None,
)


def test_short_hash() -> None:
    assert short_hash("0123456789abcdef") == "0123456789ab"
    assert short_hash(None) == "-"


def test_linear_lineage_names_every_step() -> None:
    tree = lineage(
        token(
            "tok-1",
            state("src", "source", input_hash=H_SRC),
            state("clean", "transform", step_index=1, output={"id": 1}),
            state("out", "sink", step_index=2, output_hash=None),
            outcomes=(outcome("completed", "out"),),
        )
    )
    text = text_of(render_lineage(tree))
    assert "row 1 (row-1) of run run-1 (completed)" in text
    assert f"source src · hash {H_SRC[:12]}" in text
    assert 'data {"id": 1, "score": 0.9}' in text
    assert f"✓ clean (transform) completed · in {H_IN[:12]} → out {H_OUT[:12]} · 4.2 ms" in text
    assert f"✓ out (sink) completed · in {H_IN[:12]} → out - · 4.2 ms" in text
    assert "● outcome completed → sink out" in text
    assert H_IN not in text  # hashes are shortened
    assert text.index("src (source)") < text.index("clean (transform)") < text.index("out (sink)")


def test_gate_shows_condition_value_and_route() -> None:
    gate = state(
        "risk",
        "gate",
        context={"condition": "row['score'] > 0.8", "value": True, "route": "true"},
        routes=(RouteRecord("true", "e1", "risk", "review", "move", None),),
    )
    tok = token("tok-1", gate, outcomes=(outcome("routed", "review"),))
    text = text_of(render_lineage(lineage(tok)))
    assert "gate: row['score'] > 0.8 → true · route true" in text
    assert "route true (risk → review, move)" in text
    assert "● outcome routed → sink review" in text


def test_failed_state_shows_its_error() -> None:
    failed = state(
        "clean",
        "transform",
        status="failed",
        output_hash=None,
        error={"type": "KeyError", "message": "'text'"},
    )
    failure = outcome("failed", context={"node": "clean"})
    text = text_of(render_lineage(lineage(token("tok-1", failed, outcomes=(failure,)))))
    assert "✗ clean (transform) failed" in text
    assert "error: KeyError: 'text'" in text
    assert '● outcome failed · {"node": "clean"}' in text


def test_calls_show_attempt_status_latency_and_tokens() -> None:
    answered = replace(
        CALL,
        call_id="c2",
        attempt=2,
        status="success",
        http_status=200,
        error=None,
        latency_ms=80.0,
        prompt_tokens=20,
        completion_tokens=3,
        response_hash="e" * 64,
    )
    llm = state("classify", "transform", calls=(CALL, answered))
    text = text_of(render_lineage(lineage(token("tok-1", llm))))
    assert "call 0 llm openai/gpt-x · attempt 1 · error · HTTP 503 · 12.5 ms" in text
    assert "error: overloaded" in text
    assert "attempt 2 · success · HTTP 200 · 80.0 ms · tokens 20+3" in text
    assert f"request {'d' * 12} → response -" in text
    assert f"request {'d' * 12} → response {'e' * 12}" in text


def test_fork_and_join_nest_as_branches() -> None:
    merged = token(
        "tok-m",
        state("join", "coalesce"),
        parent_ids=("tok-s", "tok-t"),
        outcomes=(outcome("completed", "out"),),
    )
    sentiment = token(
        "tok-s",
        state("sentiment", "transform"),
        branch_name="sentiment",
        parent_ids=("tok-1",),
        outcomes=(outcome("coalesced"),),
        children=(merged,),
    )
    topics = token(
        "tok-t",
        state("topics", "transform"),
        branch_name="topics",
        parent_ids=("tok-1",),
        outcomes=(outcome("coalesced"),),
        merged_into=("tok-m",),
    )
    root = token(
        "tok-1", state("split", "gate"), outcomes=(outcome("forked"),), children=(sentiment, topics)
    )
    text = text_of(render_lineage(lineage(root)))
    assert "● outcome forked" in text
    assert "⑂ branch sentiment: token tok-s" in text
    assert "⑂ branch topics: token tok-t" in text
    assert "⑃ joined: token tok-m (from tok-s, tok-t)" in text
    assert "→ merged into token tok-m" in text
    lines = text.splitlines()
    branch = next(i for i, line in enumerate(lines) if "branch sentiment" in line)
    joined = next(i for i, line in enumerate(lines) if "joined: token tok-m" in line)
    indent = len(lines[joined]) - len(lines[joined].lstrip("│ ├└─"))
    assert joined > branch
    assert indent > len(lines[branch]) - len(lines[branch].lstrip("│ ├└─"))


def test_batch_membership_and_quarantine() -> None:
    batch = BatchMembership("batch-1", "daily", 3, 1, "completed", "count", "st-9", None)
    tok = token(
        "tok-1",
        state("src", "source", status="failed", output_hash=None),
        batches=(batch,),
        outcomes=(outcome("quarantined", "quarantine"),),
    )
    text = text_of(render_lineage(lineage(tok, validation_errors=("id: not an int",))))
    assert "✗ validation error: id: not an int" in text
    assert "batch batch-1 at daily (member #3, attempt 1, completed, trigger count)" in text
    assert "● outcome quarantined → sink quarantine" in text


def test_focus_token_is_marked() -> None:
    tree = replace(lineage(token("tok-1")), focus_token_id="tok-1")
    assert "token tok-1 ◀ asked for" in text_of(render_lineage(tree))


def test_markup_in_data_is_printed_literally() -> None:
    tree = lineage(token("tok-1"), data={"text": "[bold]not markup[/bold]"})
    assert "[bold]not markup[/bold]" in text_of(render_lineage(tree))


def test_verify_ok_is_one_line() -> None:
    report = VerifyReport("run-1", True, [], checked_tokens=12, watermark=None)
    assert (
        text_of(render_verify(report)).strip() == "✓ run run-1: audit trail OK (12 tokens checked)"
    )


def test_verify_lists_each_violation() -> None:
    violations = [
        Violation("1-terminal-outcome", "token has no terminal outcome", "tok-3", 3),
        Violation("8-sink-count", "sink 'out': 3 tokens landed there but its artifacts record 2"),
    ]
    report = VerifyReport("run-1", False, violations, checked_tokens=5, watermark=4)
    text = text_of(render_verify(report))
    assert "✗ run run-1: 2 violation(s) (5 tokens checked, watermark row 4)" in text
    assert "Invariant" in text
    assert "Problem" in text
    row = next(line for line in text.splitlines() if "tok-3" in line)
    assert "1-terminal-outcome" in row
    assert "token has no terminal outcome" in row
    assert "│ 3 " in row
    assert "sink 'out': 3 tokens landed there" in text


def test_runs_table() -> None:
    runs = [
        RunSummary(
            "run-2",
            "completed",
            1_700_000_000.0,
            1_700_000_002.5,
            "demo",
            42,
            {"failed": 2, "completed": 40},
        ),
        RunSummary("run-1", "interrupted", 1_700_000_000.0, 1_700_003_725.0, None, 7, {}),
        RunSummary("run-0", "running", 1_700_000_000.0, None, None, None, {}),
    ]
    text = text_of(render_runs(runs))
    for header in ("Run", "Status", "Started (UTC)", "Duration", "Rows", "Outcomes"):
        assert header in text
    first = next(line for line in text.splitlines() if "run-2" in line)
    for cell in (
        "demo",
        "completed",
        "2023-11-14 22:13:20",
        "2.5 s",
        "42",
        "completed 40, failed 2",
    ):
        assert cell in first
    assert "1:02:05" in next(line for line in text.splitlines() if "run-1" in line)
    running = next(line for line in text.splitlines() if "run-0" in line)
    assert "running" in running
    assert " - " in running


def test_explain_shows_the_row_after_each_node_that_changed_it() -> None:
    changed = state("enrich", "transform", output={"id": 1, "label": "hot"})
    unchanged = state(
        "gate", "gate", input_hash=H_OUT, output_hash=H_OUT, output={"id": 1, "label": "hot"}
    )
    text = text_of(render_lineage(lineage(token("tok-1", changed, unchanged))))
    assert text.count('row {"id": 1, "label": "hot"}') == 1
