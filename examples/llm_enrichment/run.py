"""Run the LLM enrichment example against the mock LLM server it starts itself.

    python examples/llm_enrichment/run.py [--landscape URL] [--port N]

The mock server listens on 127.0.0.1, by default on the port of ``pipeline.yaml``'s
endpoint (8765; ``--port 0`` picks a free one), for the duration of the run; nothing
leaves the machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlparse

import anyio
import yaml

from engine import Pipeline
from plugins.llm import MockLlmServer, MockSettings, UniformLatency

HERE = Path(__file__).resolve().parent


async def main(landscape: str | None, port: int | None) -> None:
    config = yaml.safe_load((HERE / "pipeline.yaml").read_text(encoding="utf-8"))
    endpoint = config["endpoints"]["local"]
    if port is None:
        port = urlparse(endpoint["base_url"]).port or 0
    settings = MockSettings(seed=1, latency=UniformLatency(0.05, 0.25))
    async with MockLlmServer(settings, port=port) as server:
        endpoint["base_url"] = server.base_url
        pipeline = Pipeline.from_dict(config, base_dir=HERE, landscape_url=landscape)
        result = await pipeline.run()
    print(f"run_id: {result.run_id}")
    print(f"status: {result.status}")
    for outcome, count in sorted(result.outcomes.items()):
        print(f"  {outcome}: {count}")
    print(result.calls.describe())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--landscape", metavar="URL", help="Landscape URL (default: the file's)")
    parser.add_argument("--port", type=int, help="mock server port (default: the file's)")
    args = parser.parse_args()
    anyio.run(main, args.landscape, args.port)
