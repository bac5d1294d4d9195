"""Property: a concurrent transform loses nothing, duplicates nothing and keeps order,
whatever the latencies and failures; the audit trail of every run verifies."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import ClassVar

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Pipeline
from landscape import Landscape
from plugins import Row, RowContext, Transform


class Scripted(Transform):
    """Waits the row's scripted number of scheduler turns, then fails or tags it."""

    name: ClassVar[str] = ""

    async def process(self, row: Row, ctx: RowContext) -> Row:
        for _ in range(row["turns"]):
            await anyio.lowlevel.checkpoint()
        if row["fail"]:
            raise RuntimeError(f"scripted failure of {row['id']}")
        return {**row, "done": True}


async def run_scripted(
    script: list[tuple[int, bool]], concurrency: int, extra: int, ordered: bool
) -> tuple[list[int], list[int], dict[str, int], bool]:
    rows = [{"id": i, "turns": turns, "fail": fail} for i, (turns, fail) in enumerate(script)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        url = f"sqlite+aiosqlite:///{out / 'audit.db'}"
        config = {
            "source": {"plugin": "memory", "options": {"rows": rows}, "on_success": "in"},
            "transforms": [
                {
                    "name": "work",
                    "plugin": Scripted,
                    "input": "in",
                    "on_success": "ok",
                    "on_error": "errors",
                    "concurrency": concurrency,
                    "max_pending": concurrency + extra,
                    "ordered": ordered,
                },
            ],
            "sinks": [
                {"name": "ok", "plugin": "jsonl", "options": {"path": str(out / "ok.jsonl")}},
                {"name": "errors", "plugin": "jsonl", "options": {"path": str(out / "e.jsonl")}},
            ],
            "runtime": {"max_buffer_size": 4},
        }
        result = await Pipeline.from_dict(config, landscape_url=url).run()
        ok = [json.loads(line)["id"] for line in (out / "ok.jsonl").read_text().splitlines()]
        errors = [json.loads(line)["id"] for line in (out / "e.jsonl").read_text().splitlines()]
        async with Landscape.connect(url) as landscape:
            verified = (await landscape.verify(result.run_id)).ok
    return ok, errors, result.outcomes, verified


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(st.tuples(st.integers(0, 20), st.booleans()), max_size=40),
    concurrency=st.integers(2, 8),
    extra=st.integers(0, 8),
    ordered=st.booleans(),
)
def test_every_row_ends_once_in_order(
    script: list[tuple[int, bool]], concurrency: int, extra: int, ordered: bool
) -> None:
    ok, errors, outcomes, verified = anyio.run(run_scripted, script, concurrency, extra, ordered)
    expected_ok = [i for i, (_, fail) in enumerate(script) if not fail]
    expected_errors = [i for i, (_, fail) in enumerate(script) if fail]
    assert (ok if ordered else sorted(ok)) == expected_ok
    assert (errors if ordered else sorted(errors)) == expected_errors
    assert outcomes.get("completed", 0) == len(expected_ok)
    assert outcomes.get("quarantined", 0) == len(expected_errors)
    assert verified
