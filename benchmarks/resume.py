"""What a crash costs: resuming a killed run, and checkpointing a healthy one.

    python benchmarks/resume.py [--rows 200000] [--repeat 3]

1. **Resume.**  The throughput benchmark's pipeline (three transforms, a gate, two
   JSONL sinks, the full audit in SQLite) reads ``--rows`` rows from a JSONL file
   through the ``ledgerflow`` CLI.  A fresh run is timed; a second run is killed with
   SIGKILL at half that time; ``ledgerflow resume`` finishes it.  Prints the share of
   rows the killed run had not finished, the resume's wall time, and the goal: the
   fresh run's time for that share, plus 10 % (``--repeat`` trials, median ratio).
   Both times include starting Python; the packages are byte-compiled first, as a
   regular install leaves them (an editable install under ``PYTHONDONTWRITEBYTECODE``
   would compile every module on every start).
2. **Checkpoint overhead.**  The same pipeline in this process, alternately with a
   checkpoint every 1,000 rows and with none (``--repeat`` runs each): median rows/s
   of each and the overhead (goal: below 5 %).
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import throughput
import yaml

from engine import Pipeline
from engine._checkpoints import Checkpointer

#: Seconds spent inside ``Checkpointer.write`` (summed by the timed wrapper below).
_CHECKPOINT_SECONDS = [0.0]
_write_checkpoint = Checkpointer.write


def _timed_write(self: Checkpointer, reason: str) -> None:
    started = time.perf_counter()
    try:
        _write_checkpoint(self, reason)
    finally:
        _CHECKPOINT_SECONDS[0] += time.perf_counter() - started


Checkpointer.write = _timed_write  # type: ignore[method-assign]


def write_rows(path: Path, n: int) -> None:
    with path.open("w") as file:
        for row in throughput.synthetic_rows(n):
            file.write(json.dumps(row) + "\n")


def pipeline_config(workdir: Path, data: Path, every_rows: int) -> dict[str, Any]:
    """The throughput benchmark's pipeline, reading ``data`` (a file can be read again)."""
    config = throughput.pipeline_config(0, workdir, workdir / "audit.db")
    config["name"] = "resume-benchmark"
    config["runtime"] = {"checkpoint_every_rows": every_rows, "checkpoint_interval_seconds": 3600}
    config["source"] = {"plugin": "jsonl", "options": {"path": str(data)}, "on_success": "raw"}
    for sink in config["sinks"]:
        sink["plugin"] = "jsonl"  # by name: the CLI reads this config as YAML
    return config


def rows_of(path: Path) -> list[str]:
    """A JSONL file's rows, keys sorted, in sorted order."""
    lines = path.read_text().splitlines()
    return sorted(json.dumps(json.loads(line), sort_keys=True) for line in lines)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


def timed_run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return elapsed


def finished_rows(landscape: Path) -> tuple[str, int]:
    """The run id, and how many of its rows have every token terminal."""
    with sqlite3.connect(landscape) as conn:
        (run_id,) = conn.execute("SELECT run_id FROM runs").fetchone()
        (unfinished,) = conn.execute(
            "SELECT COUNT(DISTINCT tk.row_id) FROM tokens tk WHERE NOT EXISTS ("
            " SELECT 1 FROM token_outcomes o WHERE o.token_id = tk.token_id AND o.is_terminal)"
        ).fetchone()
        (read,) = conn.execute("SELECT COUNT(*) FROM rows").fetchone()
    return run_id, read - unfinished


def settle() -> None:
    """Let the disk write back the previous run's files first (on a small machine the
    writeback of one run's Landscape otherwise slows the next run down)."""
    os.sync()
    time.sleep(2)


