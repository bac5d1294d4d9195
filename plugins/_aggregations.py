"""Built-in aggregations: ``batch_stats`` and ``collect``.

Both read the batch's group key from the :class:`~plugins.protocols.BatchContext` and,
when the node groups its rows, put it in the field ``group_field`` of the summary rows
they make.  In ``passthrough`` mode they return each input row with their result added;
otherwise one summary row per batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from plugins.protocols import Aggregation, BatchContext, Row

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "BatchStatsAggregation",
    "BatchStatsError",
    "BatchStatsOptions",
    "CollectAggregation",
    "CollectOptions",
]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    group_field: str = Field(
        "group", description="Field that holds the batch's group key (when grouped)."
    )


def _summary(ctx: BatchContext, group_field: str, values: Row) -> Row:
    row: Row = {group_field: ctx.group_key} if ctx.grouped else {}
    row.update(values)
    return row


def _per_mode(rows: Sequence[Row], ctx: BatchContext, group_field: str, values: Row) -> list[Row]:
    """One summary row, or (passthrough) every input row with ``values`` added."""
    if ctx.output_mode == "passthrough":
        return [{**row, **values} for row in rows]
    return [_summary(ctx, group_field, values)]


# -- batch_stats ----------------------------------------------------------------------------


class BatchStatsError(ValueError):
    """A value of a summarised field is not a number."""


class BatchStatsOptions(_Options):
    fields: list[str] = Field(
        min_length=1, description="Numeric fields to summarise (missing/null values skipped)."
    )


class BatchStatsAggregation(Aggregation):
    """``count`` of the batch, and ``<field>_sum/_mean/_min/_max`` of each field.

    Missing and ``null`` values are skipped (a field with no values gets ``null``
    statistics); any other non-number fails the batch, naming the field and value.
    """

    name: ClassVar[str] = "batch_stats"
    Options: ClassVar[type[BaseModel]] = BatchStatsOptions
    options: BatchStatsOptions

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        values: Row = {"count": len(rows)}
        for name in self.options.fields:
            values.update(_field_stats(name, rows))
        return _per_mode(rows, ctx, self.options.group_field, values)


def _field_stats(name: str, rows: Sequence[Row]) -> Row:
    numbers: list[int | float] = []
    for row in rows:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BatchStatsError(f"field {name!r}: {value!r} is not a number")
        numbers.append(value)
    if not numbers:
        return {f"{name}_sum": None, f"{name}_mean": None, f"{name}_min": None, f"{name}_max": None}
    total = math.fsum(numbers) if any(isinstance(v, float) for v in numbers) else sum(numbers)
    return {
        f"{name}_sum": total,
        f"{name}_mean": total / len(numbers),
        f"{name}_min": min(numbers),
        f"{name}_max": max(numbers),
    }


# -- collect --------------------------------------------------------------------------------


class CollectOptions(_Options):
    field: str = Field("rows", description="Field that holds the batch's rows, as a list.")


class CollectAggregation(Aggregation):
    """The batch's rows as a list in field ``field``, with their ``count``."""

    name: ClassVar[str] = "collect"
    Options: ClassVar[type[BaseModel]] = CollectOptions
    options: CollectOptions

    async def flush(self, rows: Sequence[Row], ctx: BatchContext) -> list[Row]:
        values: Row = {"count": len(rows), self.options.field: [dict(row) for row in rows]}
        return _per_mode(rows, ctx, self.options.group_field, values)
