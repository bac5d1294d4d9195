"""LLM enrichment throughput: ledgerflow (full audit) next to bare clients, same run.

    python benchmarks/llm_enrichment.py [--quick] [--repeat 3] [--httpx-default]

The mock LLM server runs in its own process.  Each scenario runs, in this process and
one after the other, ``--repeat`` times alternating: ledgerflow's ``llm`` transform
(ordered release, every call in a SQLite Landscape); a bare client on the very
``httpx.AsyncClient`` and transport ledgerflow's endpoints use (a semaphore, results
kept in order, no audit); and a bare aiohttp client the same way.  Printed per
scenario: the ideal ``rows / (latency / concurrency)``, the median rows/s of each,
ledgerflow's share of the ideal and the medians of its per-round ratios to each bare
client; and the engine's own overhead per call (p50/p99 of the time from a worker
taking the row to its request leaving, plus from the answer arriving to the result
being handed to the release window; waits before a retry are not counted).  With
``--httpx-default``, also httpx on its default (httpcore) transport, which is why the
endpoints use aiohttp's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson

from engine import Pipeline
from plugins.llm import LlmTransform
from plugins.llm._client import endpoint_client
from plugins.llm._endpoint import Endpoint

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["billing", "login", "other"]}},
    "required": ["label"],
    "additionalProperties": False,
}
PROMPT = "Classify this support ticket: {{ row.text }}"


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: int
    concurrency: int
    latency_ms: float
    server_error_rate: float = 0.0


def start_server(latency_ms: float, server_error_rate: float) -> tuple[subprocess.Popen[str], str]:
    code = (
        "import anyio, sys;"
        "from plugins.llm import serve, MockSettings, FixedLatency, Fault;"
        "s = MockSettings(latency=FixedLatency(float(sys.argv[1]) / 1000),"
        " faults={Fault.SERVER_ERROR: float(sys.argv[2])} if float(sys.argv[2]) else {});"
        "anyio.run(serve, s, '127.0.0.1', 0)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(latency_ms), str(server_error_rate)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    base_url = process.stdout.readline().strip()
    return process, base_url


def rows(n: int) -> list[dict[str, Any]]:
    texts = ["I cannot log in", "I was charged twice", "Please add dark mode"]
    return [{"id": i, "text": f"{texts[i % 3]} (#{i})"} for i in range(n)]


# -- ledgerflow -------------------------------------------------------------------------

OVERHEADS: list[float] = []
#: Seconds the current row spent inside HTTP exchanges or waiting to retry one (one list
#: per worker task's row).
_IN_HTTP: contextvars.ContextVar[list[float]] = contextvars.ContextVar("in_http")


class TimedLlm(LlmTransform):
    """The ``llm`` transform, timing the engine's part of each row (not the HTTP wait)."""

    name = ""

    async def process(self, row: Any, ctx: Any) -> Any:
        in_http: list[float] = []
        _IN_HTTP.set(in_http)
        started = time.perf_counter()
        result = await super().process(row, ctx)
        OVERHEADS.append(time.perf_counter() - started - sum(in_http))
        return result


_original_send = Endpoint._send


async def _timed_send(self: Endpoint, request: Any, limit_seconds: float) -> Any:
    """``Endpoint._send``, adding its duration (request out to response read) to the row."""
    started = time.perf_counter()
    try:
        return await _original_send(self, request, limit_seconds)
    finally:
        _IN_HTTP.get([]).append(time.perf_counter() - started)


_original_pause = Endpoint._pause


async def _timed_pause(seconds: float) -> None:
    """``Endpoint._pause``: the wait before a retry (as long as it really took, timer
    slack included) is waiting, not engine time either."""
    started = time.perf_counter()
    try:
        await _original_pause(seconds)
    finally:
        _IN_HTTP.get([]).append(time.perf_counter() - started)


Endpoint._send = _timed_send  # type: ignore[method-assign]
Endpoint._pause = staticmethod(_timed_pause)  # type: ignore[method-assign]


