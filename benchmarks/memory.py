"""Peak RSS of the whole process tree (the engine and its SQLite writer process).

    python benchmarks/memory.py [--rows 20000] [--only linear|join|service] [--tree DIR]

* **linear** (``throughput.py``'s pipeline) and **join** (``join_aggregate.py``'s
  fork/coalesce/aggregate pipeline): each at N and 10 x N rows, each run alone in a
  fresh child process; printed are the peak of the tree's summed RSS, the engine's and
  the writer's own peaks, the rows/s, and the ratio of the two tree peaks (the goal:
  at most 1.3).
* **service**: one process runs ``--runs`` (20) linear runs of ``--service-rows`` rows
  one after another on one Landscape, as an embedding service would; printed are, for
  runs 1, 5, 10 and 20, the tree's peak RSS during the run and the engine's RSS after
  it (the goal: no growth).

The RSS of the child process and all its descendants is sampled every 20 ms by a
thread of the child (psutil).  With ``--tree DIR`` the same figures are measured for
another checkout (on ``PYTHONPATH``), each case right after this tree's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 1 << 20


class TreeSampler:
    """Samples the summed RSS of this process and its descendants in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self._interval = interval
        self._me = psutil.Process()
        self._stop = threading.Event()
        self.peak_tree = 0
        self.peak_engine = 0
        self.peak_children = 0

    def sample(self) -> int:
        engine = self._me.memory_info().rss
        children = 0
        for child in self._me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # it ended since it was listed
                children += child.memory_info().rss
        self.peak_engine = max(self.peak_engine, engine)
        self.peak_children = max(self.peak_children, children)
        self.peak_tree = max(self.peak_tree, engine + children)
        return engine + children

    def reset(self) -> None:
        self.peak_tree = self.peak_engine = self.peak_children = 0

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    @contextmanager
    def running(self) -> Iterator[TreeSampler]:
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def peaks(self) -> dict[str, float]:
        return {
            "tree": self.peak_tree / MIB,
            "engine": self.peak_engine / MIB,
            "writer": self.peak_children / MIB,
        }


def _runner(pipeline: str) -> Callable[[int, Path], Any]:
    if pipeline == "join":
        from join_aggregate import run_join

        return run_join
    from throughput import run_ledgerflow

    return run_ledgerflow


def child_single(pipeline: str, rows: int) -> dict[str, Any]:
    run = _runner(pipeline)
    sampler = TreeSampler()
    with sampler.running(), tempfile.TemporaryDirectory() as tmp:
        figures = asyncio.run(run(rows, Path(tmp)))
        sampler.sample()
    return {**sampler.peaks(), **figures}


def child_service(rows: int, runs: int) -> dict[str, Any]:
    """``runs`` runs one after another in one process and one event loop."""
    run = _runner("linear")
    sampler = TreeSampler()
    me = psutil.Process()
    report: list[dict[str, float]] = []

    async def serve(workdir: Path) -> None:
        for _ in range(runs):
            sampler.reset()
            figures = await run(rows, workdir)
            sampler.sample()
            after = me.memory_info().rss / MIB
            report.append({**sampler.peaks(), "after": after, "rows_per_s": figures["rows_per_s"]})

    with sampler.running(), tempfile.TemporaryDirectory() as tmp:
        asyncio.run(serve(Path(tmp)))
    return {"runs": report}


def spawn(tree: Path, *args: str) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    figures: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return figures


def single_line(label: str, rows: int, f: dict[str, Any]) -> str:
    return (
        f"  {label:>14} {rows:>10,} rows: tree {f['tree']:6,.0f} MiB  (engine "
        f"{f['engine']:5,.0f}, writer {f['writer']:5,.0f})  {f['rows_per_s']:8,.0f} rows/s"
    )


def sizes(args: argparse.Namespace, trees: dict[str, Path], pipeline: str) -> None:
    title = {"linear": "linear (throughput.py)", "join": "fork/coalesce/aggregate"}[pipeline]
    for small in args.rows:
        print(f"{title}, {small:,} vs {10 * small:,} rows:", flush=True)
        peaks: dict[str, list[float]] = {label: [] for label in trees}
        for n in (small, 10 * small):
            for label, tree in trees.items():
                figures = spawn(tree, pipeline, str(n))
                peaks[label].append(figures["tree"])
                print(single_line(label, n, figures), flush=True)
        for label, (low, high) in peaks.items():
            print(f"  {label:>14} ratio {high / low:.2f}   (goal <= 1.30)")


def service(args: argparse.Namespace, trees: dict[str, Path]) -> None:
    print(f"service: {args.runs} runs of {args.service_rows:,} rows in one process:", flush=True)
    for label, tree in trees.items():
        runs = spawn(tree, "service", str(args.service_rows), str(args.runs))["runs"]
        shown = [i for i in (1, 5, 10, 20, args.runs) if i <= len(runs)]
        cells = "  ".join(
            f"#{i}: {runs[i - 1]['tree']:4,.0f}/{runs[i - 1]['after']:4,.0f}"
            for i in sorted(set(shown))
        )
        growth = runs[-1]["after"] - runs[0]["after"]
        print(
            f"  {label:>14} tree peak / engine after, MiB  {cells}   "
            f"(engine after #{len(runs)} - after #1: {growth:+.0f} MiB)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--only", choices=["linear", "join", "service"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--service-rows", type=int, default=5_000)
    parser.add_argument("--tree", type=Path, help="another checkout to measure as well")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "service":
            figures = child_service(int(rest[0]), int(rest[1]))
        else:
            figures = child_single(kind, int(rest[0]))
        print(json.dumps(figures))
        return
    trees = {"this tree": ROOT} | ({str(args.tree): args.tree} if args.tree else {})
    for pipeline in ("linear", "join"):
        if args.only in (None, pipeline):
            sizes(args, trees, pipeline)
    if args.only in (None, "service"):
        service(args, trees)


if __name__ == "__main__":
    main()
