"""Throughput of a linear pipeline with the full audit, next to a plain-asyncio baseline.

    python benchmarks/throughput.py [--rows 100000] [--repeat 3] [--rss]

Both run the same three transform plugins (compute, field_map, compute), the same gate
condition and the same two JSONL sinks over the same synthetic rows, in one process:
ledgerflow with every row, state and outcome in a SQLite Landscape, and a baseline of
five asyncio tasks joined by bounded queues with no audit.  Prints each alternation's
pair as it finishes, then rows/s of each (the median of ``--repeat`` runs), the median
per-pair ratio with its range, the time to the first sink write, and the Landscape's
size per row.  ``--rss`` instead runs ledgerflow alone in child processes
at N and 10 x N rows and prints the peak RSS of each one's whole process tree (the
engine and its SQLite writer process) and their ratio (the goal: at most 1.3).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from engine import Pipeline
from plugins import PluginSetup, RowContext, SinkItem
from plugins._sinks import JsonlSink
from plugins._transforms import ComputeTransform, FieldMapTransform
from plugins.expressions import compile_expression

CONDITION = "row['score'] > 0.8"


def synthetic_rows(n: int) -> Iterator[dict[str, Any]]:
    """``n`` rows, generated lazily so the source never holds them all."""
    for i in range(n):
        yield {
            "id": i,
            "customer": f"customer-{i % 997}",
            "amount": round((i * 7919) % 10_000 / 7.0, 2),
            "text": "Cannot log in after the password reset, please help",
            "score": (i * 37 % 100) / 100.0,
        }


class TimedJsonlSink(JsonlSink):
    """A JSONL sink that remembers when its first write finished."""

    first_write_at: float | None = None

    async def write(self, items: Sequence[SinkItem]) -> Any:
        result = await super().write(items)
        if TimedJsonlSink.first_write_at is None:
            TimedJsonlSink.first_write_at = time.perf_counter()
        return result


TRANSFORMS = [
    (
        "enrich",
        "compute",
        {"fields": {"amount_eur": "round(row['amount'] * 0.92, 2)", "big": "row['amount'] > 1000"}},
    ),
    ("shape", "field_map", {"rename": {"text": "body"}, "drop": ["customer"]}),
    ("label", "compute", {"fields": {"label": "'high' if row['score'] > 0.8 else 'normal'"}}),
]


def pipeline_config(n: int, out: Path, landscape: Path) -> dict[str, Any]:
    chain = ["raw", "t1", "t2", "scored"]
    return {
        "name": "throughput",
        "landscape": {"url": f"sqlite+aiosqlite:///{landscape}"},
        "source": {"plugin": "memory", "options": {"rows": synthetic_rows(n)}, "on_success": "raw"},
        "transforms": [
            {
                "name": name,
                "plugin": plugin,
                "input": chain[i],
                "on_success": chain[i + 1],
                "options": options,
            }
            for i, (name, plugin, options) in enumerate(TRANSFORMS)
        ],
        "gates": [
            {
                "name": "risk",
                "input": "scored",
                "condition": CONDITION,
                "routes": {"true": "high", "false": "normal"},
            }
        ],
        "sinks": [
            {
                "name": "high",
                "plugin": TimedJsonlSink,
                "options": {"path": str(out / "high.jsonl")},
            },
            {
                "name": "normal",
                "plugin": TimedJsonlSink,
                "options": {"path": str(out / "normal.jsonl")},
            },
        ],
    }


def landscape_size(workdir: Path) -> int:
    """Bytes of the SQLite Landscape (database and WAL)."""
    return sum(p.stat().st_size for p in workdir.glob("audit.db*"))


async def run_ledgerflow(n: int, workdir: Path) -> dict[str, float]:
    landscape = workdir / "audit.db"
    TimedJsonlSink.first_write_at = None
    pipeline = Pipeline.from_dict(pipeline_config(n, workdir, landscape))
    children_before = _children_cpu()
    cpu_before = time.process_time()
    start = time.perf_counter()
    result = await pipeline.run()
    elapsed = time.perf_counter() - start
    engine_cpu = time.process_time() - cpu_before
    writer_cpu = _children_cpu() - children_before  # the SQLite writer process, reaped
    assert result.status == "completed", result
    assert result.rows_processed == n, result
    first = (TimedJsonlSink.first_write_at or start) - start
    size = landscape_size(workdir)
    return {
        "rows_per_s": n / elapsed,
        "seconds": elapsed,
        "first_write_s": first,
        "bytes_per_row": size / n,
        "engine_cpu_us_per_row": engine_cpu / n * 1e6,
        "writer_cpu_us_per_row": writer_cpu / n * 1e6,
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run_baseline(n: int, workdir: Path) -> dict[str, float]:
    """The same transforms, condition and sinks on bounded asyncio queues, no audit."""
    setup = PluginSetup(node_name="baseline", base_dir=workdir)
    classes = {"compute": ComputeTransform, "field_map": FieldMapTransform}
    transforms = [classes[p].from_options(o, setup) for _, p, o in TRANSFORMS]
    condition = compile_expression(CONDITION)
    sinks = {
        label: JsonlSink.from_options({"path": str(workdir / f"b_{label}.jsonl")}, setup)
        for label in ("high", "normal")
    }
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue(64) for _ in range(6)]
    done = object()

    async def source() -> None:
        for row in synthetic_rows(n):
            await queues[0].put(row)
        await queues[0].put(done)

    async def stage(i: int) -> None:
        transform = transforms[i]
        while (row := await queues[i].get()) is not done:
            ctx = RowContext("baseline", "t", "t", 0, "s")
            await queues[i + 1].put(await transform.process(row, ctx))
        await queues[i + 1].put(done)

    async def gate_and_sinks() -> None:
        batches: dict[str, list[SinkItem]] = {"high": [], "normal": []}
        index = 0
        while (row := await queues[3].get()) is not done:
            label = "high" if condition.evaluate({"row": row}) else "normal"
            batches[label].append(SinkItem(str(index), index, row))
            index += 1
            if len(batches[label]) >= 500:
                await sinks[label].write(batches[label])
                batches[label] = []
        for label, batch in batches.items():
            if batch:
                await sinks[label].write(batch)

    for sink in sinks.values():
        await sink.open()
    start = time.perf_counter()
    await asyncio.gather(source(), stage(0), stage(1), stage(2), gate_and_sinks())
    elapsed = time.perf_counter() - start
    for sink in sinks.values():
        await sink.aclose()
    return {"rows_per_s": n / elapsed, "seconds": elapsed}


def compare(n: int, repeat: int) -> None:
    """Alternate, ``repeat`` times: ledgerflow with the start-up heap frozen as
    ``ledgerflow run`` does (engine/cli.py), ledgerflow with the collector untouched
    (as an application embedding it may leave it), and the baseline (frozen too)."""
    engine_runs, embedded_runs, base_runs = [], [], []
    for _ in range(repeat):
        gc.unfreeze()
        with tempfile.TemporaryDirectory() as tmp:
            embedded_runs.append(asyncio.run(run_ledgerflow(n, Path(tmp))))
        gc.collect()
        gc.freeze()
        with tempfile.TemporaryDirectory() as tmp:
            engine_runs.append(asyncio.run(run_ledgerflow(n, Path(tmp))))
        with tempfile.TemporaryDirectory() as tmp:
            base_runs.append(asyncio.run(run_baseline(n, Path(tmp))))
        engine, base = engine_runs[-1]["rows_per_s"], base_runs[-1]["rows_per_s"]
        # The host's load moves a pair's two runs together, far less their ratio.
        print(
            f"  run {len(engine_runs)}: ledgerflow {engine:,.0f} rows/s, baseline "
            f"{base:,.0f} rows/s, ratio {engine / base:.2f}",
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in engine_runs) for k in engine_runs[0]}
    embedded = statistics.median(r["rows_per_s"] for r in embedded_runs)
    base = statistics.median(r["rows_per_s"] for r in base_runs)
    ratios = sorted(
        e["rows_per_s"] / b["rows_per_s"] for e, b in zip(engine_runs, base_runs, strict=True)
    )
    print(f"rows: {n:,}  (median of {repeat})")
    print(f"ledgerflow, full audit : {med['rows_per_s']:>10,.0f} rows/s  (as `ledgerflow run`)")
    print(f"  same, collector as is: {embedded:>10,.0f} rows/s  (embedded, heap not frozen)")
    print(f"plain asyncio baseline : {base:>10,.0f} rows/s")
    print(
        f"ratio ledgerflow/base  : {statistics.median(ratios):>10.2f}  "
        f"(median of the pairs; {ratios[0]:.2f}-{ratios[-1]:.2f})"
    )
    print(f"time to first sink write: {med['first_write_s']:.3f} s of {med['seconds']:.2f} s")
    print(f"Landscape size per row : {med['bytes_per_row']:,.0f} bytes")
    print(
        f"CPU per row            : engine process {med['engine_cpu_us_per_row']:.0f} us, "
        f"SQLite writer process {med['writer_cpu_us_per_row']:.0f} us"
    )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS (this process): {peak_mib:,.0f} MiB")


def memory(n: int, pipeline: str = "linear", goal: str = "") -> None:
    """Peak RSS of the whole process tree (the engine and its SQLite writer) running
    ``pipeline`` (see memory.py) at ``n`` and ``10 n`` rows, each in a fresh child
    process, and their ratio."""
    from memory import ROOT, spawn

    peaks = []
    for rows in (n, 10 * n):
        figures = spawn(ROOT, pipeline, str(rows))
        peaks.append(figures["tree"])
        print(
            f"peak RSS at {rows:>10,} rows: {figures['tree']:8,.0f} MiB  (engine "
            f"{figures['engine']:,.0f}, writer {figures['writer']:,.0f}; "
            f"{figures['rows_per_s']:,.0f} rows/s)"
        )
    print(f"ratio                      : {peaks[1] / peaks[0]:8.2f}{goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rss", action="store_true", help="peak RSS at N and 10 x N rows")
    args = parser.parse_args()
    if args.rss:
        memory(args.rows, goal="   (goal <= 1.30)")
    else:
        compare(args.rows, args.repeat)


if __name__ == "__main__":
    main()
