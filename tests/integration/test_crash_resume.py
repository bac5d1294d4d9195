"""Killing and interrupting the ``ledgerflow`` CLI for real, then resuming the run.

Each trial runs the pipeline of :mod:`tests.integration._crash` in a subprocess, stops
it (``kill -9`` at a random moment, or SIGINT), resumes it with ``ledgerflow resume``
and checks that the sinks hold exactly what an uninterrupted run writes (as multisets
of rows), that ``verify`` passes, and that no LLM answer on record was paid for twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
from collections import Counter
from pathlib import Path

import anyio
import anyio.to_thread
import psutil
import pytest

from landscape import Landscape
from plugins.llm import FixedLatency, MockLlmServer, MockSettings

from ._crash import (
    EXIT_INTERRUPTED,
    ROWS,
    check_audit,
    finish,
    mock_server,
    outputs,
    read_stderr_until,
    reference,
    resume_together,
    run_cli,
    single_run_id,
    start_run,
    started_run,
    successful_calls,
    write_pipeline,
)
from .conftest import run_id_of

TRIALS = int(os.environ.get("LEDGERFLOW_CRASH_TRIALS", "20"))
EXIT_ROW_ERRORS = 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(TRIALS))
async def test_kill_9_at_a_random_moment_then_resume(
    seed: int, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Even trials kill the engine process and resume once; odd ones kill its whole
    process group, as a container runtime would, and start two resumes together."""
    expected, seconds = await reference(tmp_path_factory)
    assert sum(expected["batches"].values()) > 0
    assert sum(expected["negatives"].values()) > 0
    rng = random.Random(seed)
    racing = seed % 2 == 1
    async with mock_server() as server:
        pipeline = write_pipeline(tmp_path, server.base_url)
        process = await start_run(tmp_path, pipeline)
        # From during start-up to about the end of the run.
        await anyio.sleep(rng.uniform(0.05, 0.9) * seconds)
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            if racing:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
        await process.wait()
        await process.aclose()
        at_kill = server.statistics()
        run_id = await single_run_id(tmp_path)
        recorded = await successful_calls(tmp_path)
        if run_id is not None:
            resumes = 2 if racing else 1
            results = await resume_together(tmp_path, pipeline, run_id, resumes)
            if not any("is completed" in output for _, output in results):
                # The kill came before the run ended: one resume finished it, and a
                # second one started with it was refused, naming the owner.
                assert sorted(code for code, _ in results) == [0, 1][:resumes], results
                refused = [output for code, output in results if code == 1]
                assert all("it is being executed by pid" in output for output in refused)
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
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_signal_to_the_process_group_stops_gracefully_and_resume_completes_the_run(
    signum: signal.Signals, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """What a terminal's Ctrl-C, ``docker stop`` or systemd do: every process of the
    group gets the signal, the SQLite writer process included."""
    expected, _ = await reference(tmp_path_factory)
    async with mock_server() as server:
        # The pool batches only at the end, so it holds rows when the signal comes.
        pipeline = write_pipeline(tmp_path, server.base_url, pool_count=10_000)
        process = await start_run(tmp_path, pipeline)
        # Interrupt once rows are flowing: the endpoint's whole window is in flight.
        with anyio.fail_after(60):
            await server.wait_in_flight(8)
        os.killpg(process.pid, signum)
        with anyio.fail_after(10 + 15):  # the drain timeout plus a margin
            code, output = await finish(process)
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
            (checkpoints,) = conn.execute(
                "SELECT COUNT(*) FROM checkpoints WHERE state_json LIKE '%interrupted%'"
            ).fetchone()
        assert "shutdown" in triggers
        assert checkpoints == 1
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
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_second_signal_to_the_process_group_cancels_in_flight_calls_at_once(
    signum: signal.Signals, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with MockLlmServer(MockSettings(seed=7, latency=FixedLatency(60.0)), port=0) as slow:
        port = slow.port
        pipeline = write_pipeline(tmp_path, slow.base_url)
        process = await start_run(tmp_path, pipeline)
        with anyio.fail_after(60):
            await slow.wait_in_flight(8)
        os.killpg(process.pid, signum)
        with anyio.fail_after(30):
            stopping = await read_stderr_until(process, "stopping")
        os.killpg(process.pid, signum)
        # Far below both the answers' 60 s and the 10 s drain timeout.
        with anyio.fail_after(8):
            code, output = await finish(process, stopping)
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


@pytest.mark.timeout(120)
async def test_the_sqlite_writer_process_dies_with_a_killed_engine(tmp_path: Path) -> None:
    async with mock_server(latency=60.0) as slow:
        pipeline = write_pipeline(tmp_path, slow.base_url)
        process = await start_run(tmp_path, pipeline)
        with anyio.fail_after(60):
            await slow.wait_in_flight(8)
        writers = [
            child
            for child in psutil.Process(process.pid).children()
            if "_sqlite_worker" in " ".join(child.cmdline())
        ]
        assert len(writers) == 1
        process.kill()
        await process.wait()
        await process.aclose()
        gone, alive = await anyio.to_thread.run_sync(lambda: psutil.wait_procs(writers, 30))
    assert alive == []
    assert len(gone) == 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(3))
async def test_kill_9_while_calls_are_retried_then_resume_leaves_a_verified_trail(
    seed: int, tmp_path: Path
) -> None:
    """A third of the answers are 500s, so rows are mid-retry when the process dies:
    every attempt's call record must still belong to a node state after the resume."""
    rng = random.Random(seed)
    async with mock_server(latency=0.05, faults={"server_error": 0.3}) as server:
        pipeline = write_pipeline(tmp_path, server.base_url)
        process = await start_run(tmp_path, pipeline)
        run_id, _ = await started_run(process)
        with anyio.fail_after(60):
            await server.wait_in_flight(8)
        await anyio.sleep(rng.uniform(0.0, 1.0))
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            process.kill()
        await finish(process)
        code, output = await run_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
        if "is completed" not in output:
            # Rows whose three attempts all failed went to the error sink: exit code 4.
            assert code in (0, EXIT_ROW_ERRORS), output
    await check_audit(tmp_path, run_id)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        retried = conn.execute("SELECT COUNT(*) FROM calls WHERE attempt > 1").fetchone()[0]
        rows = conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
    assert retried > 0
    assert rows == ROWS


@pytest.mark.timeout(300)
async def test_with_stop_aggregations_hold_stop_and_resume_write_what_an_uninterrupted_run_does(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    expected, _ = await reference(tmp_path_factory)
    async with mock_server() as server:
        pipeline = write_pipeline(tmp_path, server.base_url, runtime="stop_aggregations: hold")
        process = await start_run(tmp_path, pipeline)
        with anyio.fail_after(60):
            await server.wait_in_flight(8)
        os.killpg(process.pid, signal.SIGINT)
        with anyio.fail_after(10 + 15):
            code, output = await finish(process)
        assert code == EXIT_INTERRUPTED, output
        run_id = run_id_of(output)
        await check_audit(tmp_path, run_id)
        with sqlite3.connect(tmp_path / "audit.db") as conn:
            triggers = {r for (r,) in conn.execute("SELECT trigger_reason FROM batches")}
        assert "shutdown" not in triggers
        code, output = await run_cli(tmp_path, "resume", run_id, "--pipeline", str(pipeline))
        assert code == 0, output
    await check_audit(tmp_path, run_id)
    assert outputs(tmp_path) == expected
