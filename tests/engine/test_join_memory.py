"""A coalesce's memory stays flat however many rows it joins (1,000,000 here).

The audit writer is replaced by one that drops records, so that what is measured is the
engine's own state (pending joins, fork bookkeeping, what is remembered about resolved
joins), not the writer's queue; ``benchmarks/join_aggregate.py --rss`` measures the whole
process with the real SQLite Landscape.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import anyio
import pytest

from engine import Pipeline, SystemClock
from engine._run_context import RunContext
from landscape import Recorder
from plugins import Sink, SinkItem, SinkRejection

ROWS = 1_000_000
SAMPLE_EVERY = 100_000


class DroppingWriter:
    """Accepts every audit record and keeps none."""

    def insert(self, table: Any, values: Any) -> None:
        del table, values

    def insert_row(self, table: Any, row: Any) -> None:
        del table, row

    def payload(self, content_hash: str, content: str) -> None:
        del content_hash, content

    def update(self, table: Any, key: Any, values: Any) -> None:
        del table, key, values

    async def wait_writable(self) -> None:
        return None

    async def ensure_lease(self) -> None:
        return None

    def together(self) -> AbstractContextManager[None]:
        return nullcontext()


class SamplingSink(Sink):
    """Counts rows and samples the interpreter's allocated blocks every 100,000 rows."""

    written = 0
    samples: dict[int, int] = {}

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        before = SamplingSink.written
        SamplingSink.written += len(items)
        if SamplingSink.written // SAMPLE_EVERY > before // SAMPLE_EVERY:
            SamplingSink.samples[SamplingSink.written] = sys.getallocatedblocks()
        return []


def rows(n: int) -> Iterator[dict[str, int]]:
    for i in range(n):
        yield {"i": i}


@pytest.mark.timeout(900)
async def test_a_million_rows_through_fork_and_coalesce_keep_memory_flat() -> None:
    SamplingSink.written, SamplingSink.samples = 0, {}
    config = {
        "source": {"plugin": "memory", "options": {"rows": rows(ROWS)}, "on_success": "raw"},
        "gates": [{"name": "split", "input": "raw", "fork_to": {"a": "a", "b": "b"}}],
        # policy first: every second branch arrives after its join resolved, the case
        # where a coalesce could be tempted to remember resolved joins
        "coalesce": [
            {
                "name": "join",
                "branches": {"a": "a", "b": "b"},
                "policy": "first",
                "merge": "nested",
                "on_success": "out",
            }
        ],
        "sinks": [{"name": "out", "plugin": SamplingSink, "options": {}}],
    }
    pipeline = Pipeline.from_dict(config)
    recorder = Recorder(DroppingWriter(), "memory")  # type: ignore[arg-type]
    run = RunContext("memory", pipeline.graph, recorder, SystemClock())
    tasks, reentry = pipeline._wire(run)
    reentry.close()  # nothing to resume: the source may start at once
    run.restored.set()
    async with anyio.create_task_group() as nodes:
        for task in tasks:
            nodes.start_soon(task.run_task)
    assert SamplingSink.written == ROWS
    assert run.outcomes == {"forked": ROWS, "coalesced": 2 * ROWS, "completed": ROWS}
    samples = sorted(SamplingSink.samples.items())
    first, last = samples[0][1], samples[-1][1]
    # One object kept per join would add ~900,000 blocks between the samples.
    assert last - first < 50_000, samples
