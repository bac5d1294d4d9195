"""Provider batch jobs across ``kill -9`` and SIGINT: the ``ledgerflow`` CLI in a real
subprocess against the mock server's batch API; a resume waits for the job on record
and never submits it again."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import anyio
import pytest

from landscape import Landscape
from plugins.llm import MockLlmServer, MockSettings

from .conftest import run_id_of
from .test_crash_resume import run_cli, single_run_id, start_run

EXIT_INTERRUPTED = 3

PIPELINE = """
name: batch-jobs
landscape: {{url: "sqlite+aiosqlite:///{landscape}"}}
runtime: {{drain_timeout_seconds: 1}}
endpoints:
  mock:
    base_url: "{base_url}"
    timeout_seconds: 10
    backoff: {{initial_seconds: 0.05, max_seconds: 0.2}}
source:
  plugin: jsonl
  options: {{path: data.jsonl}}
  on_success: texts
aggregations:
  - name: classify
    plugin: llm_batch
    input: texts
    on_success: done
    on_error: errors
    output_mode: passthrough
    trigger: {{count: 10}}
    options:
      endpoint: mock
      model: mock-small
      prompt: "Classify: {{{{ row.text }}}}"
      response_format: json
      poll_interval_seconds: 0.1
      max_poll_interval_seconds: 0.5
sinks:
  - {{name: done, plugin: jsonl, options: {{path: out/done.jsonl}}}}
  - {{name: errors, plugin: jsonl, options: {{path: out/errors.jsonl}}}}
"""


def write_pipeline(work: Path, base_url: str, rows: int) -> Path:
    with (work / "data.jsonl").open("w") as data:
        for i in range(rows):
            data.write(json.dumps({"id": i, "text": f"ticket {i}"}) + "\n")
    path = work / "pipeline.yaml"
    path.write_text(PIPELINE.format(landscape=work / "audit.db", base_url=base_url))
    return path


async def wait_for_pending_jobs(work: Path, count: int) -> None:
    """Until ``count`` batches are on record as pending (the other process writes them)."""
    with anyio.fail_after(60):
        while True:
            if (work / "audit.db").exists():
                with sqlite3.connect(work / "audit.db") as conn:
                    try:
                        (n,) = conn.execute(
                            "SELECT COUNT(*) FROM batches WHERE status = 'pending'"
                        ).fetchone()
                    except sqlite3.OperationalError:  # the tables are not there yet
                        n = 0
                if n >= count:
                    return
            await anyio.sleep(0.05)


async def check_finished(work: Path, run_id: str, rows: int) -> None:
    done = [json.loads(line) for line in (work / "out" / "done.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in done) == list(range(rows))
    url = f"sqlite+aiosqlite:///{work / 'audit.db'}"
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(run_id)
        run = await landscape.get_run(run_id)
    assert report.ok, [str(v) for v in report.violations]
    assert run is not None
    assert run.status == "completed"
    with sqlite3.connect(work / "audit.db") as conn:
        batches = conn.execute("SELECT status, external_job_id FROM batches").fetchall()
        answers = conn.execute(
            "SELECT COUNT(*) FROM calls WHERE call_type = 'llm_batch' AND status = 'success'"
        ).fetchone()
    assert {status for status, _ in batches} == {"completed"}
    assert len({job for _, job in batches}) == len(batches)
    assert answers == (rows,)


@pytest.mark.timeout(120)
async def test_kill_9_while_a_job_is_pending_then_resume_attaches_to_the_same_job(
    tmp_path: Path,
) -> None:
    async with MockLlmServer(MockSettings(seed=3, batch_delay_seconds=3.0)) as server:
        pipeline = write_pipeline(tmp_path, server.base_url, rows=10)
        process = await start_run(tmp_path, pipeline)
        await wait_for_pending_jobs(tmp_path, 1)
        process.kill()
        await process.wait()
        await process.aclose()
        run_id = await single_run_id(tmp_path)
        assert run_id is not None
        code, output = await run_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
        assert code == 0, output
        stats = server.statistics()
    assert stats.batches_created == 1
    assert stats.batch_requests_answered == 10
    await check_finished(tmp_path, run_id, rows=10)


@pytest.mark.timeout(120)
async def test_sigint_checkpoints_pending_jobs_without_waiting_for_them(tmp_path: Path) -> None:
    async with MockLlmServer(MockSettings(seed=4, batch_delay_seconds=4.0)) as server:
        pipeline = write_pipeline(tmp_path, server.base_url, rows=20)
        process = await start_run(tmp_path, pipeline)
        await wait_for_pending_jobs(tmp_path, 2)
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(1 + 10):  # the drain timeout plus a margin, not the jobs' 4 s
            code = await process.wait()
        assert process.stdout is not None
        output = b""
        async for chunk in process.stdout:
            output += chunk
        await process.aclose()
        assert code == EXIT_INTERRUPTED, output.decode()
        run_id = run_id_of(output.decode())
        with sqlite3.connect(tmp_path / "audit.db") as conn:
            pending = conn.execute(
                "SELECT COUNT(*) FROM node_states WHERE status = 'pending' "
                "AND external_job_id IS NOT NULL"
            ).fetchone()
            (state,) = conn.execute(
                "SELECT state_json FROM checkpoints ORDER BY created_at DESC LIMIT 1"
            ).fetchone()
        assert pending == (2,)
        assert len(json.loads(state)["pending_jobs"]) == 2
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
        async with Landscape.connect(url) as landscape:
            report = await landscape.verify(run_id)
        assert report.ok, [str(v) for v in report.violations]
        code, out = await run_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
        assert code == 0, out
        stats = server.statistics()
    assert stats.batches_created == 2
    await check_finished(tmp_path, run_id, rows=20)
