"""Throughput of fork -> coalesce -> aggregation with the full audit, next to the linear
pipeline of ``throughput.py``, measured in the same process.

    python benchmarks/join_aggregate.py [--rows 100000] [--repeat 3] [--rss]

The join pipeline: a memory source, a fork gate into two branches, one ``compute``
transform per branch, a ``require_all`` coalesce (``union`` merge), a ``batch_stats``
aggregation flushing every 100 rows, and a JSONL sink — every token, state, batch and
outcome in a SQLite Landscape.  The two pipelines alternate run by run; printed are the
medians of rows/s, their ratio (the goal: at least 0.5) and the Landscape size per
source row.  ``--rss`` instead runs the join pipeline alone in child processes at N and
10 x N rows and prints the peak RSS of each one's whole process tree (the engine and its
SQLite writer process) and their ratio (the goal: at most 1.3).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from throughput import landscape_size, memory, run_ledgerflow, synthetic_rows

from engine import Pipeline


def join_config(n: int, out: Path) -> dict[str, Any]:
    return {
        "name": "join_aggregate",
        "landscape": {"url": f"sqlite+aiosqlite:///{out / 'audit.db'}"},
        "source": {"plugin": "memory", "options": {"rows": synthetic_rows(n)}, "on_success": "raw"},
        "gates": [{"name": "split", "input": "raw", "fork_to": {"money": "m_in", "risk": "r_in"}}],
        "transforms": [
            {
                "name": "money",
                "plugin": "compute",
                "input": "m_in",
                "on_success": "m_out",
                "options": {"fields": {"amount_eur": "round(row['amount'] * 0.92, 2)"}},
            },
            {
                "name": "risk",
                "plugin": "compute",
                "input": "r_in",
                "on_success": "r_out",
                "options": {"fields": {"high": "row['score'] > 0.8"}},
            },
        ],
        "coalesce": [
            {
                "name": "join",
                "branches": {"money": "m_out", "risk": "r_out"},
                "policy": "require_all",
                "merge": "union",
                "on_success": "joined",
            }
        ],
        "aggregations": [
            {
                "name": "stats",
                "plugin": "batch_stats",
                "input": "joined",
                "trigger": {"count": 100},
                "options": {"fields": ["amount", "amount_eur"]},
                "on_success": "summaries",
            }
        ],
        "sinks": [
            {"name": "summaries", "plugin": "jsonl", "options": {"path": str(out / "s.jsonl")}}
        ],
    }


async def run_join(n: int, workdir: Path) -> dict[str, float]:
    pipeline = Pipeline.from_dict(join_config(n, workdir))
    start = time.perf_counter()
    result = await pipeline.run()
    elapsed = time.perf_counter() - start
    assert result.status == "completed", result
    assert result.outcomes.get("consumed_in_batch") == n, result.outcomes
    return {"rows_per_s": n / elapsed, "bytes_per_row": landscape_size(workdir) / n}


def compare(n: int, repeat: int) -> None:
    join_runs, linear_runs = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            join_runs.append(asyncio.run(run_join(n, Path(tmp))))
        with tempfile.TemporaryDirectory() as tmp:
            linear_runs.append(asyncio.run(run_ledgerflow(n, Path(tmp))))
    join = statistics.median(r["rows_per_s"] for r in join_runs)
    linear = statistics.median(r["rows_per_s"] for r in linear_runs)
    size = statistics.median(r["bytes_per_row"] for r in join_runs)
    print(f"rows: {n:,}  (median of {repeat}, runs alternating)")
    print(f"fork/coalesce/aggregate : {join:>10,.0f} rows/s")
    print(f"linear (throughput.py)  : {linear:>10,.0f} rows/s")
    print(f"ratio join/linear       : {join / linear:>10.2f}   (goal >= 0.50)")
    print(f"Landscape per source row: {size:>10,.0f} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rss", action="store_true", help="peak RSS at N and 10 x N rows")
    args = parser.parse_args()
    if args.rss:
        memory(args.rows, "join", "   (goal <= 1.30)")
    else:
        compare(args.rows, args.repeat)


if __name__ == "__main__":
    main()
