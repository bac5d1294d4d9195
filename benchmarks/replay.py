"""Replay speed: a recorded LLM run replayed (no network) next to the same pipeline
without an LLM node.

    python benchmarks/replay.py [--rows 10000] [--repeat 3]

Records one run of ``source -> llm (concurrency 64) -> gate -> 2 JSONL sinks`` against
the mock server (in this process, no latency), then alternates, in the same process and
Landscape: the replay of that run (every answer from the record, loading the answers
included) and the same pipeline with the ``llm`` node replaced by a ``compute`` node
that sets the fields the answer would, once with the same ``concurrency: 64`` and once
serial (the engine's fastest path).  Prints the rows/s of each (median) and the replay's
ratio to each: replay runs "at the speed of the engine" when they are near 1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import Pipeline
from plugins.llm import MockLlmServer, MockSettings

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["billing", "login", "other"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "score"],
}


def rows(n: int) -> list[dict[str, Any]]:
    topics = ["cannot log in", "charged twice", "feature request", "refund please"]
    return [{"id": i, "text": f"{topics[i % 4]} #{i}"} for i in range(n)]


def config(base_url: str, n: int, out: Path, *, llm: bool, concurrency: int = 64) -> dict[str, Any]:
    if llm:
        enrich: dict[str, Any] = {
            "name": "enrich",
            "plugin": "llm",
            "input": "raw",
            "on_success": "enriched",
            "on_error": "errors",
            "concurrency": 64,
            "options": {
                "endpoint": "local",
                "model": "mock-model",
                "prompt": "Ticket {{ row.id }}: {{ row.text }}",
                "response_format": "json_schema",
                "json_schema": SCHEMA,
            },
        }
    else:
        enrich = {
            "name": "enrich",
            "plugin": "compute",
            "input": "raw",
            "on_success": "enriched",
            "on_error": "errors",
            "concurrency": concurrency,
            "options": {"fields": {"label": "'other'", "score": "(row['id'] % 100) / 100"}},
        }
    return {
        "endpoints": {"local": {"base_url": base_url, "max_in_flight": 64}},
        "source": {"plugin": "memory", "options": {"rows": rows(n)}, "on_success": "raw"},
        "transforms": [enrich],
        "gates": [
            {
                "name": "route",
                "input": "enriched",
                "condition": "row['score'] >= 0.5",
                "routes": {"true": "high", "false": "low"},
            }
        ],
        "sinks": [
            {"name": name, "plugin": "jsonl", "options": {"path": str(out / f"{name}.jsonl")}}
            for name in ("high", "low", "errors")
        ],
    }


async def timed(pipeline: Pipeline, replay: str | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    result = await pipeline.run(replay=replay)
    elapsed = time.perf_counter() - started
    assert result.status == "completed", result
    return elapsed, result.run_id


async def main(n: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        url = f"sqlite+aiosqlite:///{work / 'audit.db'}"
        async with MockLlmServer(MockSettings(seed=1)) as server:
            out = work / "recorded"
            out.mkdir()
            record = Pipeline.from_dict(
                config(server.base_url, n, out, llm=True), landscape_url=url
            )
            seconds, recorded = await timed(record)
            print(f"recorded {n:,} rows against the mock server in {seconds:.2f} s")
            requests = server.statistics().requests
            rates: dict[str, list[float]] = {"replay": [], "compute": [], "serial": []}
            for i in range(repeat):
                for kind in rates:
                    out = work / f"{i}-{kind}"
                    out.mkdir()
                    llm, concurrency = kind == "replay", 1 if kind == "serial" else 64
                    pipeline = Pipeline.from_dict(
                        config(server.base_url, n, out, llm=llm, concurrency=concurrency),
                        landscape_url=url,
                    )
                    seconds, _ = await timed(pipeline, recorded if llm else None)
                    rates[kind].append(n / seconds)
                    if llm:  # the replay wrote what the recorded run wrote
                        for name in ("high", "low"):
                            same = (out / f"{name}.jsonl").read_bytes() == (
                                work / "recorded" / f"{name}.jsonl"
                            ).read_bytes()
                            assert same, name
            assert server.statistics().requests == requests, "a replay sent a request"
    median = {kind: statistics.median(values) for kind, values in rates.items()}
    labels = {
        "replay": "replay of the LLM run (concurrency 64)",
        "compute": "without LLM, compute node, concurrency 64",
        "serial": "without LLM, compute node, serial",
    }
    for kind, label in labels.items():
        print(f"{label:<44} {median[kind]:8,.0f} rows/s  (runs: {_list(rates[kind])})")
    print(
        f"replay / non-LLM at the same concurrency:    {median['replay'] / median['compute']:.2f}"
    )
    print(f"replay / non-LLM serial:                     {median['replay'] / median['serial']:.2f}")


def _list(rates: list[float]) -> str:
    return ", ".join(f"{r:,.0f}" for r in rates)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.repeat))
