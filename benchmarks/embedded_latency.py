"""How responsive a service stays while a pipeline runs on its event loop.

    python benchmarks/embedded_latency.py [--rows 200000] [--repeat 3] [--tree DIR ...]
    python benchmarks/embedded_latency.py --sweep 0 0.1 0.25 0.5 1 [--rows N] [--repeat N]

One process, one event loop: an aiohttp web server with a trivial endpoint, a client
task that requests it every ``--interval-ms`` (5 ms) and records each answer's latency,
and — after ``--idle-seconds`` of the client alone — ``Pipeline.run()`` on the
``throughput.py`` pipeline (source -> 3 transforms -> gate -> 2 JSONL sinks, SQLite
Landscape) over ``--rows`` rows; then, the client stopped, the same pipeline again
(rows/s "alone").  A latency is counted from when the request was due; a request that
fell due while the previous one was out counts as answered when that one was (see
:class:`Prober`), so a stall of the loop weighs by its length.

The collector is left as it is (an embedding service owns its process) and, as a second
case, frozen once the service has started (``gc.freeze()``, which a latency-minded
service does): a full collection scans every object the imported libraries made, some
100,000, which takes longer than the latency goal on its own.

Each run is a child process.  With ``--tree DIR ...`` (other checkouts, e.g. today's
main) the runs alternate between this tree and each ``DIR`` (on ``PYTHONPATH``).
Printed are each run's figures as it finishes, then per tree and case the medians of
p50/p99/max latency idle and under load and of the rows/s, and the ratios of this
tree's rows/s to each ``DIR``'s.  The goal: under load p99 <= 10 ms and max <= 50 ms,
rows/s within 10 % of today's.  ``--sweep`` runs this tree alone at several
``runtime.time_slice_ms`` (collector frozen): the trade between latency and rows/s.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from aiohttp import web

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``samples`` (seconds), in milliseconds."""
    ordered = sorted(samples)
    if not ordered:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50": at(0.50), "p99": at(0.99), "max": ordered[-1] * 1000, "n": len(ordered)}


