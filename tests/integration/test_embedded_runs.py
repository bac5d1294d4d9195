"""An embedding service runs pipeline after pipeline in one process: nothing accumulates.

Each run's state — the writer's queue and seen-payload sets, the run context, the
nodes' streams, the SQLite writer process — must go when the run does, or a
long-lived service grows with every run it makes.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

from engine import Pipeline
from landscape import Landscape

RUNS = 20
ROWS = 300
#: Runs that warm what is cached once per process (compiled SQL, imports) before the
#: count of allocated blocks is taken as the reference.
WARM_UP = 5
#: Blocks a run may leave behind on average: about 10 are seen (caches settling); a
#: run that kept its rows, tokens or payload hashes would leave thousands.
LEFT_PER_RUN = 60


def _config(tmp_path: Path, landscape: Path, run: int) -> dict[str, Any]:
    out = tmp_path / f"out-{run}"
    rows = [{"id": i, "amount": i * 1.5, "note": f"row {run}-{i}" * 4} for i in range(ROWS)]
    return {
        "name": "embedded",
        "landscape": {"url": f"sqlite+aiosqlite:///{landscape}"},
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "raw"},
        "transforms": [
            {
                "name": "price",
                "plugin": "compute",
                "input": "raw",
                "on_success": "priced",
                "options": {"fields": {"eur": "row['amount'] * 0.9"}},
            }
        ],
        "gates": [
            {
                "name": "size",
                "input": "priced",
                "condition": "row['eur'] > 100",
                "routes": {"true": "large", "false": "small"},
            }
        ],
        "sinks": [
            {"name": "large", "plugin": "jsonl", "options": {"path": str(out / "large.jsonl")}},
            {"name": "small", "plugin": "jsonl", "options": {"path": str(out / "small.jsonl")}},
        ],
    }


async def test_runs_one_after_another_in_one_process_leave_nothing_behind(
    tmp_path: Path,
) -> None:
    landscape_path = tmp_path / "audit.db"
    blocks: list[int] = []
    run_ids: list[str] = []
    for run in range(RUNS):
        result = await Pipeline.from_dict(_config(tmp_path, landscape_path, run)).run()
        assert result.status == "completed", result
        assert result.rows_processed == ROWS
        run_ids.append(result.run_id)
        del result
        gc.collect()
        blocks.append(sys.getallocatedblocks())
    left = blocks[-1] - blocks[WARM_UP - 1]
    assert left < LEFT_PER_RUN * (RUNS - WARM_UP), blocks

    async with Landscape.connect(f"sqlite+aiosqlite:///{landscape_path}") as landscape:
        for run_id in run_ids:
            report = await landscape.verify(run_id)
            assert report.ok, report
