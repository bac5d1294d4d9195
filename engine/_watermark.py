"""Which source rows are still in flight, and the watermark below which none is.

Rows finish out of order (a slow LLM call, a join waiting for its branches, an
aggregation holding a group), so "rows done" is not a count: the **watermark** is the
highest row index at or below which every row is fully terminal.  The tracker counts,
per row, the tokens of that row that are still alive; a row leaves the table when its
last token ends.  Memory follows what is in flight, never the length of the input.
"""

from __future__ import annotations

__all__ = ["RowTracker"]


class RowTracker:
    """Live token counts per row index; only the run's node tasks (one thread) touch it."""

    __slots__ = ("_live", "rows_admitted")

    def __init__(self, rows_admitted: int = 0) -> None:
        self._live: dict[int, int] = {}
        #: One more than the highest row index admitted so far (rows are admitted in order).
        self.rows_admitted = rows_admitted

    def admit(self, row_index: int) -> None:
        """A source row got its first token."""
        self._live[row_index] = self._live.get(row_index, 0) + 1
        if row_index >= self.rows_admitted:
            self.rows_admitted = row_index + 1

    def add(self, row_index: int) -> None:
        """Another token of ``row_index`` was made (a fork child, a join or batch output)."""
        self._live[row_index] = self._live.get(row_index, 0) + 1

    def end(self, row_index: int) -> None:
        """A token of ``row_index`` reached a terminal outcome."""
        left = self._live[row_index] - 1
        if left:
            self._live[row_index] = left
        else:
            del self._live[row_index]

    @property
    def rows_in_flight(self) -> int:
        return len(self._live)

    def watermark(self) -> int:
        """The highest row index at or below which every admitted row is terminal (-1: none)."""
        if self._live:
            return min(self._live) - 1
        return self.rows_admitted - 1