async def _ping(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


class Prober:
    """Requests ``url`` every ``interval`` seconds, one request at a time.

    A request due while the previous one is still out is not sent, but it is counted
    as a steady client would have seen it — answered once the loop got round to it —
    so a stall of the loop weighs by its length, not as one slow request
    (coordinated omission corrected, as HdrHistogram does); ``sent`` keeps only the
    requests really sent.
    """

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.samples: list[float] = []
        self.sent: list[float] = []

    async def run(self, session: aiohttp.ClientSession) -> None:
        due = time.perf_counter()
        while True:
            now = time.perf_counter()
            if now < due:
                await anyio.sleep(due - now)
            async with session.get(self.url) as response:
                await response.read()
            done = time.perf_counter()
            self.sent.append(done - due)
            while due < done:
                self.samples.append(done - due)
                due += self.interval

    def take(self) -> tuple[list[float], list[float]]:
        samples, sent = self.samples, self.sent
        self.samples, self.sent = [], []
        return samples, sent


async def measure(
    rows: int,
    interval: float,
    idle_seconds: float,
    work: Path,
    *,
    freeze: bool = False,
    time_slice_ms: float | None = None,
) -> dict[str, Any]:
    """Latencies idle and while a ``rows``-row pipeline runs, the pipeline's rows/s then,
    and its rows/s in a second run with the client stopped (the service idle)."""
    from throughput import pipeline_config  # this folder's, on sys.path as the script's

    from engine import Pipeline

    def pipeline(name: str) -> Pipeline:
        (work / name).mkdir()
        config = pipeline_config(rows, work / name, work / name / "audit.db")
        if time_slice_ms is not None:
            config["runtime"] = {"time_slice_ms": time_slice_ms}
        return Pipeline.from_dict(config)

    app = web.Application()
    app.router.add_get("/ping", _ping)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    prober = Prober(f"http://127.0.0.1:{port}/ping", interval)
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        async with aiohttp.ClientSession() as session, anyio.create_task_group() as tg:
            tg.start_soon(prober.run, session)
            await anyio.sleep(idle_seconds)
            idle, _ = prober.take()
            loaded_rate = await timed_run(pipeline("loaded"), rows)
            loaded, sent = prober.take()
            tg.cancel_scope.cancel()
        alone_rate = await timed_run(pipeline("alone"), rows)
    finally:
        await runner.cleanup()
    return {
        "idle": percentiles(idle),
        "loaded": percentiles(loaded),
        "sent": percentiles(sent),
        "rows_per_s": loaded_rate,
        "requests_per_s": len(sent) * loaded_rate / rows,
        "alone_rows_per_s": alone_rate,
    }


async def timed_run(pipeline: Any, rows: int) -> float:
    start = time.perf_counter()
    result = await pipeline.run()
    elapsed = time.perf_counter() - start
    assert result.status == "completed", result
    assert result.rows_processed == rows, result
    return rows / elapsed


def child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        figures = asyncio.run(
            measure(
                args.rows,
                args.interval_ms / 1000,
                args.idle_seconds,
                Path(tmp),
                freeze=args.freeze,
                time_slice_ms=args.time_slice_ms,
            )
        )
    print(json.dumps(figures))


def run_child(
    tree: Path, args: argparse.Namespace, *, freeze: bool, time_slice_ms: float | None = None
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"--rows={args.rows}",
        f"--interval-ms={args.interval_ms}",
        f"--idle-seconds={args.idle_seconds}",
        *(["--freeze"] if freeze else []),
        *([f"--time-slice-ms={time_slice_ms}"] if time_slice_ms is not None else []),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    figures: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return figures


def line(figures: dict[str, Any]) -> str:
    idle, loaded = figures["idle"], figures["loaded"]
    return (
        f"idle {idle['p50']:4.1f}/{idle['p99']:5.1f}/{idle['max']:5.1f} ms  "
        f"loaded {loaded['p50']:5.1f}/{loaded['p99']:6.1f}/{loaded['max']:6.1f} ms "
        f"(sent only: p99 {figures['sent']['p99']:5.1f}, {figures['requests_per_s']:3.0f}/s)  "
        f"{figures['rows_per_s']:6,.0f} rows/s  "
        f"alone {figures['alone_rows_per_s']:6,.0f} rows/s"
    )


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(phase: str, key: str) -> float:
        return statistics.median(r[phase][key] for r in runs)

    rates = ("rows_per_s", "requests_per_s", "alone_rows_per_s")
    return {
        phase: {key: med(phase, key) for key in ("p50", "p99", "max")}
        for phase in ("idle", "loaded", "sent")
    } | {key: statistics.median(r[key] for r in runs) for key in rates}


def ratio_line(new: list[dict[str, Any]], old: list[dict[str, Any]], key: str) -> str:
    ratios = sorted(a[key] / b[key] for a, b in zip(new, old, strict=True))
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def report(args: argparse.Namespace) -> None:
    trees = {"this tree": ROOT} | {str(tree): tree for tree in args.tree}
    cases = [
        (f"{tree} {gc_mode}", tree, gc_mode == "frozen")
        for gc_mode in ("as is", "frozen")
        for tree in trees
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in cases}
    width = max(len(name) for name in runs)
    for i in range(args.repeat):
        for name, tree, freeze in cases:  # alternating: the host's load hits all alike
            runs[name].append(run_child(trees[tree], args, freeze=freeze))
            print(f"  run {i + 1} {name:{width}}: {line(runs[name][-1])}", flush=True)
    print(
        f"rows: {args.rows:,}, a request due every {args.interval_ms:g} ms (medians of "
        f"{args.repeat} runs; latency p50/p99/max idle, then while the pipeline runs)"
    )
    for name, figures in runs.items():
        print(f"{name:>{width + 8}}: {line(medians(figures))}")
    for tree in args.tree:
        for gc_mode in ("as is", "frozen"):
            new, old = runs[f"this tree {gc_mode}"], runs[f"{tree} {gc_mode}"]
            print(
                f"collector {gc_mode:6}: rows/s of this tree / {tree}: under load "
                f"{ratio_line(new, old, 'rows_per_s')}, alone "
                f"{ratio_line(new, old, 'alone_rows_per_s')}  (median of the pairs, range)"
            )
    print("goal: loaded p99 <= 10 ms and max <= 50 ms; rows/s ratios >= 0.90")


def sweep(args: argparse.Namespace) -> None:
    """This tree, the collector frozen, at each of ``args.sweep`` time slices."""
    runs: dict[float, list[dict[str, Any]]] = {ms: [] for ms in args.sweep}
    for i in range(args.repeat):
        for ms in args.sweep:
            runs[ms].append(run_child(ROOT, args, freeze=True, time_slice_ms=ms))
            print(f"  run {i + 1} time_slice_ms {ms:<5g}: {line(runs[ms][-1])}", flush=True)
    print(f"rows: {args.rows:,}, collector frozen (medians of {args.repeat} runs)")
    # The baseline is slices off (0) when swept, else the longest slice.
    slowest = 0.0 if 0.0 in args.sweep else max(args.sweep)
    for ms, figures in runs.items():
        ratio = ratio_line(figures, runs[slowest], "alone_rows_per_s")
        print(
            f"  time_slice_ms {ms:<5g}: {line(medians(figures))}  "
            f"rows/s alone vs {slowest:g} ms: {ratio}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument(
        "--tree", type=Path, nargs="*", default=[], help="other checkouts to compare with"
    )
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="+",
        help="instead: this tree at each of these runtime.time_slice_ms (0: no slices)",
    )
    parser.add_argument("--time-slice-ms", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--freeze", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    elif args.sweep:
        sweep(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
