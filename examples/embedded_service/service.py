"""Embedding ledgerflow in an async service.

A service that already runs an event loop (a web app, a queue consumer) pushes rows into
a pipeline as they arrive: the ``memory`` source takes any async iterable, here the
receive end of a bounded anyio stream the service's handlers send into.  The pipeline
runs as one task of the service's own task group; back-pressure from a slow sink
reaches the handlers through the bounded stream.

    python examples/embedded_service/service.py [--landscape URL] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import random
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from engine import Pipeline, RunResult

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream

HERE = Path(__file__).resolve().parent


async def handle_requests(inbox: MemoryObjectSendStream[dict[str, object]], count: int) -> None:
    """Stands in for request handlers: each request becomes one row."""
    rng = random.Random(42)
    async with inbox:
        for i in range(count):
            await inbox.send(
                {
                    "event_id": i,
                    "user": f"user-{rng.randint(1, 20)}",
                    "latency_ms": rng.randint(5, 900),
                }
            )
            await anyio.lowlevel.checkpoint()


def build_pipeline(rows: object, out: Path, landscape_url: str) -> Pipeline:
    return Pipeline.from_dict(
        {
            "name": "embedded-service",
            "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "events"},
            "transforms": [
                {
                    "name": "classify",
                    "plugin": "compute",
                    "input": "events",
                    "on_success": "classified",
                    "options": {"fields": {"slow": "row['latency_ms'] > 500"}},
                }
            ],
            "gates": [
                {
                    "name": "slow_requests",
                    "input": "classified",
                    "condition": "row['slow']",
                    "routes": {"true": "alerts", "false": "metrics"},
                }
            ],
            "sinks": [
                {
                    "name": "alerts",
                    "plugin": "jsonl",
                    "options": {"path": str(out / "alerts.jsonl")},
                },
                {
                    "name": "metrics",
                    "plugin": "jsonl",
                    "options": {"path": str(out / "metrics.jsonl")},
                },
            ],
        },
        base_dir=HERE,
        landscape_url=landscape_url,
    )


async def serve(count: int, out: Path, landscape_url: str) -> RunResult:
    """Run the request handlers and the pipeline side by side in one task group."""
    send, receive = anyio.create_memory_object_stream[dict[str, object]](16)
    pipeline = build_pipeline(receive, out, landscape_url)
    results: list[RunResult] = []

    async def run_pipeline() -> None:
        async with receive:
            results.append(await pipeline.run())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_pipeline)
        tg.start_soon(handle_requests, send, count)
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="ledgerflow embedded in an async service")
    parser.add_argument("--landscape", default="sqlite+aiosqlite:///runs/audit.db")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--events", type=int, default=500)
    args = parser.parse_args()
    result = asyncio.run(serve(args.events, args.out, args.landscape))
    print(f"run_id: {result.run_id}")
    print(f"status: {result.status}")
    for outcome, n in sorted(result.outcomes.items()):
        print(f"  {outcome}: {n}")


if __name__ == "__main__":
    main()
