"""LLM enrichment throughput: ledgerflow (full audit) next to a hand-written baseline.

    python benchmarks/llm_enrichment.py [--quick] [--repeat 3]

The mock LLM server runs in its own process.  Each scenario runs, in the same process
and one after the other, ledgerflow's ``llm`` transform (ordered release, every call in
a SQLite Landscape) and the baseline: plain asyncio + aiohttp + a semaphore, results
kept in order, no audit.  The 50 ms scenarios, where CPU decides, alternate the two
``--repeat`` times.  Printed per scenario: rows/s of each (medians), the ideal
``rows / (latency / concurrency)``, ledgerflow's share of the ideal, and the median of
its per-run ratios to the baseline.  Also printed: the engine's own overhead per call
(p50/p99 of the time from a worker taking the row to its request leaving, plus from the
response arriving to the result being handed to the release window; waits before a
retry are not counted) and the same client on httpx (with its default transport and
on an aiohttp transport) and on ledgerflow's own HTTP client, none of them auditing:
why ledgerflow's endpoints use neither httpx nor aiohttp's client.
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
from httpx_aiohttp import AiohttpTransport

from engine import Pipeline
from plugins.llm import LlmTransform
from plugins.llm._endpoint import Endpoint
from plugins.llm._http import HttpClient

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["billing", "login", "other"]}},
    "required": ["label"],
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


async def run_httpx(base_url: str, scenario: Scenario, *, aiohttp_transport: bool) -> float:
    """The same client on httpx, with its default (httpcore) transport or on aiohttp's."""
    semaphore = asyncio.Semaphore(scenario.concurrency)
    limits = httpx.Limits(
        max_connections=scenario.concurrency, max_keepalive_connections=scenario.concurrency
    )
    transport = AiohttpTransport(limits=limits) if aiohttp_transport else None
    async with httpx.AsyncClient(limits=limits, timeout=60, transport=transport) as client:

        async def one(row: dict[str, Any]) -> None:
            async with semaphore:
                response = await client.post(
                    base_url + "/chat/completions", content=orjson.dumps(request_body(row))
                )
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one(row) for row in rows(scenario.rows)))
        elapsed = time.perf_counter() - started
    return scenario.rows / elapsed


async def run_lean_client(base_url: str, scenario: Scenario) -> float:
    """The baseline's client on ledgerflow's HTTP client instead of aiohttp's."""
    semaphore = asyncio.Semaphore(scenario.concurrency)
    client = HttpClient(base_url, headers={}, max_idle=scenario.concurrency)

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        async with semaphore:
            response = await client.request(
                "POST",
                "/chat/completions",
                orjson.dumps(request_body(row)),
                content_type="application/json",
                limit_seconds=60,
            )
        assert response.status == 200, response.status
        content = orjson.loads(response.body)["choices"][0]["message"]["content"]
        return {**row, **orjson.loads(content)}

    started = time.perf_counter()
    results = await asyncio.gather(*(one(row) for row in rows(scenario.rows)))
    elapsed = time.perf_counter() - started
    await client.aclose()
    assert len(results) == scenario.rows
    return scenario.rows / elapsed


# -- report -----------------------------------------------------------------------------


def measured_client(run: Coroutine[Any, Any, float], scenario: Scenario) -> tuple[float, str]:
    """Rows/s of a bare client's run, and its CPU time per row: on two cores shared with
    the server, the client's CPU is what decides how far a pipeline around it can go."""
    started = time.process_time()
    rate = asyncio.run(run)
    return rate, f"{(time.process_time() - started) / scenario.rows * 1e6:.0f} µs CPU per row"


def measure(
    scenario: Scenario, *, repeat: int = 1, clients: bool = False, httpx_default: bool = False
) -> None:
    """Run ledgerflow and the baseline ``repeat`` times, alternating, and print medians:
    rows/s of each, and the median of the per-pair ratios (the host's load moves both
    runs of a pair together, far less the ratio)."""
    server, base_url = start_server(scenario.latency_ms, scenario.server_error_rate)
    try:
        OVERHEADS.clear()
        engines, baselines = [], []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as tmp:
                engines.append(asyncio.run(run_ledgerflow(base_url, scenario, Path(tmp))))
            baselines.append(asyncio.run(run_aiohttp(base_url, scenario)))
        overheads = sorted(OVERHEADS)
        engine, baseline = statistics.median(engines), statistics.median(baselines)
        ratios = sorted(e / b for e, b in zip(engines, baselines, strict=True))
        ideal = scenario.concurrency / (scenario.latency_ms / 1000.0)
        faults = (
            f", {scenario.server_error_rate:.0%} HTTP 500" if scenario.server_error_rate else ""
        )
        runs = f", median of {repeat} alternating runs" if repeat > 1 else ""
        print(
            f"\n{scenario.name}: {scenario.rows:,} rows, concurrency {scenario.concurrency}, "
            f"latency {scenario.latency_ms:.0f} ms{faults}{runs}"
        )
        print(f"  ideal                  : {ideal:>8,.0f} rows/s")
        share = f"{baseline / ideal:.0%} of ideal"
        print(f"  baseline (aiohttp)     : {baseline:>8,.0f} rows/s  ({share})")
        share = f"{engine / ideal:.0%} of ideal"
        print(f"  ledgerflow, full audit : {engine:>8,.0f} rows/s  ({share})")
        spread = f"  (pairs: {ratios[0]:.0%}-{ratios[-1]:.0%})" if repeat > 1 else ""
        ratio = statistics.median(ratios)
        print(f"  ledgerflow / baseline  : {ratio:>8.0%}{spread}")
        if overheads:
            p50 = statistics.median(overheads) * 1000
            p99 = overheads[int(len(overheads) * 0.99) - 1] * 1000
            print(f"  engine overhead / call : p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        if clients:
            lean, cpu = measured_client(run_lean_client(base_url, scenario), scenario)
            print(f"  ledgerflow's client    : {lean:>8,.0f} rows/s  (no audit, {cpu})")
            aio, cpu = measured_client(run_aiohttp(base_url, scenario), scenario)
            print(f"  aiohttp, again         : {aio:>8,.0f} rows/s  (the baseline, {cpu})")
        if httpx_default:
            run = run_httpx(base_url, scenario, aiohttp_transport=False)
            default, cpu = measured_client(run, scenario)
            print(f"  httpx, default transport: {default:>7,.0f} rows/s  (no audit, {cpu})")
            run = run_httpx(base_url, scenario, aiohttp_transport=True)
            on_aiohttp, cpu = measured_client(run, scenario)
            print(f"  httpx, aiohttp transport: {on_aiohttp:>7,.0f} rows/s  (no audit, {cpu})")
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument(
        "--repeat", type=int, default=3, help="alternating runs of the 50 ms scenarios"
    )
    args = parser.parse_args()
    scale = 5 if args.quick else 1
    measure(Scenario("realistic latency", 2000 // scale, 64, 500))
    fast = Scenario("fast endpoint", 2000 // scale, 64, 50)
    measure(fast, repeat=args.repeat, clients=True, httpx_default=True)
    wide = Scenario("fast endpoint, wide", 10_000 // scale, 256, 50)
    measure(wide, repeat=args.repeat, clients=True)
    measure(Scenario("5% server errors", 2000 // scale, 64, 500, server_error_rate=0.05))


if __name__ == "__main__":
    main()
