"""The same pipeline on both Landscapes: a SQLite file (commits in the writer process)
and PostgreSQL (commits through asyncpg), each run's audit trail verified."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import func, select

from engine import Pipeline
from landscape import Landscape
from landscape import _schema as t

from .conftest import linear_config


async def test_a_pipeline_records_the_same_trail_on_either_landscape(
    landscape_url: str, tmp_path: Path
) -> None:
    rows = [{"id": i, "amount": i * 1.5, "name": f"n{i}", "bad": i == 7} for i in range(40)]
    config = linear_config(
        rows,
        tmp_path,
        source_to="raw",
        transforms=[
            {
                "name": "calc",
                "plugin": "compute",
                "input": "raw",
                "on_success": "scored",
                "on_error": "errors",
                "options": {"fields": {"ratio": "row['amount'] / (0 if row['bad'] else 2)"}},
            },
        ],
        gates=[
            {
                "name": "g",
                "input": "scored",
                "condition": "row['ratio'] > 10",
                "routes": {"true": "out", "false": "discard"},
            }
        ],
    )
    config["sinks"].append(
        {"name": "errors", "plugin": "jsonl", "options": {"path": str(tmp_path / "e.jsonl")}}
    )
    result = await Pipeline.from_dict(config, landscape_url=landscape_url).run()
    assert result.outcomes == {"routed": 26, "discarded": 13, "quarantined": 1}
    written = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in written] == list(range(14, 40))
    async with Landscape.connect(landscape_url) as landscape:
        report = await landscape.verify(result.run_id)
        lineage = await landscape.explain(result.run_id, row_index=20)
        async with landscape.engine.connect() as conn:
            states = (await conn.execute(select(func.count()).select_from(t.node_states))).scalar()
    assert report.ok, report.violations
    assert lineage.to_dict()["row"]["row_index"] == 20
    # source and calc see every row, the gate all but the failed one; then the two sinks
    assert states == 40 + 40 + 39 + 1 + 26
