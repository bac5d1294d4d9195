"""Killing and interrupting the ``ledgerflow`` CLI for real, then resuming the run.

Each trial runs the same pipeline — an LLM transform against the project's mock server,
a fork/coalesce, a routing gate, a count aggregation, three JSONL sinks and a database
sink — in a subprocess, stops it (``kill -9`` at a random moment, or SIGINT), resumes
it with ``ledgerflow resume`` and checks that the sinks hold exactly what an
uninterrupted run writes (as multisets of rows), that ``verify`` passes, and that no
LLM answer on record was paid for twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from landscape import Landscape
from plugins.llm import FixedLatency, MockLlmServer, MockSettings

from .conftest import run_id_of

ROWS = 240
TRIALS = int(os.environ.get("LEDGERFLOW_CRASH_TRIALS", "20"))
EXIT_INTERRUPTED = 3

PIPELINE = """
name: crash-resume
landscape: {{url: "sqlite+aiosqlite:///{landscape}"}}
runtime: {{checkpoint_every_rows: 25, drain_timeout_seconds: 10}}
endpoints:
  mock:
    provider: openai
    base_url: "{base_url}"
    max_in_flight: 8
    timeout_seconds: 10
    max_attempts: 3
    backoff: {{initial_seconds: 0.05, max_seconds: 0.5}}
source:
  plugin: jsonl
  options: {{path: data.jsonl}}
  on_success: texts
transforms:
  - name: classify
    plugin: llm
    input: texts
    on_success: classified
    on_error: errors
    concurrency: 8
    options:
      endpoint: mock
      model: mock-small
      prompt: "Classify the sentiment of: {{{{ row.text }}}}"
      response_format: json_schema
      json_schema:
        type: object
        properties:
          label: {{type: string, enum: [positive, negative, neutral, unclear]}}
          score: {{type: number}}
        required: [label, score]
  - name: measure
    plugin: compute
    input: facts_in
    on_success: facts_out
    options: {{fields: {{text_len: "len(row['text'])"}}}}
  - name: rate
    plugin: compute
    input: scores_in
    on_success: scores_out
    options: {{fields: {{score_pct: "round(row['score'] * 100)"}}}}
gates:
  - name: both
    input: classified
    fork_to: {{facts: facts_in, scores: scores_in}}
  - name: route
    input: joined
    condition: "row['label']"
    routes: {{positive: positive, negative: negatives, neutral: pool, unclear: pool}}
coalesce:
  - name: join
    branches: {{facts: facts_out, scores: scores_out}}
    policy: require_all
    merge: union
    on_success: joined
aggregations:
  - name: pooled
    plugin: collect
    input: pool
    trigger: {{count: {pool_count}}}
    options: {{field: members}}
    on_success: batches
sinks:
  - {{name: positive, plugin: jsonl, options: {{path: out/positive.jsonl}}, batch_size: 7}}
  - {{name: batches, plugin: jsonl, options: {{path: out/batches.jsonl}}, batch_size: 3}}
  - {{name: errors, plugin: jsonl, options: {{path: out/errors.jsonl}}}}
  - name: negatives
    plugin: database
    options: {{url: "sqlite+aiosqlite:///{database}", table: negatives}}
    batch_size: 5
"""


def write_pipeline(work: Path, base_url: str, *, pool_count: int = 5) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    with (work / "data.jsonl").open("w") as data:
        for i in range(ROWS):
            data.write(json.dumps({"id": i, "text": f"ticket {i}: " + "words " * (i % 7)}) + "\n")
    path = work / "pipeline.yaml"
    path.write_text(
        PIPELINE.format(
            landscape=work / "audit.db",
            database=work / "out" / "negatives.db",
            base_url=base_url,
            pool_count=pool_count,
        )
    )
    return path


def outputs(work: Path) -> dict[str, Counter[str]]:
    """Each sink's rows as a multiset of canonical JSON lines (the database without token ids)."""
    found: dict[str, Counter[str]] = {}
    for name in ("positive", "batches", "errors"):
        path = work / "out" / f"{name}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        found[name] = Counter(json.dumps(json.loads(line), sort_keys=True) for line in lines)
    database = work / "out" / "negatives.db"
    rows: Counter[str] = Counter()
    if database.exists():
        with sqlite3.connect(database) as conn:
            conn.row_factory = sqlite3.Row
            for row in conn.execute("SELECT * FROM negatives"):
                data = {k: row[k] for k in row.keys() if k != "token_id"}  # noqa: SIM118
                rows[json.dumps(data, sort_keys=True)] += 1
    found["negatives"] = rows
    return found


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