async def run_ledgerflow(base_url: str, scenario: Scenario, workdir: Path) -> float:
    config = {
        "landscape": {"url": f"sqlite+aiosqlite:///{workdir / 'audit.db'}"},
        "endpoints": {
            "mock": {
                "base_url": base_url,
                "max_in_flight": scenario.concurrency,
                "max_attempts": 10,
                "backoff": {"initial_seconds": 0.05, "max_seconds": 1.0},
                "circuit_breaker": {"failure_threshold": 1000},
            }
        },
        "source": {
            "plugin": "memory",
            "options": {"rows": rows(scenario.rows)},
            "on_success": "raw",
        },
        "transforms": [
            {
                "name": "classify",
                "plugin": TimedLlm,
                "input": "raw",
                "on_success": "out",
                "concurrency": scenario.concurrency,
                "options": {
                    "endpoint": "mock",
                    "model": "mock-model",
                    "prompt": PROMPT,
                    "response_format": "json_schema",
                    "json_schema": SCHEMA,
                },
            }
        ],
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": str(workdir / "o.jsonl")}}
        ],
    }
    pipeline = Pipeline.from_dict(config)
    started = time.perf_counter()
    result = await pipeline.run()
    elapsed = time.perf_counter() - started
    assert result.outcomes == {"completed": scenario.rows}, result.outcomes
    return scenario.rows / elapsed


# -- baselines --------------------------------------------------------------------------


