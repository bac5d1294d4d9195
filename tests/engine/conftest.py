"""Helpers for engine tests: build pipelines from dicts, run them, verify their audit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from engine import Pipeline, RunResult
from landscape import Landscape

Config = dict[str, Any]


def linear_config(
    rows: Iterable[dict[str, Any]], out: Path, *, source_to: str = "out", **extra: Any
) -> Config:
    """A memory source feeding ``source_to`` (default: a JSONL sink named ``out``, written
    under ``out``); ``extra`` adds or replaces sections (transforms, gates, ...)."""
    config: Config = {
        "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": source_to},
        "sinks": [{"name": "out", "plugin": "jsonl", "options": {"path": str(out / "out.jsonl")}}],
    }
    config.update(extra)
    return config


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"


@pytest.fixture
def run_verified(sqlite_url: str, tmp_path: Path) -> Callable[..., Any]:
    """``await run_verified(config)`` runs a pipeline and asserts its audit trail verifies."""

    async def run(config: Config, *, url: str | None = None) -> RunResult:
        pipeline = Pipeline.from_dict(config, base_dir=tmp_path, landscape_url=url or sqlite_url)
        result = await pipeline.run()
        async with Landscape.connect(url or sqlite_url) as landscape:
            report = await landscape.verify(result.run_id)
        assert report.ok, [str(v) for v in report.violations]
        return result

    return run
