"""The live progress display renders every node's statistics."""

from __future__ import annotations

from rich.console import Console

from engine import NodeStatistics, RunStatistics
from engine._graph import NodeKind
from engine._progress import render_statistics
from landscape import CallSummary


def test_progress_shows_rate_and_per_node_queue_in_flight_and_outcomes() -> None:
    stats = RunStatistics(
        run_id="20261126T000000-abcdef",
        elapsed_s=2.0,
        rows_read=5000,
        outcomes={"completed": 4000},
        nodes=[
            NodeStatistics("source", NodeKind.SOURCE, 5000, 0, 0, {}),
            NodeStatistics("classify", NodeKind.TRANSFORM, 4990, 32, 17, {"failed": 3}),
            NodeStatistics("out", NodeKind.SINK, 4000, 500, 64, {"completed": 4000}),
        ],
        audit_backlog=1234,
    )
    console = Console(record=True, width=140)
    console.print(render_statistics(stats))
    text = console.export_text()
    assert "2,500 rows/s" in text
    assert "audit backlog 1,234" in text
    assert "classify" in text
    assert "failed 3" in text
    assert "completed 4,000" in text
    classify_line = next(line for line in text.splitlines() if line.startswith("classify"))
    assert classify_line.split()[2:5] == ["4,990", "32", "17"]


def test_progress_shows_call_totals_once_there_are_calls() -> None:
    quiet = RunStatistics(run_id="r", elapsed_s=1.0, rows_read=1, outcomes={})
    busy = RunStatistics(
        run_id="r",
        elapsed_s=1.0,
        rows_read=1,
        outcomes={},
        calls=CallSummary(calls=12, retries=2, errors=2, tokens=1200, cost=0.0125),
    )
    console = Console(record=True, width=140)
    console.print(render_statistics(quiet))
    assert "calls" not in console.export_text()
    console.print(render_statistics(busy))
    text = console.export_text()
    assert "calls 12 (2 retries, 2 errors)" in text
    assert "tokens 1,200" in text
    assert "cost 0.0125" in text
