"""The pipeline and helpers of the crash, signal and race tests: the CLI for real.

The pipeline — an LLM transform against the project's mock server, a fork/coalesce, a
routing gate, a count aggregation, three JSONL sinks and a database sink — runs as a
``ledgerflow`` subprocess in a session of its own, so that a test can signal its whole
process group as a terminal, Docker or Kubernetes would.  :func:`outputs` reads what
the sinks hold (as multisets of rows), :func:`check_audit` runs ``verify`` and checks
that no LLM answer on record was paid for twice, and :func:`reference` is the outputs
of one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from sqlalchemy import func, select

from landscape import Landscape, LandscapeNotFound
from landscape import _schema as t
from plugins.llm import FixedLatency, MockLlmServer, MockSettings

from .conftest import run_id_of

ROWS = 240
EXIT_INTERRUPTED = 3

PIPELINE = """
name: crash-resume
landscape: {{url: "{landscape}"}}
runtime: {{checkpoint_every_rows: 25, drain_timeout_seconds: 10{runtime}}}
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


def sqlite_landscape(work: Path) -> str:
    """The Landscape a trial in ``work`` writes unless told otherwise."""
    return f"sqlite+aiosqlite:///{work / 'audit.db'}"


def write_pipeline(
    work: Path,
    base_url: str,
    *,
    pool_count: int = 5,
    runtime: str = "",
    landscape: str | None = None,
) -> Path:
    """The pipeline file and its data in ``work``; ``runtime`` adds ``key: value`` pairs
    to its ``runtime`` block; ``landscape`` is its URL (default :func:`sqlite_landscape`)."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / "data.jsonl").open("w") as data:
        for i in range(ROWS):
            data.write(json.dumps({"id": i, "text": f"ticket {i}: " + "words " * (i % 7)}) + "\n")
    path = work / "pipeline.yaml"
    path.write_text(
        PIPELINE.format(
            landscape=landscape or sqlite_landscape(work),
            database=work / "out" / "negatives.db",
            base_url=base_url,
            pool_count=pool_count,
            runtime=f", {runtime}" if runtime else "",
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


async def start_cli(work: Path, *args: str) -> Process:
    """``ledgerflow ARGS`` started in ``work`` (not awaited), in a session of its own:
    its process group is its own, and signalling it reaches nothing else."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "160"}
    return await anyio.open_process(cli_command(*args), cwd=work, env=env, start_new_session=True)


async def start_run(work: Path, pipeline: Path) -> Process:
    """``ledgerflow run PIPELINE --no-progress`` started in ``work`` (not awaited)."""
    return await start_cli(work, "run", str(pipeline), "--no-progress")


async def read_stderr_until(process: Process, text: str) -> bytes:
    """Read ``process``'s stderr until ``text`` appears in it; what was read."""
    assert process.stderr is not None
    seen = b""
    async for chunk in process.stderr:
        seen += chunk
        if text.encode() in seen:
            return seen
    raise AssertionError(f"the process ended without printing {text!r}: {seen.decode()}")


async def started_run(process: Process) -> tuple[str, bytes]:
    """The id of the run ``process`` (``ledgerflow run`` or ``resume``) announced on
    stderr when it began, and what it had printed there so far."""
    seen = await read_stderr_until(process, " (pid ")
    found = re.search(r"(?:starting|resuming) run (\S+) \(pid ", seen.decode())
    assert found is not None, seen
    return found.group(1), seen


async def finish(process: Process, stderr_read: bytes = b"") -> tuple[int, str]:
    """Wait for ``process`` to end; its exit code and its output (stdout, then stderr,
    after ``stderr_read``: what :func:`read_stderr_until` took of it already)."""
    assert process.stdout is not None
    assert process.stderr is not None
    chunks: dict[str, list[bytes]] = {"out": [], "err": [stderr_read]}

    async def drain(stream: Any, into: list[bytes]) -> None:
        async for chunk in stream:
            into.append(chunk)

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain, process.stdout, chunks["out"])
        tg.start_soon(drain, process.stderr, chunks["err"])
        code = await process.wait()
    await process.aclose()
    return code, b"".join(chunks["out"] + chunks["err"]).decode()


async def resume_together(
    work: Path, pipeline: Path, run_id: str, count: int
) -> list[tuple[int, str]]:
    """``count`` ``ledgerflow resume`` processes started at once; each exit code and output."""
    processes = [
        await start_cli(work, "resume", run_id, "--pipeline", str(pipeline)) for _ in range(count)
    ]
    results: list[tuple[int, str]] = [(-1, "")] * count

    async def wait(i: int) -> None:
        results[i] = await finish(processes[i])

    with anyio.fail_after(240):
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(wait, i)
    return results


async def run_cli(work: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``ledgerflow ARGS`` in ``work`` (with ``env`` added); exit code and output."""
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "160", **(env or {})}
    done = await anyio.run_process(cli_command(*args), cwd=work, env=full_env, check=False)
    output = done.stdout.decode() + done.stderr.decode()
    return done.returncode, output


async def single_run_id(work: Path, url: str | None = None) -> str | None:
    """The one run in the trial's Landscape, if the killed process recorded it."""
    try:
        async with Landscape.connect(url or sqlite_landscape(work), create=False) as landscape:
            runs = await landscape.list_runs()
    except LandscapeNotFound:
        return None
    assert len(runs) <= 1
    return runs[0].run_id if runs else None


async def check_audit(work: Path, run_id: str, url: str | None = None) -> None:
    """``verify`` passes, and no request has two successful calls on record."""
    calls = t.calls
    paid_twice_query = (
        select(calls.c.request_hash, func.count())
        .where(calls.c.status == "success")
        .group_by(calls.c.request_hash)
        .having(func.count() > 1)
    )
    async with Landscape.connect(url or sqlite_landscape(work)) as landscape:
        report = await landscape.verify(run_id)
        assert report.ok, [str(v) for v in report.violations]
        async with landscape.engine.connect() as conn:
            paid_twice = list(await conn.execute(paid_twice_query))
    assert paid_twice == []


async def successful_calls(work: Path, url: str | None = None) -> int:
    """How many answered calls the trial's Landscape holds."""
    query = select(func.count()).where(t.calls.c.status == "success")
    try:
        async with (
            Landscape.connect(url or sqlite_landscape(work), create=False) as landscape,
            landscape.engine.connect() as conn,
        ):
            return int((await conn.execute(query)).scalar_one())
    except LandscapeNotFound:
        return 0


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


def mock_server(latency: float = 0.02, **settings: Any) -> MockLlmServer:
    """The mock endpoint every trial talks to (the same seed: the same answers)."""
    return MockLlmServer(MockSettings(seed=7, latency=FixedLatency(latency), **settings), port=0)
