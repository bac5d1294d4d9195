"""How a coalesce merges the rows of the branches that arrived into one row."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from plugins import Row

__all__ = ["MergeError", "merge_rows"]


class MergeError(Exception):
    """The arrived rows cannot be merged; ``details`` says what clashed or was missing."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


def merge_rows(
    strategy: str,
    rows: Mapping[str, Row],
    *,
    prefer: str | None = None,
    select_branch: str | None = None,
) -> Row:
    """Merge ``rows`` (branch -> row, in the coalesce's branch order) by ``strategy``.

    ``union``: every field of every branch; a field two branches hold with different
    values is a conflict that ``prefer`` resolves or that raises :class:`MergeError`
    with every branch's value.  ``nested``: ``{branch: row}``.  ``select``: the row of
    ``select_branch``, which must have arrived (there is no fallback to another).
    """
    if strategy == "nested":
        return dict(rows)
    if strategy == "select":
        assert select_branch is not None
        if select_branch not in rows:
            raise MergeError(
                f"select branch {select_branch!r} did not arrive",
                {"select_branch": select_branch},
            )
        return rows[select_branch]
    if strategy == "union":
        return _union(rows, prefer)
    raise ValueError(f"unknown merge strategy {strategy!r}")


def _union(rows: Mapping[str, Row], prefer: str | None) -> Row:
    merged: Row = {}
    holders: dict[str, str] = {}
    conflicts: dict[str, dict[str, Any]] = {}
    for branch, row in rows.items():
        for name, value in row.items():
            if name not in merged:
                merged[name], holders[name] = value, branch
            elif not _same(merged[name], value):
                conflicts.setdefault(name, {holders[name]: merged[name]})[branch] = value
    unresolved = {}
    for name, values in conflicts.items():
        if prefer is not None and prefer in rows and name in rows[prefer]:
            merged[name] = rows[prefer][name]
        else:
            unresolved[name] = values
    if unresolved:
        fields = ", ".join(map(repr, unresolved))
        raise MergeError(f"branches disagree on {fields}", {"conflicts": unresolved})
    return merged


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same type (``1``, ``1.0`` and ``True`` are different values)."""
    return type(a) is type(b) and a == b
