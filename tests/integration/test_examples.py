"""Every example runs, and leaves an audit trail that verifies."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from rich.console import Console
from sqlalchemy import select

from engine import Pipeline
from engine._render import render_lineage
from landscape import Landscape
from landscape import _schema as t
from tests._read import read_jsonl

from .conftest import ROOT, run_id_of


async def test_quickstart_through_the_python_api(quickstart: Path, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    result = await Pipeline.from_yaml(quickstart, landscape_url=url).run()
    assert result.status == "completed"
    assert result.rows_processed == 400
    assert result.outcomes["quarantined"] == 4
    assert sum(result.outcomes.values()) == 400
    out = quickstart.parent / "out"
    with (out / "review.csv").open(encoding="utf-8", newline="") as file:
        review = list(csv.DictReader(file))
    accepted = read_jsonl(out / "accepted.jsonl")
    assert len(review) + len(accepted) == 396
    assert accepted
    assert review
    assert all(row["amount_eur"] < 500 for row in accepted)
    assert all(float(row["amount_eur"]) >= 500 for row in review)
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(result.run_id)
    assert report.ok, report.violations


def render_text(lineage: Any) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_lineage(lineage))
    return console.export_text()


async def test_order_summary_forks_joins_and_summarises_per_country(
    order_summary: Path, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    result = await Pipeline.from_yaml(order_summary, landscape_url=url).run()
    assert result.status == "completed"
    out = order_summary.parent / "out"
    held = read_jsonl(out / "held.jsonl")
    incomplete = read_jsonl(out / "incomplete.jsonl")
    summaries = read_jsonl(out / "summaries.jsonl")
    valid = 400 - len(read_jsonl(out / "quarantine.jsonl"))
    # A held risk branch makes its join fail at once; the pricing half says what is missing.
    assert held
    assert all(row["risk"] >= 0.9 for row in held)
    assert sorted(r["order_id"] for r in incomplete) == sorted(r["order_id"] for r in held)
    assert {r["_error_node"] for r in incomplete} == {"join"}
    assert sum(s["count"] for s in summaries) == valid - len(held)
    assert all(s["count"] <= 50 for s in summaries)
    assert result.outcomes["consumed_in_batch"] == valid - len(held)
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(result.run_id)
        async with landscape.engine.connect() as conn:
            query = select(t.node_states.c.context_json).where(
                t.node_states.c.run_id == result.run_id,
                t.node_states.c.node_id == "join",
                t.node_states.c.status == "failed",
            )
            contexts = [json.loads(c) for c in (await conn.execute(query)).scalars()]
    assert report.ok, report.violations
    assert len(contexts) == len(held)
    assert all(c["missing_branches"] == ["risk"] for c in contexts)
    assert all(c["reason"] == "missing_branches" for c in contexts)


async def test_llm_enrichment_example_classifies_every_ticket_against_the_mock(
    llm_enrichment: Path, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    command = [sys.executable, str(llm_enrichment), "--landscape", url, "--port", "0"]
    done = await anyio.run_process(command, check=False)
    assert done.returncode == 0, done.stderr.decode()
    run_id = run_id_of(done.stdout.decode())
    out = llm_enrichment.parent / "out"
    triaged = read_jsonl(out / "triaged.jsonl")
    with (out / "escalations.csv").open(encoding="utf-8", newline="") as file:
        escalated = list(csv.DictReader(file))
    assert len(triaged) + len(escalated) == 60
    assert triaged
    assert escalated
    assert all(row["priority"] == "high" for row in escalated)
    assert all(row["priority"] in {"low", "normal"} for row in triaged)
    assert all(row["category"] in {"billing", "login", "bug", "feature"} for row in triaged)
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(run_id)
        lineage = await landscape.explain(run_id, row_index=0)
    assert report.ok, report.violations
    rendered = render_text(lineage)
    assert "Ticket 5000" in rendered  # the prompt as sent
    assert '"priority"' in rendered  # the answer as received


async def test_batch_replay_example_replays_its_batch_jobs_and_names_the_rerouted_rows(
    batch_replay: Path, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    command = [sys.executable, str(batch_replay), "--landscape", url, "--port", "0"]
    done = await anyio.run_process(command, check=False)
    assert done.returncode == 0, done.stderr.decode()
    output = done.stdout.decode()
    recorded = re.search(r"^recorded run: (\S+)$", output, re.MULTILINE)
    replay = re.search(r"^replay run: (\S+)$", output, re.MULTILINE)
    assert recorded is not None, output
    assert replay is not None, output
    assert "batch jobs created: 3" in output
    out = batch_replay.parent / "out"
    urgent, later = read_jsonl(out / "urgent.jsonl"), read_jsonl(out / "later.jsonl")
    assert len(urgent) + len(later) == 60
    assert all(row["urgency"] >= 0.7 for row in urgent)
    replay_urgent = read_jsonl(out / "replay" / "urgent.jsonl")
    moved = sorted(r["ticket_id"] for r in later if r["urgency"] >= 0.5)
    assert moved
    assert sorted(r["ticket_id"] for r in replay_urgent) == sorted(
        [r["ticket_id"] for r in urgent] + moved
    )
    assert f"diff: {len(moved)} of 60 tickets routed differently" in output
    async with Landscape.connect(url) as landscape:
        for run_id in (recorded[1], replay[1]):
            report = await landscape.verify(run_id)
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
