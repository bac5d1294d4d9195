"""Run the batch-job example against the mock server, replay it with another gate
threshold, and show what changed.

    python examples/batch_replay/run.py [--landscape URL] [--port N]

1. The mock LLM server starts on 127.0.0.1 (by default on the port of ``pipeline.yaml``'s
   endpoint; ``--port 0`` picks a free one) and answers the pipeline's batch jobs after
   a short delay; the run's id is printed as ``recorded run``.
2. The server stops.  The same pipeline, its gate lowered from 0.7 to 0.5 and its sinks
   under ``out/replay/``, replays the recorded run: every answer comes from the
   Landscape (``replay run``).
3. ``diff`` lists the tickets the lower threshold sends elsewhere, and why.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import yaml

from engine import Pipeline, RunResult
from landscape import Landscape, diff_runs
from plugins.llm import MockLlmServer, MockSettings

HERE = Path(__file__).resolve().parent


def lowered(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the gate at 0.5 and the sinks under ``out/replay/``."""
    changed = copy.deepcopy(config)
    changed["gates"][0]["condition"] = "row['urgency'] >= 0.5"
    for sink in changed["sinks"]:
        sink["options"]["path"] = sink["options"]["path"].replace("out/", "out/replay/")
    return changed


def report(label: str, result: RunResult) -> None:
    print(f"{label}: {result.run_id}")
    print(f"  status {result.status}; {result.calls.describe()}")
    for outcome, count in sorted(result.outcomes.items()):
        print(f"  {outcome}: {count}")


async def main(landscape: str | None, port: int | None) -> None:
    config = yaml.safe_load((HERE / "pipeline.yaml").read_text(encoding="utf-8"))
    endpoint = config["endpoints"]["local"]
    if port is None:
        port = urlparse(endpoint["base_url"]).port or 0
    async with MockLlmServer(MockSettings(seed=3, batch_delay_seconds=1.0), port=port) as server:
        endpoint["base_url"] = server.base_url
        recorded = await Pipeline.from_dict(config, base_dir=HERE, landscape_url=landscape).run()
        jobs = server.statistics().batches_created
    report("recorded run", recorded)
    print(f"  batch jobs created: {jobs}")

    replaying = Pipeline.from_dict(lowered(config), base_dir=HERE, landscape_url=landscape)
    replay = await replaying.run(replay=recorded.run_id)
    report("replay run", replay)

    async with Landscape.connect(replaying.landscape_url) as store:
        diff = await diff_runs(store, recorded.run_id, replay.run_id)
    counts = diff.counts
    print(f"diff: {counts.different} of {counts.compared} tickets routed differently")
    for row in diff.rows:
        split = row.first_divergence
        ends = [f"{a.sink} -> {b.sink}" for a, b in zip(row.ends_a, row.ends_b, strict=False)]
        where = "" if split is None else f" at {split.node_id}"
        print(f"  row {row.row_index}: {', '.join(ends)}{where}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--landscape", metavar="URL", help="Landscape URL (default: the file's)")
    parser.add_argument("--port", type=int, help="mock server port (default: the file's)")
    args = parser.parse_args()
    anyio.run(main, args.landscape, args.port)
