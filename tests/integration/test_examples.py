"""Every example runs, and leaves an audit trail that verifies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

from engine import Pipeline
from landscape import Landscape

from .conftest import ROOT, run_id_of


async def test_quickstart_through_the_python_api(quickstart: Path, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    result = await Pipeline.from_yaml(quickstart, landscape_url=url).run()
    assert result.status == "completed"
    assert result.rows_processed == 400
    assert result.outcomes["quarantined"] == 4
    assert sum(result.outcomes.values()) == 400
    out = quickstart.parent / "out"
    review = (out / "review.csv").read_text(encoding="utf-8").splitlines()
    accepted = (out / "accepted.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(review) - 1 + len(accepted) == 396
    assert all(json.loads(line)["amount_eur"] < 500 for line in accepted)
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(result.run_id)
    assert report.ok, report.violations


@pytest.mark.parametrize("events", [300])
async def test_embedded_service_example(tmp_path: Path, events: int) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    script = ROOT / "examples" / "embedded_service" / "service.py"
    done = await anyio.run_process(
        [
            sys.executable,
            str(script),
            "--landscape",
            url,
            "--out",
            str(tmp_path / "out"),
            "--events",
            str(events),
        ],
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    run_id = run_id_of(done.stdout.decode())
    alerts = (tmp_path / "out" / "alerts.jsonl").read_text(encoding="utf-8").splitlines()
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(alerts) + len(metrics) == events
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(run_id)
    assert report.ok, report.violations
