"""Built-in transforms, each run through ``check_transform``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from plugins._transforms import (
    ComputeTransform,
    FieldMapError,
    FieldMapTransform,
    FilterTransform,
    PassthroughTransform,
)
from plugins.expressions import ExpressionEvaluationError, ExpressionSyntaxError
from plugins.protocols import Discard, PluginSetup, Row, RowContext, Transform, TransformResult
from plugins.testing import check_transform

SETUP = PluginSetup(node_name="transform", base_dir=Path("."))


def field_map(**options: Any) -> FieldMapTransform:
    return FieldMapTransform.from_options(options, SETUP)


def compute(fields: dict[str, str]) -> ComputeTransform:
    return ComputeTransform.from_options({"fields": fields}, SETUP)


def keep(expression: str) -> FilterTransform:
    return FilterTransform.from_options({"keep": expression}, SETUP)


async def run_one(transform: Transform, row: Row) -> TransformResult:
    [result] = await check_transform(transform, [row])
    return result


# -- field_map ----------------------------------------------------------------------------


async def test_field_map_applies_rename_select_drop_constants_in_order() -> None:
    transform = field_map(
        rename={"a": "x"},
        select=["x", "b", "c"],
        drop=["c"],
        constants={"c": "const", "d": 1},
    )
    result = await run_one(transform, {"a": 1, "b": 2, "c": 3, "z": 9})
    assert list(result.items()) == [("x", 1), ("b", 2), ("c", "const"), ("d", 1)]  # type: ignore[union-attr]


async def test_rename_keeps_field_positions_and_can_swap() -> None:
    result = await run_one(field_map(rename={"a": "b", "b": "a"}), {"a": 1, "b": 2, "c": 3})
    assert list(result.items()) == [("b", 1), ("a", 2), ("c", 3)]  # type: ignore[union-attr]


async def test_select_orders_fields_as_listed() -> None:
    result = await run_one(field_map(select=["c", "a"]), {"a": 1, "b": 2, "c": 3})
    assert list(result.items()) == [("c", 3), ("a", 1)]  # type: ignore[union-attr]


async def test_drop_ignores_absent_fields() -> None:
    results = await check_transform(field_map(drop=["b", "nope"]), [{"a": 1, "b": 2}, {"a": 3}])
    assert results == [{"a": 1}, {"a": 3}]


async def test_constants_replace_values_and_are_copied_per_row() -> None:
    rows: list[Row] = [{"a": 1, "tags": None}, {"a": 2}]
    first, second = await check_transform(field_map(constants={"tags": ["x"]}), rows)
    assert isinstance(first, dict)
    assert isinstance(second, dict)
    assert first == {"a": 1, "tags": ["x"]}
    assert second == {"a": 2, "tags": ["x"]}
    assert first["tags"] is not second["tags"]


@pytest.mark.parametrize(
    ("options", "row"),
    [
        ({"drop": ["x"]}, {"a": 1}),
        ({"select": ["a", "b"]}, {"a": 1, "b": 2}),
        ({"rename": {"a": "a"}}, {"a": 1}),
        ({"constants": {"flag": True}}, {"flag": True}),
        ({}, {"a": 1}),
    ],
)
async def test_field_map_returns_the_same_row_when_nothing_changes(
    options: dict[str, Any], row: Row
) -> None:
    assert await run_one(field_map(**options), row) is row


async def test_constant_equal_but_of_another_type_is_a_change() -> None:
    result = await run_one(field_map(constants={"flag": True}), {"flag": 1})
    assert isinstance(result, dict)
    assert result == {"flag": True}
    assert type(result["flag"]) is bool


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"rename": {"missing": "m"}},
            r"rename: no field 'missing' in the row \(it has: 'a', 'b'\)",
        ),
        ({"select": ["a", "missing"]}, r"select: no field 'missing' in the row"),
        (
            {"rename": {"a": "x"}, "select": ["a"]},
            r"select: no field 'a' in the row \(it has: 'x', 'b'\)",
        ),
        ({"rename": {"a": "b"}}, r"rename would overwrite field 'b'"),
    ],
)
async def test_field_map_row_errors_name_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(FieldMapError, match=message):
        await check_transform(field_map(**options), [{"a": 1, "b": 2}])


async def test_field_map_error_lists_only_the_first_fields_of_a_wide_row() -> None:
    row = {f"f{n}": n for n in range(100)}
    with pytest.raises(FieldMapError, match=r"'f19', \.\.\.\)$"):
        await check_transform(field_map(select=["nope"]), [row])


@pytest.mark.parametrize(
    "options",
    [
        {"rename": {"a": "x", "b": "x"}},
        {"select": []},
        {"select": ["a", "a"]},
        {"drop": "a"},
        {"unknown": 1},
    ],
)
def test_field_map_invalid_options_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        field_map(**options)


# -- compute ------------------------------------------------------------------------------


async def test_compute_evaluates_fields_in_order_seeing_earlier_ones() -> None:
    transform = compute({"total": "row['price'] * row['qty']", "big": "row['total'] > 10"})
    results = await check_transform(transform, [{"price": 2, "qty": 3}, {"price": 5, "qty": 3}])
    assert results == [
        {"price": 2, "qty": 3, "total": 6, "big": False},
        {"price": 5, "qty": 3, "total": 15, "big": True},
    ]


async def test_compute_overwrites_an_existing_field() -> None:
    result = await run_one(compute({"name": "upper(row['name'])"}), {"name": "ann"})
    assert result == {"name": "ANN"}


async def test_compute_returns_the_same_row_when_values_are_unchanged() -> None:
    row = {"name": "ann"}
    assert await run_one(compute({"name": "row['name']"}), row) is row


async def test_compute_syntax_error_names_the_field() -> None:
    with pytest.raises(ExpressionSyntaxError, match=r"^fields\.total: ") as caught:
        compute({"ok": "1", "total": "row['a'] +"})
    assert caught.value.source == "row['a'] +"


async def test_compute_forbidden_construct_is_a_syntax_error() -> None:
    with pytest.raises(ExpressionSyntaxError, match=r"^fields\.x: .*not allowed"):
        compute({"x": "row.__class__"})


async def test_compute_evaluation_error_is_an_error_of_the_row() -> None:
    transform = compute({"ratio": "row['a'] / row['b']"})
    async with transform:
        ok = await transform.process({"a": 1, "b": 2}, context())
        with pytest.raises(ExpressionEvaluationError, match=r"^compute: fields\.ratio: "):
            await transform.process({"a": 1, "b": 0}, context())
        with pytest.raises(ExpressionEvaluationError, match="no field 'b'"):
            await transform.process({"a": 1}, context())
    assert ok == {"a": 1, "b": 2, "ratio": 0.5}


def test_compute_needs_at_least_one_field() -> None:
    with pytest.raises(ValidationError):
        ComputeTransform.from_options({"fields": {}}, SETUP)


def context() -> RowContext:
    return RowContext(run_id="r", node_name="n", token_id="t", row_index=0, state_id="s")


# -- filter -------------------------------------------------------------------------------


async def test_filter_keeps_the_same_row_or_discards_with_the_expression() -> None:
    rows = [{"score": 0.9}, {"score": 0.1}]
    kept, dropped = await check_transform(keep("row['score'] > 0.5"), rows)
    assert kept is rows[0]
    assert dropped == Discard(reason="filter: row['score'] > 0.5 is false")


@pytest.mark.parametrize(("value", "kept"), [(0, False), ("", False), (None, False), ([1], True)])
async def test_filter_uses_truthiness(value: Any, kept: bool) -> None:
    result = await run_one(keep("row['v']"), {"v": value})
    assert isinstance(result, dict) is kept


async def test_filter_syntax_error_names_keep() -> None:
    with pytest.raises(ExpressionSyntaxError, match=r"^keep: "):
        keep("row[")


async def test_filter_evaluation_error_is_an_error_of_the_row() -> None:
    transform = keep("row['n'] > 1")
    async with transform:
        with pytest.raises(ExpressionEvaluationError, match=r"^filter: keep: "):
            await transform.process({"n": "text"}, context())


# -- passthrough --------------------------------------------------------------------------


async def test_passthrough_returns_the_same_row_object() -> None:
    rows: list[Row] = [{"a": 1}, {}]
    results = await check_transform(PassthroughTransform.from_options({}, SETUP), rows)
    assert all(result is row for result, row in zip(results, rows, strict=True))


def test_passthrough_takes_no_options() -> None:
    with pytest.raises(ValidationError):
        PassthroughTransform.from_options({"x": 1}, SETUP)


# -- the checker itself -------------------------------------------------------------------


class _Mutating(Transform):
    name = "mutating"

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        row["touched"] = True
        return row


class _WrongResult(Transform):
    name = "wrong"

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        return [row]  # type: ignore[return-value]


class _Counter(Transform):
    name = "counter"

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        self.calls = 0

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        self.calls += 1
        return {**row, "n": self.calls}


@pytest.mark.parametrize(
    ("transform_class", "message"),
    [
        (_Mutating, "'mutating' mutated its input row"),
        (_WrongResult, "'wrong' returned a list, not a dict or a Discard"),
        (_Counter, "deterministic 'counter' gave"),
    ],
)
async def test_check_transform_catches_broken_promises(
    transform_class: type[Transform], message: str
) -> None:
    with pytest.raises(AssertionError, match=message):
        await check_transform(transform_class.from_options({}, SETUP), [{"a": 1}])
