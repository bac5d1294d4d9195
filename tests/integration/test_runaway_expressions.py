"""A runaway gate condition, run by the ``ledgerflow`` CLI for real, from outside.

The condition of issue 19 — two lists of a million references to a list of a million
items, compared — froze the event loop: signals went unanswered and no run was
recorded.  Here it is a row's error: the run completes with those rows routed by
``on_error`` and the limit on record, and a SIGINT to the process group while such rows
are being evaluated stops the run gracefully.  The waits are hang timeouts, not
performance bounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from landscape import Landscape
from landscape import _schema as t
from plugins.expressions import MAX_STEPS
from tests._read import read_jsonl, table_rows

from ._crash import EXIT_INTERRUPTED, finish, run_cli, start_run, started_run
from .conftest import run_id_of

EXIT_ROW_ERRORS = 4
#: Seconds before a test calls the run hung (it takes a few on this machine).
HANG_SECONDS = 90
RUNAWAY = "[[1]*1000000]*1000000 == [[1]*1000000]*1000000"
STEP_LIMIT = f"limit of {MAX_STEPS:,} steps"

PIPELINE = """
name: runaway-conditions
landscape: {url: "sqlite+aiosqlite:///audit.db"}
source: {plugin: jsonl, options: {path: data.jsonl}, on_success: raw}
gates:
  - name: check
    input: raw
    condition: "(CONDITION) if row['runaway'] else row['x'] > 1"
    routes: {"true": high, "false": low}
    on_error: errors
sinks:
  - {name: high, plugin: jsonl, options: {path: out/high.jsonl}}
  - {name: low, plugin: jsonl, options: {path: out/low.jsonl}}
  - {name: errors, plugin: jsonl, options: {path: out/errors.jsonl}}
"""


def write_pipeline(work: Path, rows: list[dict[str, Any]]) -> Path:
    """The pipeline file and its rows (``runaway``: the row's condition runs away)."""
    with (work / "data.jsonl").open("w") as data:
        data.writelines(json.dumps(row) + "\n" for row in rows)
    path = work / "pipeline.yaml"
    path.write_text(PIPELINE.replace("CONDITION", RUNAWAY))
    return path


def landscape_url(work: Path) -> str:
    return f"sqlite+aiosqlite:///{work / 'audit.db'}"


@contextlib.asynccontextmanager
async def running(work: Path, pipeline: Path) -> Any:
    """``ledgerflow run`` in its own process group, killed if the test leaves it running."""
    process = await start_run(work, pipeline)
    try:
        yield process
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def verified(work: Path, run_id: str) -> None:
    """``ledgerflow verify`` passes, and so does the Landscape's own report."""
    code, output = await run_cli(work, "verify", run_id, "--landscape", landscape_url(work))
    assert code == 0, output
    async with Landscape.connect(landscape_url(work)) as landscape:
        report = await landscape.verify(run_id)
    assert report.ok, [str(v) for v in report.violations]


@pytest.mark.timeout(300)
async def test_runaway_conditions_are_routed_by_on_error_and_the_run_completes(
    tmp_path: Path,
) -> None:
    rows = [{"id": i, "x": i % 3, "runaway": i % 4 == 1} for i in range(12)]
    pipeline = write_pipeline(tmp_path, rows)
    async with running(tmp_path, pipeline) as process:
        with anyio.fail_after(HANG_SECONDS):
            code, output = await finish(process)
    assert code == EXIT_ROW_ERRORS, output
    run_id = run_id_of(output)
    runaway = [row["id"] for row in rows if row["runaway"]]
    assert [row["id"] for row in read_jsonl(tmp_path / "out" / "errors.jsonl")] == runaway
    high = [row["id"] for row in read_jsonl(tmp_path / "out" / "high.jsonl")]
    low = [row["id"] for row in read_jsonl(tmp_path / "out" / "low.jsonl")]
    assert high == [row["id"] for row in rows if not row["runaway"] and row["x"] > 1]
    assert sorted(high + low + runaway) == list(range(12))
    url = landscape_url(tmp_path)
    states = await table_rows(url, t.node_states, t.node_states.c.run_id == run_id)
    errors = [json.loads(state["error_json"]) for state in states if state["error_json"]]
    assert len(errors) == len(runaway)
    for error in errors:
        assert error["type"] == "ExpressionEvaluationError"
        assert STEP_LIMIT in error["message"]
        assert RUNAWAY in error["condition"]
    await verified(tmp_path, run_id)


async def wait_for_errors(work: Path, process: Process) -> None:
    """Until the run has routed a row by its error: runaway rows are being evaluated."""
    errors = work / "out" / "errors.jsonl"
    while not (errors.exists() and errors.stat().st_size > 0):
        assert process.returncode is None, "the run ended before any row's error"
        await anyio.sleep(0.05)


@pytest.mark.timeout(300)
async def test_a_sigint_while_runaway_conditions_are_evaluated_stops_the_run_gracefully(
    tmp_path: Path,
) -> None:
    rows = [{"id": i, "x": i, "runaway": True} for i in range(5_000)]
    pipeline = write_pipeline(tmp_path, rows)
    async with running(tmp_path, pipeline) as process:
        with anyio.fail_after(HANG_SECONDS):
            run_id, seen = await started_run(process)
            await wait_for_errors(tmp_path, process)
        os.killpg(process.pid, signal.SIGINT)
        with anyio.fail_after(HANG_SECONDS):
            code, output = await finish(process, seen)
    assert code == EXIT_INTERRUPTED, output
    assert run_id_of(output) == run_id
    async with Landscape.connect(landscape_url(tmp_path)) as landscape:
        run = await landscape.get_run(run_id)
    assert run is not None
    assert run.status == "interrupted"
    assert 0 < len(read_jsonl(tmp_path / "out" / "errors.jsonl")) < len(rows)
    await verified(tmp_path, run_id)
