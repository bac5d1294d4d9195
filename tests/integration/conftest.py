"""Running the ``ledgerflow`` command as a user would: a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """``cli("run", "p.yaml")`` runs ``ledgerflow`` in ``tmp_path`` and returns the result."""

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
        return subprocess.run(
            [sys.executable, "-m", "engine.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture
def quickstart(tmp_path: Path) -> Path:
    """A private copy of the quickstart example; returns its pipeline file."""
    target = tmp_path / "quickstart"
    shutil.copytree(ROOT / "examples" / "quickstart", target, ignore=shutil.ignore_patterns("out"))
    return target / "pipeline.yaml"


@pytest.fixture
def order_summary(tmp_path: Path) -> Path:
    """A private copy of the order-summary example (it reads the quickstart's data)."""
    for name in ("quickstart", "order_summary"):
        shutil.copytree(
            ROOT / "examples" / name, tmp_path / name, ignore=shutil.ignore_patterns("out")
        )
    return tmp_path / "order_summary" / "pipeline.yaml"


@pytest.fixture
def llm_enrichment(tmp_path: Path) -> Path:
    """A private copy of the LLM enrichment example; returns its run script."""
    target = tmp_path / "llm_enrichment"
    shutil.copytree(
        ROOT / "examples" / "llm_enrichment", target, ignore=shutil.ignore_patterns("out")
    )
    return target / "run.py"


@pytest.fixture
def batch_replay(tmp_path: Path) -> Path:
    """A private copy of the batch-and-replay example (it reads the LLM example's data)."""
    for name in ("llm_enrichment", "batch_replay"):
        shutil.copytree(
            ROOT / "examples" / name, tmp_path / name, ignore=shutil.ignore_patterns("out")
        )
    return tmp_path / "batch_replay" / "run.py"


def run_id_of(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no run id in:\n{output}")
