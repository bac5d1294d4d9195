"""Two processes on one run, raced the way operators and schedulers race them.

A resume started while the run is still executing, two resumes started together after a
``kill -9``, and an owner frozen (SIGSTOP) long enough for its lease to run out: each on
the SQLite and the PostgreSQL Landscape, each checked by what the sinks hold (exactly
an uninterrupted run's rows) and by ``verify``.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import anyio
import pytest

from landscape import Landscape

from ._crash import (
    check_audit,
    finish,
    mock_server,
    outputs,
    reference,
    resume_together,
    start_cli,
    start_run,
    started_run,
    write_pipeline,
)


async def run_status(url: str, run_id: str) -> str:
    async with Landscape.connect(url, create=False) as landscape:
        run = await landscape.get_run(run_id)
    assert run is not None
    return run.status


@pytest.mark.timeout(300)
async def test_a_resume_of_a_run_still_executing_is_refused_naming_its_owner(
    landscape_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected, _ = await reference(tmp_path_factory)
    # Slow answers: the run takes about 15 s, long enough to race.
    async with mock_server(latency=0.5) as server:
        pipeline = write_pipeline(tmp_path, server.base_url, landscape=landscape_url)
        process = await start_run(tmp_path, pipeline)
        run_id, printed = await started_run(process)
        with anyio.fail_after(60):
            await server.wait_in_flight(8)
        second = await start_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
        code, refusal = await finish(second)
        assert code == 1, refusal
        assert f"cannot resume run {run_id}: it is being executed by pid {process.pid}" in refusal
        assert await run_status(landscape_url, run_id) == "running"
        code, output = await finish(process, printed)
    assert code == 0, output
    assert outputs(tmp_path) == expected
    await check_audit(tmp_path, run_id, landscape_url)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("trial", range(2))
async def test_of_two_resumes_racing_after_a_crash_one_finishes_the_run_and_one_is_refused(
    trial: int, landscape_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected, _ = await reference(tmp_path_factory)
    async with mock_server(latency=0.05) as server:
        pipeline = write_pipeline(tmp_path, server.base_url, landscape=landscape_url)
        process = await start_run(tmp_path, pipeline)
        run_id, _ = await started_run(process)
        with anyio.fail_after(60):
            await server.wait_in_flight(8)
        process.kill()
        await finish(process)
        # The killed process's lease is still fresh, but this machine sees it ended.
        assert await run_status(landscape_url, run_id) == "crashed"
        results = await resume_together(tmp_path, pipeline, run_id, 2)
    codes = Counter(code for code, _ in results)
    assert codes == {0: 1, 1: 1}, results
    refusal = next(output for code, output in results if code == 1)
    assert f"cannot resume run {run_id}: it is being executed by pid" in refusal
    assert outputs(tmp_path) == expected
    await check_audit(tmp_path, run_id, landscape_url)
    assert await run_status(landscape_url, run_id) == "completed"


@pytest.mark.timeout(300)
async def test_an_owner_frozen_past_its_lease_loses_the_run_and_writes_nothing_more(
    landscape_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGSTOP stands for a process that stops beating without dying (a paused VM, a
    hung event loop).  Its lease runs out; a resume takes the run over, but the frozen
    process still holds its sink files, so the resume refuses to write them; woken,
    the old owner finds it lost the run and stops before writing anything; a last
    resume finishes the run exactly."""
    expected, _ = await reference(tmp_path_factory)
    async with mock_server(latency=0.05) as server:
        pipeline = write_pipeline(
            tmp_path,
            server.base_url,
            landscape=landscape_url,
            runtime="heartbeat_seconds: 0.2, lease_seconds: 1.0",
        )
        frozen = await start_run(tmp_path, pipeline)
        run_id, printed = await started_run(frozen)
        with anyio.fail_after(60):
            await server.wait_in_flight(8)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            await anyio.sleep(1.5)  # longer than the lease: it runs out
            assert await run_status(landscape_url, run_id) == "crashed"
            taker = await start_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
            code, output = await finish(taker)
            assert code == 1, output
            assert "another process is writing it" in output
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        with anyio.fail_after(60):
            code, output = await finish(frozen, printed)
        assert code == 1, output
        assert "another process took the run over" in output
        last = await start_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
        code, output = await finish(last)
        assert code == 0, output
    assert outputs(tmp_path) == expected
    await check_audit(tmp_path, run_id, landscape_url)
