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
from tests._read import read_jsonl

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


async def wait_for_batches(work: Path, status: str, count: int) -> None:
    """Until ``count`` batches are on record as ``status`` (the other process writes them)."""
    with anyio.fail_after(60):
        while batches_with(work, status) < count:  # noqa: ASYNC110 (another process)
            await anyio.sleep(0.05)


def batches_with(work: Path, status: str) -> int:
    if not (work / "audit.db").exists():
        return 0
    with sqlite3.connect(work / "audit.db") as conn:
        try:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM batches WHERE status = ?", (status,)
            ).fetchone()
        except sqlite3.OperationalError:  # the tables are not there yet
            return 0
    return int(n)


async def check_finished(work: Path, run_id: str, rows: int, *, attempts: int = 1) -> None:
    """Every row went through, the run is complete and verified, each batch ended after
    ``attempts`` attempts with its own job, and each row's answer was recorded once."""
    done = read_jsonl(work / "out" / "done.jsonl")
    assert sorted(row["id"] for row in done) == list(range(rows))
    url = f"sqlite+aiosqlite:///{work / 'audit.db'}"
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(run_id)
        run = await landscape.get_run(run_id)
    assert report.ok, [str(v) for v in report.violations]
    assert run is not None
    assert run.status == "completed"
    with sqlite3.connect(work / "audit.db") as conn:
        batches = conn.execute(
            "SELECT status, external_job_id FROM batches WHERE attempt = ?", (attempts,)
        ).fetchall()
        answers = conn.execute(
            "SELECT COUNT(*) FROM calls WHERE call_type = 'llm_batch' AND status = 'success'"
        ).fetchone()
    assert {status for status, _ in batches} == {"completed"}
    assert all(job for _, job in batches)
    assert len({job for _, job in batches}) == len(batches)
    assert answers == (rows,)


@pytest.mark.timeout(120)
async def test_kill_9_while_a_job_is_pending_then_resume_attaches_to_the_same_job(
    tmp_path: Path,
) -> None:
    async with MockLlmServer(MockSettings(seed=3, batch_delay_seconds=3.0)) as server:
        pipeline = write_pipeline(tmp_path, server.base_url, rows=10)
        process = await start_run(tmp_path, pipeline)
        await wait_for_batches(tmp_path, "pending", 1)
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
        await wait_for_batches(tmp_path, "pending", 2)
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


#: An llm_batch that, once its job is started, "crashes" before the job id is on record:
#: it tells the test (a marker file) and hangs until killed, unless CRASHY_OFF is set.
CRASHY = """
import os
from pathlib import Path

import anyio

from plugins.llm import LlmBatchAggregation


class CrashyBatch(LlmBatchAggregation):
    async def submit(self, rows, ctx):
        job = await super().submit(rows, ctx)
        if not os.environ.get("CRASHY_OFF"):
            Path("job-started").write_text(str(job))
            await anyio.sleep_forever()
        return job
"""


@pytest.mark.timeout(120)
async def test_a_job_started_but_not_yet_on_record_is_found_again_not_resubmitted(
    tmp_path: Path,
) -> None:
    async with MockLlmServer(MockSettings(seed=5, batch_delay_seconds=0.5)) as server:
        pipeline = write_pipeline(tmp_path, server.base_url, rows=10)
        (tmp_path / "crashy.py").write_text(CRASHY)
        pipeline.write_text(
            pipeline.read_text().replace("plugin: llm_batch", 'plugin: "crashy:CrashyBatch"')
        )
        process = await start_run(tmp_path, pipeline)
        await wait_for_batches(tmp_path, "executing", 1)
        with anyio.fail_after(60):
            while not (tmp_path / "job-started").exists():  # noqa: ASYNC110 (another process)
                await anyio.sleep(0.05)
        process.kill()
        await process.wait()
        await process.aclose()
        job_id = (tmp_path / "job-started").read_text()
        with sqlite3.connect(tmp_path / "audit.db") as conn:
            jobs = conn.execute("SELECT external_job_id FROM batches").fetchall()
        assert jobs == [(None,)]  # the provider has it; the record does not
        run_id = await single_run_id(tmp_path)
        assert run_id is not None
        code, output = await run_cli(
            tmp_path, "resume", run_id, "--pipeline", str(pipeline), env={"CRASHY_OFF": "1"}
        )
        assert code == 0, output
        stats = server.statistics()
    assert stats.batches_created == 1
    await check_finished(tmp_path, run_id, rows=10, attempts=2)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        attempts = conn.execute(
            "SELECT attempt, status, external_job_id FROM batches ORDER BY attempt"
        ).fetchall()
    assert attempts == [(1, "failed", None), (2, "completed", job_id)]
