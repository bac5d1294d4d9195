"""Time of ``diff_runs`` on two runs of a gate pipeline that differ in the threshold.

    python benchmarks/diff.py [--rows 100000] [--repeat 5]

Runs the same pipeline (source -> compute -> gate ``score > threshold`` -> two JSONL
sinks) twice into one SQLite Landscape, with thresholds 0.8 and 0.7, so that a known
share of the rows (scores in (0.7, 0.8]: 10 %) is routed to the other sink.  Then times
``diff_runs`` (the median of ``--repeat``): with the CLI's default limit (counts of every
row, the first 50 differing rows analysed) and with no limit (every differing row
analysed), and prints rows, differing rows and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine import Pipeline
from landscape import Landscape, diff_runs

THRESHOLDS = (0.8, 0.7)


def synthetic_rows(n: int) -> Iterator[dict[str, Any]]:
    """``n`` rows whose scores cycle through 0.00 ... 0.99, generated lazily."""
    for i in range(n):
        yield {"id": i, "customer": f"customer-{i % 997}", "score": (i * 37 % 100) / 100.0}


def pipeline_config(n: int, threshold: float, out: Path, url: str) -> dict[str, Any]:
    return {
        "name": "diff-benchmark",
        "landscape": {"url": url},
        "source": {"plugin": "memory", "options": {"rows": synthetic_rows(n)}, "on_success": "raw"},
        "transforms": [
            {
                "name": "enrich",
                "plugin": "compute",
                "input": "raw",
                "on_success": "scored",
                "options": {"fields": {"pct": "round(row['score'] * 100)"}},
            }
        ],
        "gates": [
            {
                "name": "risk",
                "input": "scored",
                "condition": f"row['score'] > {threshold}",
                "routes": {"true": "high", "false": "normal"},
            }
        ],
        "sinks": [
            {"name": name, "plugin": "jsonl", "options": {"path": str(out / f"{name}.jsonl")}}
            for name in ("high", "normal")
        ],
    }


async def record_runs(n: int, workdir: Path, url: str) -> tuple[str, str]:
    """The ids of the two runs, one per threshold."""
    ids = []
    for threshold in THRESHOLDS:
        out = workdir / str(threshold)
        out.mkdir()
        result = await Pipeline.from_dict(pipeline_config(n, threshold, out, url)).run()
        assert result.status == "completed", result
        ids.append(result.run_id)
    return ids[0], ids[1]


async def time_diff(url: str, run_a: str, run_b: str, limit: int | None) -> tuple[float, int]:
    """Seconds of one ``diff_runs`` and the differing rows it counted."""
    async with Landscape.connect(url) as landscape:
        start = time.perf_counter()
        diff = await diff_runs(landscape, run_a, run_b, limit=limit)
        elapsed = time.perf_counter() - start
    assert limit is None or len(diff.rows) == min(limit, diff.counts.different)
    return elapsed, diff.counts.different


def measure(n: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        url = f"sqlite+aiosqlite:///{workdir / 'audit.db'}"
        start = time.perf_counter()
        run_a, run_b = asyncio.run(record_runs(n, workdir, url))
        print(f"rows: {n:,} per run (both recorded in {time.perf_counter() - start:.1f} s)")
        for label, limit in (("limit 50 (CLI default)", 50), ("no limit", None)):
            timings = [asyncio.run(time_diff(url, run_a, run_b, limit)) for _ in range(repeat)]
            seconds = statistics.median(t for t, _ in timings)
            different = timings[0][1]
            print(
                f"diff, {label:<22}: {seconds:6.2f} s  "
                f"({different:,} differing rows, median of {repeat})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    measure(args.rows, args.repeat)


if __name__ == "__main__":
    main()
