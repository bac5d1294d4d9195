"""How fast a stop takes effect when the source is idle (the embedded-service case).

    python benchmarks/stop_latency.py [--rows 500] [--repeat 7]

An embedded service feeds a pipeline from an async iterable — a queue that is empty most
of the time — through a transform and a count aggregation (which holds the rows: its
count is never reached) into a JSONL sink, on the real SQLite Landscape, with the
default 30 s drain timeout.  After ``--rows`` rows the feed goes idle.

* **stop**: ``pipeline.stop()`` while the feed is idle; timed from the call to the run's
  end (the batch flushed with trigger ``shutdown``, the checkpoint and the run's
  ``interrupted`` status committed).  The goal: under 1 s.
* **end of input** (the baseline): the feed ends instead; timed from its end to the
  run's end (the same batch flushed with trigger ``end_of_source``, the same records).

Each repetition runs both, alternating, in this process; prints the medians, the worst
stop and the median per-pair ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from engine import Pipeline


class Feed:
    """``rows`` rows, then idle until ``end`` is set: then it ends."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.idle = anyio.Event()
        self.end = anyio.Event()
        self.ended_at = 0.0

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        for i in range(self.rows):
            yield {"i": i, "text": f"message {i}"}
        self.idle.set()
        await self.end.wait()
        self.ended_at = time.perf_counter()


def pipeline(feed: Feed, work: Path) -> Pipeline:
    config = {
        "source": {"plugin": "memory", "options": {"rows": feed}, "on_success": "raw"},
        "transforms": [
            {
                "name": "tag",
                "plugin": "compute",
                "input": "raw",
                "on_success": "tagged",
                "options": {"fields": {"size": "len(row['text'])"}},
            }
        ],
        "aggregations": [
            {
                "name": "hold",
                "plugin": "collect",
                "input": "tagged",
                "on_success": "out",
                "trigger": {"count": 1_000_000},
                "options": {"field": "rows"},
            }
        ],
        "sinks": [{"name": "out", "plugin": "jsonl", "options": {"path": str(work / "out.jsonl")}}],
    }
    return Pipeline.from_dict(config, landscape_url=f"sqlite+aiosqlite:///{work / 'audit.db'}")


async def timed(rows: int, *, stop: bool) -> float:
    """Seconds from the stop (or the end of the feed) to the end of the run."""
    with tempfile.TemporaryDirectory() as directory:
        feed = Feed(rows)
        run = pipeline(feed, Path(directory))
        async with anyio.create_task_group() as tg:
            tg.start_soon(run.run)
            await feed.idle.wait()
            await anyio.wait_all_tasks_blocked()
            started = time.perf_counter()
            if stop:
                run.stop()
            else:
                feed.end.set()
        result = run.last_result
        assert result is not None
        assert result.status == ("interrupted" if stop else "completed"), result
        return time.perf_counter() - started


async def main(rows: int, repeat: int) -> None:
    stops, ends = [], []
    for _ in range(repeat):
        stops.append(await timed(rows, stop=True))
        ends.append(await timed(rows, stop=False))
    ratios = [s / e for s, e in zip(stops, ends, strict=True)]
    print(f"{rows} rows held by an idle pipeline, {repeat} alternating pairs")
    print(f"  stop -> run ended:         median {statistics.median(stops) * 1000:7.1f} ms, "
          f"worst {max(stops) * 1000:7.1f} ms (goal < 1000 ms)")  # fmt: skip
    print(f"  end of input -> run ended: median {statistics.median(ends) * 1000:7.1f} ms")
    print(f"  ratio stop / end of input: median {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.repeat)
