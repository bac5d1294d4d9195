"""The `embedding` transform against the mock server."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from landscape import Landscape
from landscape import _schema as t
from plugins.llm import MockLlmServer, MockSettings

from .conftest import pipeline

Run = Callable[..., Any]


def embed_node(**options: Any) -> dict[str, Any]:
    return {
        "name": "embed",
        "plugin": "embedding",
        "input": "raw",
        "on_success": "out",
        "on_error": "errors",
        "concurrency": 4,
        "options": {"endpoint": "local", "model": "mock-embed", "input_field": "text", **options},
    }


async def test_each_row_gets_its_vector_and_every_call_is_recorded(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows = [{"id": 0, "text": "alpha"}, {"id": 1, "text": "beta"}, {"id": 2, "text": None}]
    async with MockLlmServer(MockSettings(embedding_dimensions=6)) as server:
        config = pipeline(server.base_url, rows, tmp_path, transforms=[embed_node()])
        result = await run_verified(config)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["id"] for row in out] == [0, 1]
    for row in out:
        assert len(row["embedding"]) == 6
        assert math.isclose(math.fsum(v * v for v in row["embedding"]), 1.0, rel_tol=1e-6)
    assert out[0]["embedding"] != out[1]["embedding"]
    (error,) = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert error["id"] == 2
    assert "not text" in error["_error"]
    async with Landscape.connect(sqlite_url) as landscape, landscape.engine.connect() as conn:
        calls = (await conn.execute(select(t.calls))).mappings().all()
    assert [c["call_type"] for c in calls] == ["embedding", "embedding"]
    assert result.calls.calls == 2
