"""Built-in transforms: ``field_map``, ``compute``, ``filter`` and ``passthrough``.

Every transform returns a new dict, or the very row it was given when it changes
nothing; none ever mutates its input.  Expressions are compiled once, when the plugin
is built: a syntax error is raised then, as an
:class:`~plugins.expressions.ExpressionSyntaxError` whose message starts with the
option's key path (``fields.total``, ``keep``).  A row an expression cannot be evaluated
on raises :class:`~plugins.expressions.ExpressionEvaluationError`, an error of that row.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from plugins.expressions import (
    Expression,
    ExpressionEvaluationError,
    ExpressionSyntaxError,
    compile_expression,
)
from plugins.protocols import Discard, PluginSetup, Row, RowContext, Transform, TransformResult

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "ComputeOptions",
    "ComputeTransform",
    "FieldMapError",
    "FieldMapOptions",
    "FieldMapTransform",
    "FilterOptions",
    "FilterTransform",
    "PassthroughOptions",
    "PassthroughTransform",
]

_MISSING = object()
_SHOWN_FIELDS = 20


def _compile(key_path: str, source: str) -> Expression:
    """Compile ``source``; a syntax error's message is prefixed with ``key_path``."""
    try:
        return compile_expression(source, names=("row",))
    except ExpressionSyntaxError as exc:
        raise ExpressionSyntaxError(source, f"{key_path}: {exc.reason}") from exc


def _names(fields: Iterable[str]) -> str:
    return ", ".join(map(repr, fields))


# -- field_map ----------------------------------------------------------------------------


class FieldMapError(ValueError):
    """A row ``field_map`` cannot map: a field it must rename or select is not there."""


class FieldMapOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rename: dict[str, str] = Field(default_factory=dict)
    select: list[str] | None = Field(default=None, min_length=1)
    drop: list[str] = Field(default_factory=list)
    constants: dict[str, Any] = Field(default_factory=dict)

    @field_validator("rename")
    @classmethod
    def _distinct_targets(cls, value: dict[str, str]) -> dict[str, str]:
        targets = list(value.values())
        if len(set(targets)) != len(targets):
            raise ValueError("two fields are renamed to the same name")
        return value

    @field_validator("select")
    @classmethod
    def _distinct_selection(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a field is selected twice")
        return value


class FieldMapTransform(Transform):
    """Renames, selects, drops and sets fields, in that order.

    ``rename`` keeps each field's position; renaming onto a field that stays in the row
    is an error of the row.  ``select`` keeps only the listed fields, in the listed
    order.  ``drop`` removes fields (an absent one is ignored).  ``constants`` sets
    fields, replacing values already there; each row gets its own copy of a list or dict.
    A field that ``rename`` or ``select`` names but the row lacks raises
    :class:`FieldMapError`.
    """

    name: ClassVar[str] = "field_map"
    Options: ClassVar[type[BaseModel] | None] = FieldMapOptions
    options: FieldMapOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        self._rename = {old: new for old, new in self.options.rename.items() if old != new}
        #: New names that no field is renamed away from: a row that has one is clobbered.
        self._kept_targets = frozenset(v for v in self._rename.values() if v not in self._rename)
        self._drop = frozenset(self.options.drop)

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        out = self._renamed(row)
        out = self._selected(out)
        out = self._dropped(out)
        return self._with_constants(out)

    def _renamed(self, row: Row) -> Row:
        self._require("rename", self.options.rename, row)
        if not self._kept_targets.isdisjoint(row):
            clobbered = [
                new for new in self._rename.values() if new in self._kept_targets and new in row
            ]
            raise FieldMapError(f"field_map: rename would overwrite field {_names(clobbered)}")
        if not self._rename:
            return row
        return {self._rename.get(field, field): value for field, value in row.items()}

    def _selected(self, row: Row) -> Row:
        select = self.options.select
        if select is None:
            return row
        self._require("select", select, row)
        if len(row) == len(select) and list(row) == select:
            return row
        return {field: row[field] for field in select}

    def _dropped(self, row: Row) -> Row:
        if self._drop.isdisjoint(row):
            return row
        return {field: value for field, value in row.items() if field not in self._drop}

    def _with_constants(self, row: Row) -> Row:
        constants = self.options.constants
        if not constants:
            return row
        if all(row.get(field, _MISSING) is value for field, value in constants.items()):
            return row
        fresh = {field: copy.deepcopy(value) for field, value in constants.items()}
        return {**row, **fresh}

    @staticmethod
    def _require(step: str, fields: Iterable[str], row: Row) -> None:
        """Raise :class:`FieldMapError` when ``row`` lacks any of ``fields``."""
        for field in fields:  # a loop, not a comprehension: no frame per row
            if field not in row:
                break
        else:
            return
        missing = [field for field in fields if field not in row]
        shown = _names(list(row)[:_SHOWN_FIELDS]) + (", ..." if len(row) > _SHOWN_FIELDS else "")
        raise FieldMapError(
            f"field_map: {step}: no field {_names(missing)} in the row (it has: {shown})"
        )


# -- compute ------------------------------------------------------------------------------


class ComputeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    fields: dict[str, str] = Field(min_length=1)


class ComputeTransform(Transform):
    """Sets each field of ``fields`` to its expression's value, in the order given.

    The expressions see ``row``: the input row with the fields computed so far, so a
    later field can use an earlier one.  A failing expression raises
    :class:`~plugins.expressions.ExpressionEvaluationError` naming the field.
    """

    name: ClassVar[str] = "compute"
    Options: ClassVar[type[BaseModel] | None] = ComputeOptions
    options: ComputeOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        self._fields = tuple(
            (name, f"compute: fields.{name}", _compile(f"fields.{name}", source))
            for name, source in options.fields.items()
        )

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        out = dict(row)
        changed = False
        for name, key_path, expression in self._fields:
            value = _evaluate(expression, key_path, out)
            changed = changed or out.get(name, _MISSING) is not value
            out[name] = value
        return out if changed else row


def _evaluate(expression: Expression, key_path: str, row: Row) -> Any:
    """The expression's value on ``row``; a failure's message is prefixed with ``key_path``."""
    try:
        return expression.evaluate({"row": row})
    except ExpressionEvaluationError as exc:
        raise ExpressionEvaluationError(exc.source, f"{key_path}: {exc.reason}") from exc


# -- filter -------------------------------------------------------------------------------


class FilterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: str


class FilterTransform(Transform):
    """Keeps a row (the same object) when ``keep`` is truthy, else discards it.

    The discard reason quotes the expression: ``filter: <keep> is false``.
    """

    name: ClassVar[str] = "filter"
    Options: ClassVar[type[BaseModel] | None] = FilterOptions
    options: FilterOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        self._keep = _compile("keep", options.keep)

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        if _evaluate(self._keep, "filter: keep", row):
            return row
        return Discard(reason=f"filter: {self._keep.source} is false")


# -- passthrough --------------------------------------------------------------------------


class PassthroughOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PassthroughTransform(Transform):
    """Returns every row unchanged (the same object)."""

    name: ClassVar[str] = "passthrough"
    Options: ClassVar[type[BaseModel] | None] = PassthroughOptions

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        return row
