"""Runs that stop themselves: a plugin's :class:`~plugins.StopRun` (the row is left for a
resume, not failed), ``runtime.max_failed_rows`` / ``max_failed_ratio``, and the budget
guard that reserves a call's estimate before it is sent."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio.lowlevel
import pytest

from engine import Pipeline, RunResult
from engine._calls import BudgetGuard, CallTotals
from engine._config import BudgetSettings
from landscape import Landscape
from plugins import (
    BatchContext,
    ExternalCall,
    Reservation,
    Row,
    RowContext,
    StopRun,
    Transform,
)
from plugins._aggregations import CollectAggregation
from tests._read import attempts_at, read_jsonl

from .conftest import linear_config
from .sample_plugins import Divide


class Quota(Transform):
    """Tags rows; raises :class:`StopRun` for the rows in ``refused``."""

    name: ClassVar[str] = "quota"
    refused: ClassVar[set[int]] = set()

    async def process(self, row: Row, ctx: RowContext) -> Row:
        await anyio.lowlevel.checkpoint()
        if row["i"] in Quota.refused:
            raise StopRun(f"quota reached at row {row['i']}")
        return {**row, "tagged": row["i"] * 10}


class QuotaFlush(CollectAggregation):
    """``collect``, whose flushes raise :class:`StopRun` while ``refuse`` is set."""

    refuse: ClassVar[bool] = False

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        if QuotaFlush.refuse:
            raise StopRun("quota reached in a flush")
        return await super().flush(rows, ctx)


@pytest.fixture(autouse=True)
def _no_quota() -> None:
    Quota.refused = set()
    QuotaFlush.refuse = False


async def verified(url: str, run_id: str) -> None:
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(run_id)
    assert report.ok, [str(v) for v in report.violations]


def quota_config(rows: int, out: Path, *, concurrency: int) -> dict[str, Any]:
    config = linear_config(
        [{"i": i} for i in range(rows)],
        out,
        source_to="tag",
        transforms=[
            {
                "name": "tag",
                "plugin": Quota,
                "input": "tag",
                "on_success": "out",
                "concurrency": concurrency,
            }
        ],
    )
    config["runtime"] = {"max_buffer_size": 4}
    return config


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_row_whose_plugin_asks_the_run_to_stop_is_left_for_the_resume(
    concurrency: int, tmp_path: Path, sqlite_url: str
) -> None:
    config = quota_config(60, tmp_path, concurrency=concurrency)
    Quota.refused = {10}
    first = await Pipeline.from_dict(config, landscape_url=sqlite_url).run()
    assert first.status == "interrupted"
    assert first.stop_reason == "quota reached at row 10"
    assert first.rows_processed < 60  # the source stopped being read
    assert set(first.outcomes) == {"completed"}  # row 10 is no one's error
    written = [row["i"] for row in read_jsonl(tmp_path / "out.jsonl")]
    assert 10 not in written
    assert first.outcomes["completed"] == len(written) == first.rows_processed - 1
    await verified(sqlite_url, first.run_id)
    async with Landscape.connect(sqlite_url) as landscape:
        run = await landscape.get_run(first.run_id)
    assert run is not None
    assert run.status == "interrupted"

    Quota.refused = set()
    second = await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(first.run_id)
    assert second.status == "completed"
    assert second.stop_reason is None
    out = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(row["i"] for row in out) == list(range(60))  # each row exactly once
    await verified(sqlite_url, first.run_id)
    # Row 10's work was left cancelled, then done again as the token's second attempt.
    assert await attempts_at(sqlite_url, 10, "tag") == [(1, "cancelled"), (2, "completed")]


async def test_a_batch_whose_flush_asks_the_run_to_stop_is_flushed_again_by_the_resume(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = quota_config(10, tmp_path, concurrency=1)
    config["transforms"][0]["on_success"] = "pool"
    config["aggregations"] = [
        {
            "name": "pool",
            "plugin": QuotaFlush,
            "input": "pool",
            "on_success": "out",
            "trigger": {"count": 4},
            "options": {"field": "members"},
        }
    ]
    Quota.refused = set()
    QuotaFlush.refuse = True
    first = await Pipeline.from_dict(config, landscape_url=sqlite_url).run()
    assert first.status == "interrupted"
    assert first.stop_reason == "quota reached in a flush"
    assert "failed" not in first.outcomes
    assert read_jsonl(tmp_path / "out.jsonl") == []
    await verified(sqlite_url, first.run_id)

    QuotaFlush.refuse = False
    second = await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(first.run_id)
    assert second.status == "completed"
    members = [[m["i"] for m in row["members"]] for row in read_jsonl(tmp_path / "out.jsonl")]
    assert sorted(i for batch in members for i in batch) == list(range(10))
    assert members[0] == [0, 1, 2, 3]  # the batch the stop left, flushed by the resume
    await verified(sqlite_url, first.run_id)


def divide_config(rows: list[dict[str, Any]], out: Path, **runtime: Any) -> dict[str, Any]:
    config = linear_config(
        rows,
        out,
        source_to="divide",
        transforms=[
            {
                "name": "divide",
                "plugin": Divide,
                "input": "divide",
                "on_success": "out",
                "on_error": "errors",
            }
        ],
    )
    config["sinks"].append(
        {"name": "errors", "plugin": "jsonl", "options": {"path": str(out / "errors.jsonl")}}
    )
    config["runtime"] = {"max_buffer_size": 2, **runtime}
    return config


async def run(config: dict[str, Any], url: str) -> RunResult:
    result = await Pipeline.from_dict(config, landscape_url=url).run()
    await verified(url, result.run_id)
    return result


async def test_max_failed_rows_stops_the_run_once_crossed_and_resume_goes_on(
    tmp_path: Path, sqlite_url: str
) -> None:
    rows = [{"i": i, "a": i, "b": 0 if i < 50 else 1} for i in range(100)]  # 50 errors
    config = divide_config(rows, tmp_path, max_failed_rows=5)
    first = await run(config, sqlite_url)
    assert first.status == "interrupted"
    assert first.stop_reason == "failed rows: 6 > max_failed_rows 5"
    errors = read_jsonl(tmp_path / "errors.jsonl")
    # The rows read before the stop finish (a buffer's worth or so), the rest wait.
    assert 6 <= len(errors) <= 6 + 4
    assert first.rows_processed == len(errors) < 50
    assert first.row_errors == len(errors)

    # The limit counts from the start of each session: the resume fails 6 more, stops.
    second = await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(first.run_id)
    assert second.status == "interrupted"
    assert second.stop_reason == "failed rows: 6 > max_failed_rows 5"
    assert second.row_errors == len(read_jsonl(tmp_path / "errors.jsonl")) >= len(errors) + 6
    await verified(sqlite_url, first.run_id)


async def test_a_source_quarantine_is_no_row_error(tmp_path: Path, sqlite_url: str) -> None:
    rows = [{"i": i, "a": i, "b": "x" if i < 10 else 1} for i in range(30)]
    config = divide_config(rows, tmp_path, max_failed_rows=0)
    config["source"]["schema"] = {"mode": "dynamic", "fields": {"b": "int"}}
    config["source"]["on_validation_failure"] = "errors"
    first = await run(config, sqlite_url)
    assert first.status == "completed"
    assert first.outcomes == {"quarantined": 10, "completed": 20}
    assert first.row_errors == 0
    assert len(read_jsonl(tmp_path / "errors.jsonl")) == 10


async def test_max_failed_ratio_applies_once_enough_rows_finished(
    tmp_path: Path, sqlite_url: str
) -> None:
    # Every fifth row fails, and row 1: about 20 %, under a 0.3 ratio; the first two
    # rows fail, which the ratio overlooks until failed_ratio_min_rows rows finished.
    rows = [{"i": i, "a": i, "b": 0 if i % 5 == 0 or i == 1 else 1} for i in range(200)]
    config = divide_config(rows, tmp_path, max_failed_ratio=0.3, failed_ratio_min_rows=20)
    under = await run(config, sqlite_url)
    assert under.status == "completed"
    assert under.row_errors == 41

    rows = [{"i": i, "a": i, "b": 0 if i % 2 == 0 else 1} for i in range(200)]  # 50 %
    (tmp_path / "half").mkdir()
    config = divide_config(rows, tmp_path / "half", max_failed_ratio=0.3)
    over = await run(config, sqlite_url)
    assert over.status == "interrupted"
    assert over.stop_reason is not None
    assert over.stop_reason.startswith("failed rows: ")
    assert over.stop_reason.endswith("> max_failed_ratio 0.3")
    finished = int(over.stop_reason.split(" of ")[1].split()[0])
    assert finished == 20  # the first moment the ratio applies, it is crossed
    assert over.rows_processed < 200


async def test_the_budget_guard_waits_for_reservations_to_settle_then_refuses_for_good() -> None:
    guard = BudgetGuard(BudgetSettings(max_tokens=100))
    totals = CallTotals()
    spent: list[str] = []

    def settle(reservation: Reservation, tokens: int) -> None:
        """What an endpoint does as an attempt ends: record its usage, then release."""
        totals.add(ExternalCall("llm", None, None, 1, "success", {}, {}, 0.0, None, None, tokens))
        reservation.release()

    async def second() -> None:
        with await guard.reserve(totals, 60, 0.0) as reservation:
            spent.append("second")
            settle(reservation, 50)

    first = await guard.reserve(totals, 60, 0.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        assert spent == []  # 60 + 60 reserved would cross 100: it waits
        settle(first, 30)  # 30 + 60 fits
    assert spent == ["second"]
    assert (guard.reserved_tokens, totals.tokens) == (0, 80)
    with pytest.raises(StopRun, match="max_tokens 100: 80 tokens spent"):
        await guard.reserve(totals, 60, 0.0)  # nothing held that could make room
    with pytest.raises(StopRun, match="max_tokens 100: 80 tokens spent"):
        await guard.reserve(totals, 10, 0.0)  # exhausted: no call goes any more
    assert guard.exhausted is not None


def forked_quota_config(rows: int, out: Path) -> dict[str, Any]:
    """source -> fork into ``a`` (passthrough) and ``b`` (:class:`Quota`) -> join -> out."""
    config = linear_config(
        [{"i": i} for i in range(rows)],
        out,
        source_to="raw",
        gates=[{"name": "split", "input": "raw", "fork_to": {"a": "a_in", "b": "b_in"}}],
        transforms=[
            {"name": "keep_a", "plugin": "passthrough", "input": "a_in", "on_success": "a_out"},
            {"name": "tag_b", "plugin": Quota, "input": "b_in", "on_success": "b_out"},
        ],
        coalesce=[
            {
                "name": "join",
                "branches": {"a": "a_out", "b": "b_out"},
                "policy": "require_all",
                "on_success": "out",
            }
        ],
    )
    config["runtime"] = {"max_buffer_size": 4}
    return config


async def test_a_join_waiting_for_a_branch_left_by_a_stop_waits_for_the_resume(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = forked_quota_config(30, tmp_path)
    Quota.refused = {7}
    first = await Pipeline.from_dict(config, landscape_url=sqlite_url).run()
    assert first.status == "interrupted"
    assert first.stop_reason == "quota reached at row 7"
    # Row 7's branch a arrived at the join; its branch b was left: nobody's error.
    assert set(first.outcomes) <= {"completed", "coalesced", "forked"}
    assert 7 not in [row["i"] for row in read_jsonl(tmp_path / "out.jsonl")]
    await verified(sqlite_url, first.run_id)

    Quota.refused = set()
    second = await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(first.run_id)
    assert second.status == "completed"
    out = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(row["i"] for row in out) == list(range(30))  # each row joined once
    assert all(row["tagged"] == row["i"] * 10 for row in out)
    await verified(sqlite_url, first.run_id)
