"""Checkpoints: how far a run got, written every N rows or T seconds and at its end.

A checkpoint is queued behind every audit record made before it, and the writer
commits records in the order they were queued, so a committed checkpoint never
claims more than the Landscape holds.  It records the watermark (see
:mod:`engine._watermark`), how many source rows were read and where the source stands
after them — a position it can seek to, or a digest of the rows (either way a resume
can tell that the source changed), each sink's write count, how many
batches and joins the aggregations and coalesces hold, and the external jobs pending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from ._graph import NodeKind

if TYPE_CHECKING:
    from ._run_context import RunContext

__all__ = ["Checkpointer"]

_HOLDING = frozenset({NodeKind.AGGREGATION, NodeKind.COALESCE})


class Checkpointer:
    """Writes a run's checkpoints; :meth:`run` is the periodic task."""

    def __init__(self, run: RunContext, *, every_rows: int, interval: float) -> None:
        self._run = run
        self._every_rows = every_rows
        self._interval = interval
        self._due = anyio.Event()
        #: ``rows_read`` at which the next checkpoint is due (checked by the source).
        self.due_at_rows = run.rows_read + every_rows
        self._last: tuple[int, int] | None = None
        self.written = 0

    def rows_read(self, count: int) -> None:
        """The source read its ``count``-th row (call only when ``count >= due_at_rows``)."""
        self.due_at_rows = count + self._every_rows
        self._due.set()

    async def run(self) -> None:
        """Write a checkpoint whenever one is due by rows, or ``interval`` passed, until
        cancelled."""
        while True:
            with anyio.move_on_after(self._interval):
                await self._due.wait()
            self._due = anyio.Event()
            self.write("periodic")

    def write(self, reason: str) -> None:
        """Queue a checkpoint of the run as it stands now, unless nothing moved since the
        last one (a final one is always written)."""
        run = self._run
        watermark = run.rows.watermark()
        if reason == "periodic" and self._last == (watermark, run.rows_read):
            return
        self._last = (watermark, run.rows_read)
        state: dict[str, Any] = {
            "reason": reason,
            "rows_read": run.rows_read,
            "rows_in_flight": run.rows.rows_in_flight,
            "sink_writes": dict(run.sink_writes),
            # Draft batches and pending joins per node (a resume restores them from
            # their records; this says how much there was).
            "held": {
                node_id: stats.in_flight
                for node_id, stats in run.stats.items()
                if stats.kind in _HOLDING and stats.in_flight
            },
        }
        if run.pending_jobs:  # batches whose jobs run on at the provider
            state["pending_jobs"] = dict(run.pending_jobs)
        if run.source_position is not None:
            state["source_position"] = run.source_position.to_json()
        elif run.source_digest is not None:
            state["source_digest"] = run.source_digest.hexdigest()
        run.recorder.checkpoint(watermark_row_index=watermark, state=state)
        self.written += 1