def request_body(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "mock-model",
        "messages": [{"role": "user", "content": f"Classify this support ticket: {row['text']}"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
        },
    }


async def run_aiohttp(base_url: str, scenario: Scenario) -> float:
    """The fastest simple client: aiohttp, a semaphore, results in order, retry on 5xx."""
    semaphore = asyncio.Semaphore(scenario.concurrency)
    url = base_url + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=scenario.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(row: dict[str, Any]) -> dict[str, Any]:
            async with semaphore:
                for attempt in range(10):
                    async with session.post(url, data=orjson.dumps(request_body(row))) as r:
                        body = await r.read()
                    if r.status < 500:
                        answer = orjson.loads(body)
                        content = answer["choices"][0]["message"]["content"]
                        return {**row, **orjson.loads(content)}
                    await asyncio.sleep(0.05 * 2**attempt)
                raise RuntimeError("gave up")

        started = time.perf_counter()
        results = await asyncio.gather(*(one(row) for row in rows(scenario.rows)))
        elapsed = time.perf_counter() - started
    assert len(results) == scenario.rows
    return scenario.rows / elapsed


async def run_httpx(base_url: str, scenario: Scenario, default_transport: bool = False) -> float:
    """The same client on the ``httpx.AsyncClient`` an endpoint makes (httpx on aiohttp's
    transport), or on httpx's default transport."""
    semaphore = asyncio.Semaphore(scenario.concurrency)
    if default_transport:
        limits = httpx.Limits(
            max_connections=scenario.concurrency, max_keepalive_connections=scenario.concurrency
        )
        client = httpx.AsyncClient(limits=limits)
    else:
        client, _owned = endpoint_client(base_url, connections=scenario.concurrency, headers={})
    url = base_url + "/chat/completions"
    async with client:

        async def one(row: dict[str, Any]) -> dict[str, Any]:
            async with semaphore:
                for attempt in range(10):
                    r = await client.post(url, content=orjson.dumps(request_body(row)), timeout=60)
                    if r.status_code < 500:
                        content = orjson.loads(r.content)["choices"][0]["message"]["content"]
                        return {**row, **orjson.loads(content)}
                    await asyncio.sleep(0.05 * 2**attempt)
                raise RuntimeError("gave up")

        started = time.perf_counter()
        results = await asyncio.gather(*(one(row) for row in rows(scenario.rows)))
        elapsed = time.perf_counter() - started
    assert len(results) == scenario.rows
    return scenario.rows / elapsed


# -- report -----------------------------------------------------------------------------


def measured_client(run: Coroutine[Any, Any, float], scenario: Scenario) -> tuple[float, str]:
    """Rows/s of a bare client's run, and its CPU time per row: on two cores shared with
    the server, the client's CPU is what decides how far a pipeline around it can go."""
    started = time.process_time()
    rate = asyncio.run(run)
    return rate, f"{(time.process_time() - started) / scenario.rows * 1e6:.0f} µs CPU per row"


def _ratio(engines: list[float], others: list[float]) -> str:
    ratios = sorted(e / o for e, o in zip(engines, others, strict=True))
    spread = f"  (rounds: {ratios[0]:.0%}-{ratios[-1]:.0%})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):>8.0%}{spread}"


def measure(scenario: Scenario, *, repeat: int, httpx_default: bool = False) -> None:
    """Run ledgerflow and the two bare clients ``repeat`` rounds, alternating, and print
    medians: rows/s of each, and the medians of the per-round ratios (the host's load
    moves the runs of a round together, far less their ratio)."""
    server, base_url = start_server(scenario.latency_ms, scenario.server_error_rate)
    try:
        OVERHEADS.clear()
        engines, bare_httpx, bare_aiohttp = [], [], []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as tmp:
                engines.append(asyncio.run(run_ledgerflow(base_url, scenario, Path(tmp))))
            bare_httpx.append(asyncio.run(run_httpx(base_url, scenario)))
            bare_aiohttp.append(asyncio.run(run_aiohttp(base_url, scenario)))
        overheads = sorted(OVERHEADS)
        ideal = scenario.concurrency / (scenario.latency_ms / 1000.0)
        faults = (
            f", {scenario.server_error_rate:.0%} HTTP 500" if scenario.server_error_rate else ""
        )
        print(
            f"\n{scenario.name}: {scenario.rows:,} rows, concurrency {scenario.concurrency}, "
            f"latency {scenario.latency_ms:.0f} ms{faults}, median of {repeat} rounds"
        )
        print(f"  ideal                     : {ideal:>8,.0f} rows/s")
        for label, rates in (
            ("ledgerflow, full audit    ", engines),
            ("bare httpx, same transport", bare_httpx),
            ("bare aiohttp              ", bare_aiohttp),
        ):
            rate = statistics.median(rates)
            print(f"  {label}: {rate:>8,.0f} rows/s  ({rate / ideal:.0%} of ideal)")
        print(f"  ledgerflow / bare httpx   : {_ratio(engines, bare_httpx)}")
        print(f"  ledgerflow / bare aiohttp : {_ratio(engines, bare_aiohttp)}")
        if overheads:
            p50 = statistics.median(overheads) * 1000
            p99 = overheads[int(len(overheads) * 0.99) - 1] * 1000
            print(f"  engine overhead / call    : p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        if httpx_default:
            for label, run in (
                ("httpx, aiohttp transport ", run_httpx(base_url, scenario)),
                (
                    "httpx, default transport ",
                    run_httpx(base_url, scenario, default_transport=True),
                ),
                ("aiohttp                  ", run_aiohttp(base_url, scenario)),
            ):
                rate, cpu = measured_client(run, scenario)
                print(f"  {label} : {rate:>8,.0f} rows/s  (no audit, {cpu})")
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds per scenario")
    parser.add_argument(
        "--httpx-default", action="store_true", help="also time httpx's default transport"
    )
    args = parser.parse_args()
    scale = 5 if args.quick else 1
    repeat = args.repeat
    measure(Scenario("realistic latency", 2000 // scale, 64, 500), repeat=repeat)
    measure(Scenario("realistic latency, wide", 5000 // scale, 256, 500), repeat=repeat)
    fast = Scenario("fast endpoint", 2000 // scale, 64, 50)
    measure(fast, repeat=repeat, httpx_default=args.httpx_default)
    errors = Scenario("5% server errors", 2000 // scale, 64, 500, server_error_rate=0.05)
    measure(errors, repeat=repeat)


if __name__ == "__main__":
    main()