async def start_run(work: Path, pipeline: Path) -> Process:
    """``ledgerflow run PIPELINE --no-progress`` started in ``work`` (not awaited)."""
    env = {**os.environ, "NO_COLOR": "1"}
    return await anyio.open_process(
        cli_command("run", str(pipeline), "--no-progress"), cwd=work, env=env
    )


async def run_cli(work: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``ledgerflow ARGS`` in ``work`` (with ``env`` added); exit code and output."""
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "160", **(env or {})}
    done = await anyio.run_process(cli_command(*args), cwd=work, env=full_env, check=False)
    output = done.stdout.decode() + done.stderr.decode()
    return done.returncode, output


async def single_run_id(work: Path) -> str | None:
    url = f"sqlite+aiosqlite:///{work / 'audit.db'}"
    if not (work / "audit.db").exists():
        return None
    async with Landscape.connect(url) as landscape:
        runs = await landscape.list_runs()
    assert len(runs) <= 1
    return runs[0].run_id if runs else None


async def check_audit(work: Path, run_id: str) -> None:
    """``verify`` passes, and no request has two successful calls on record."""
    url = f"sqlite+aiosqlite:///{work / 'audit.db'}"
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(run_id)
        assert report.ok, [str(v) for v in report.violations]
    with sqlite3.connect(work / "audit.db") as conn:
        paid_twice = conn.execute(
            "SELECT request_hash, COUNT(*) FROM calls WHERE status = 'success' "
            "GROUP BY request_hash HAVING COUNT(*) > 1"
        ).fetchall()
    assert paid_twice == []


def successful_calls(work: Path) -> int:
    if not (work / "audit.db").exists():
        return 0
    with sqlite3.connect(work / "audit.db") as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM calls WHERE status = 'success'").fetchone()
    return int(count)


_REFERENCE: dict[str, Any] = {}


async def reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Counter[str]], float]:
    """The outputs and wall time of one uninterrupted run (computed once per session)."""
    if not _REFERENCE:
        work = tmp_path_factory.mktemp("reference")
        async with mock_server() as server:
            pipeline = write_pipeline(work, server.base_url)
            started = anyio.current_time()
            code, output = await run_cli(work, "run", str(pipeline), "--no-progress")
            elapsed = anyio.current_time() - started
        assert code == 0, output
        await check_audit(work, run_id_of(output))
        _REFERENCE.update(outputs=outputs(work), seconds=elapsed)
    return _REFERENCE["outputs"], _REFERENCE["seconds"]


def mock_server() -> MockLlmServer:
    return MockLlmServer(MockSettings(seed=7, latency=FixedLatency(0.02)), port=0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(TRIALS))
async def test_kill_9_at_a_random_moment_then_resume(
    seed: int, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected, seconds = await reference(tmp_path_factory)
    assert sum(expected["batches"].values()) > 0
    assert sum(expected["negatives"].values()) > 0
    rng = random.Random(seed)
    async with mock_server() as server:
        pipeline = write_pipeline(tmp_path, server.base_url)
        process = await start_run(tmp_path, pipeline)
        # From during start-up to about the end of the run.
        await anyio.sleep(rng.uniform(0.05, 0.9) * seconds)
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            process.kill()
        await process.wait()
        await process.aclose()
        at_kill = server.statistics()
        run_id = await single_run_id(tmp_path)
        recorded = successful_calls(tmp_path)
        if run_id is not None:
            code, output = await run_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
            if "is completed" not in output:  # else the kill came after the run ended
                assert code == 0, output
        else:  # killed before the run was on record: a new run is the way on
            code, output = await run_cli(tmp_path, "run", str(pipeline), "--no-progress")
            assert code == 0, output
            run_id = run_id_of(output)
        stats = server.statistics()
    assert outputs(tmp_path) == expected
    await check_audit(tmp_path, run_id)
    # An answer on record is never asked for again.  Answers the killed process was
    # sent but never committed (in flight, or queued for the Landscape) are lost with
    # it: only those may be asked again.
    lost = at_kill.prompts_answered + at_kill.repeated_answers - recorded
    assert stats.repeated_answers <= lost


@pytest.mark.timeout(300)
async def test_sigint_stops_gracefully_and_resume_completes_the_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected, _ = await reference(tmp_path_factory)
    async with mock_server() as server:
        # The pool batches only at the end, so it holds rows when the signal comes.
        pipeline = write_pipeline(tmp_path, server.base_url, pool_count=10_000)
        process = await start_run(tmp_path, pipeline)
        # Interrupt once rows are flowing: the endpoint's whole window is in flight.
        with anyio.fail_after(60):
            await server.wait_in_flight(8)
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10 + 15):  # the drain timeout plus a margin
            code = await process.wait()
        assert process.stdout is not None
        output = b""
        async for chunk in process.stdout:
            output += chunk
        await process.aclose()
        output = output.decode()
        assert code == EXIT_INTERRUPTED, output
        run_id = run_id_of(output)
        assert f"ledgerflow resume {run_id} --pipeline" in output
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
        async with Landscape.connect(url) as landscape:
            run = await landscape.get_run(run_id)
            report = await landscape.verify(run_id)
        assert run is not None
        assert run.status == "interrupted"
        assert report.ok, [str(v) for v in report.violations]
        assert report.watermark is not None
        with sqlite3.connect(tmp_path / "audit.db") as conn:
            triggers = {r for (r,) in conn.execute("SELECT trigger_reason FROM batches")}
        assert "shutdown" in triggers
        code, output = await run_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
        assert code == 0, output
    await check_audit(tmp_path, run_id)
    resumed = outputs(tmp_path)
    # Everything but the shutdown batch's summary is as an uninterrupted run writes it.
    assert resumed["positive"] == expected["positive"]
    assert resumed["negatives"] == expected["negatives"]
    members = Counter(
        json.dumps(member, sort_keys=True)
        for line in resumed["batches"].elements()
        for member in json.loads(line)["members"]
    )
    expected_members = Counter(
        json.dumps(member, sort_keys=True)
        for line in expected["batches"].elements()
        for member in json.loads(line)["members"]
    )
    assert members == expected_members


@pytest.mark.timeout(300)
async def test_a_second_sigint_cancels_in_flight_calls_at_once(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with MockLlmServer(MockSettings(seed=7, latency=FixedLatency(60.0)), port=0) as slow:
        port = slow.port
        pipeline = write_pipeline(tmp_path, slow.base_url)
        process = await start_run(tmp_path, pipeline)
        with anyio.fail_after(60):
            await slow.wait_in_flight(8)
        process.send_signal(signal.SIGINT)
        await anyio.sleep(0.5)
        process.send_signal(signal.SIGINT)
        # Far below both the answers' 60 s and the 10 s drain timeout.
        with anyio.fail_after(8):
            code = await process.wait()
        assert process.stdout is not None
        output = b"".join([chunk async for chunk in process.stdout]).decode()
        await process.aclose()
    assert code == EXIT_INTERRUPTED, output
    run_id = run_id_of(output)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        cancelled = conn.execute(
            "SELECT COUNT(*) FROM node_states WHERE node_id = 'classify' AND status = 'cancelled'"
        ).fetchone()[0]
        (open_states,) = conn.execute(
            "SELECT COUNT(*) FROM node_states WHERE status = 'open'"
        ).fetchone()
    assert cancelled == 8
    assert open_states == 0
    await check_audit(tmp_path, run_id)
    # The endpoint answers promptly again (same address): the resume re-does the 8 rows.
    fast = MockLlmServer(MockSettings(seed=7, latency=FixedLatency(0.02)), port=port)
    async with fast:
        code, output = await run_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
    assert code == 0, output
    await check_audit(tmp_path, run_id)
    expected, _ = await reference(tmp_path_factory)
    assert outputs(tmp_path) == expected