def kill_and_resume(n: int, data: Path) -> tuple[float, int, float]:
    """A fresh run's time; a run killed at half that time, its finished rows and its
    resume's time (checking that the resumed sinks hold the fresh run's rows)."""
    with tempfile.TemporaryDirectory() as fresh_dir, tempfile.TemporaryDirectory() as kill_dir:
        fresh, killed = Path(fresh_dir), Path(kill_dir)
        for workdir in (fresh, killed):
            config = pipeline_config(workdir, data, 1000)
            (workdir / "pipeline.yaml").write_text(yaml.safe_dump(config))
        settle()
        fresh_s = timed_run(cli("run", "pipeline.yaml", "--no-progress"), fresh)
        settle()
        process = subprocess.Popen(
            cli("run", "pipeline.yaml", "--no-progress"),
            cwd=killed,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(fresh_s / 2)
        process.send_signal(signal.SIGKILL)
        process.wait()
        run_id, done = finished_rows(killed / "audit.db")
        settle()
        resume_s = timed_run(cli("resume", run_id, "--pipeline", "pipeline.yaml"), killed)
        for name in ("high", "normal"):
            # Rows restored from the Landscape have their keys in canonical order.
            a, b = (rows_of(workdir / f"{name}.jsonl") for workdir in (fresh, killed))
            assert a == b, f"{name}: the resumed run's rows differ"
    return fresh_s, done, resume_s


def resume_cost(n: int, data: Path, repeat: int) -> None:
    ratios = []
    for _ in range(repeat):
        fresh_s, done, resume_s = kill_and_resume(n, data)
        unfinished = (n - done) / n
        goal = fresh_s * unfinished * 1.1
        ratios.append(resume_s / goal)
        print(
            f"fresh {fresh_s:5.2f} s; killed at {fresh_s / 2:5.2f} s with {unfinished:.0%} of "
            f"the rows unfinished; resume {resume_s:5.2f} s (outputs equal); goal {goal:5.2f} s; "
            f"resume / goal {resume_s / goal:.2f}"
        )
    print(
        f"resume / (fresh run's time for the unfinished share + 10%): median "
        f"{statistics.median(ratios):.2f} of {repeat} (goal <= 1; both times from process start)"
    )


async def rows_per_second(data: Path, n: int, every_rows: int) -> tuple[float, float]:
    """Rows/s of one in-process run, and this process's CPU time per row in µs."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pipeline = Pipeline.from_dict(pipeline_config(workdir, data, every_rows))
        cpu = time.process_time()
        start = time.perf_counter()
        result = await pipeline.run()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        assert result.status == "completed"
        with sqlite3.connect(workdir / "audit.db") as conn:
            (checkpoints,) = conn.execute("SELECT COUNT(*) FROM checkpoints").fetchone()
        assert checkpoints >= (n // every_rows), (checkpoints, n, every_rows)
    return n / elapsed, cpu / n * 1e6


def checkpoint_overhead(n: int, data: Path, repeat: int) -> None:
    """Alternating runs with and without checkpoints.  Rows/s on a shared machine swing
    by about as much as the goal allows, so two steadier figures are printed too: the
    engine process's CPU time per row, and the share of the run spent inside
    ``Checkpointer.write`` (a checkpoint is one record in the same group commits)."""
    every: list[tuple[float, float]] = []
    never: list[tuple[float, float]] = []
    direct: list[float] = []
    for _ in range(repeat):
        _CHECKPOINT_SECONDS[0] = 0.0
        every.append(asyncio.run(rows_per_second(data, n, 1000)))
        direct.append(_CHECKPOINT_SECONDS[0] * every[-1][0] / n)  # share of the run's time
        never.append(asyncio.run(rows_per_second(data, n, 10**9)))
    with_cp, without = (statistics.median(rate for rate, _ in runs) for runs in (every, never))
    cpu_cp, cpu_none = (statistics.median(cpu for _, cpu in runs) for runs in (every, never))
    print(f"checkpoint every 1,000 rows: {with_cp:8,.0f} rows/s, {cpu_cp:5.1f} µs CPU/row")
    print(f"no checkpoints:              {without:8,.0f} rows/s, {cpu_none:5.1f} µs CPU/row")
    print(f"  (medians of {repeat} alternating runs)")
    print(
        f"overhead: {1 - with_cp / without:.1%} by rows/s, {cpu_cp / cpu_none - 1:.1%} "
        f"by CPU per row, {statistics.median(direct):.2%} of the run spent writing "
        "checkpoints  (goal < 5%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--only", choices=["resume", "checkpoints"], help="measure one of the two figures"
    )
    args = parser.parse_args()
    os.environ.setdefault("NO_COLOR", "1")
    root = Path(__file__).resolve().parent.parent
    for package in ("engine", "plugins", "landscape"):
        compileall.compile_dir(root / package, quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        write_rows(data, args.rows)
        if args.only != "checkpoints":
            resume_cost(args.rows, data, args.repeat)
        if args.only != "resume":
            checkpoint_overhead(args.rows, data, args.repeat)


if __name__ == "__main__":
    main()
