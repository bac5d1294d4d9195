"""Pass 2 of a comparison, comparing: where the lines of one row first split.

The lines of a row in runs A and B are matched by path, and each matched pair is walked
in step order to the first step whose node, routes taken, status or output hash differ.
The result is a :class:`RowDraft`: the row's ends and its splits, before any payload or
external call is read.

*Forks and aggregations.*  A row is identical when the multisets of its tokens' ends
are equal, so a fork's branches are compared as a whole, whatever order they finished
in.  A divergence is reported per line: the first node where a matched pair of tokens
differs, unless one of the token's parents diverged already (that explains it); the
row's first divergence is the one met first from the source token down.  An
aggregation's outputs belong, as the engine records them, to the row of the batch's
first member: a changed batch shows there as a diverging flush or output, while each
other member shows only its own ``consumed_in_batch`` end.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import zip_longest
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from ._lines import Line, Step
    from ._result import TokenEnd

__all__ = ["RowDraft", "Split", "draft"]


@dataclass(frozen=True, slots=True)
class Split:
    """A divergence before its payloads and answers are read."""

    path: str
    kind: str
    a: Step | None
    b: Step | None


@dataclass(frozen=True, slots=True)
class RowDraft:
    """A differing row compared: its ends in each run and the splits of its lines."""

    row_index: int
    row_id_a: str
    row_id_b: str
    ends_a: tuple[TokenEnd, ...]
    ends_b: tuple[TokenEnd, ...]
    splits: tuple[Split, ...]

    def changed_ends(self) -> Iterator[tuple[str, str, str]]:
        """``(path, hash in A, hash in B)`` of lines ending in both runs with other rows."""
        b_ends = {end.path: end for end in self.ends_b}
        for end in self.ends_a:
            other = b_ends.get(end.path)
            if other is None or end.row_hash is None or other.row_hash is None:
                continue
            if end.row_hash != other.row_hash:
                yield end.path, end.row_hash, other.row_hash


def draft(
    index: int, row_a: str, row_b: str, a: Mapping[str, Line], b: Mapping[str, Line]
) -> RowDraft:
    """Row ``index`` (``row_a`` in run A, ``row_b`` in run B) compared by its lines."""
    return RowDraft(
        row_index=index,
        row_id_a=row_a,
        row_id_b=row_b,
        ends_a=_ends(a),
        ends_b=_ends(b),
        splits=tuple(_splits(a, b)),
    )


def _ends(lines: Mapping[str, Line]) -> tuple[TokenEnd, ...]:
    ends = (line.end() for line in lines.values())
    return tuple(sorted((e for e in ends if e is not None), key=lambda e: e.path))


def _splits(a: Mapping[str, Line], b: Mapping[str, Line]) -> Iterator[Split]:
    """The first divergence of each line whose parents did not diverge, parents first."""
    diverged: set[str] = set()
    for path in [*a, *(p for p in b if p not in a)]:
        la, lb = a.get(path), b.get(path)
        parents = (la.parents if la else ()) + (lb.parents if lb else ())
        if diverged.intersection(parents):
            diverged.add(path)  # explained by its parent's divergence
            continue
        split = _first_split(path, la, lb)
        if split is not None:
            diverged.add(path)
            yield split


def _first_split(path: str, a: Line | None, b: Line | None) -> Split | None:
    """Where lines ``a`` and ``b`` (the same path in runs A and B) first differ."""
    if a is None or b is None:
        return _only_split(path, a, b)
    for step_a, step_b in zip_longest(a.steps, b.steps):
        if step_a is None or step_b is None:
            return Split(path, "end", step_a, step_b)
        kind = step_a.difference(step_b)
        if kind is not None:
            return Split(path, kind, step_a, step_b)
    if (a.outcome, a.sink) != (b.outcome, b.sink):
        return Split(path, "outcome", _last(a), _last(b))
    return None


def _only_split(path: str, a: Line | None, b: Line | None) -> Split:
    """A token of one run only: the divergence is where it was made."""
    first_a = a.steps[0] if a and a.steps else None
    first_b = b.steps[0] if b and b.steps else None
    return Split(path, "token", first_a, first_b)


def _last(line: Line) -> Step | None:
    return line.steps[-1] if line.steps else None
