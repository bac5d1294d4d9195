"""Helpers for engine tests: pipelines from dicts (``run_verified`` is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
