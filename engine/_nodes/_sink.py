"""The sink node: writes rows in durable batches, then records their outcomes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from landscape import Outcome
from plugins import SinkItem, SinkRejection, SinkWriteError

from .._errors import PluginError
from .._graph import Arrival
from ._base import NodeTask

if TYPE_CHECKING:
    from plugins import Sink

    from .._config import SinkSettings
    from .._tokens import Token

__all__ = ["SinkNode"]

_ARRIVAL_OUTCOMES = {arrival: Outcome(arrival.value) for arrival in Arrival}


class SinkNode(NodeTask):
    """Collects tokens into batches and writes each batch durably through its plugin.

    A batch is written when it holds ``batch_size`` rows, when ``flush_interval_ms``
    passed since its first row, or at end of input.  Only after the plugin reports the
    write durable are the tokens' node states and outcomes recorded (``completed``,
    ``routed`` when a gate sent the row here, ``quarantined`` for an error sink,
    ``diverted`` for a failsink), so a recorded outcome always names a row that is
    really in the sink.  A row the sink cannot write — one the plugin rejects, or one
    whose write alone raised :class:`~plugins.SinkWriteError` — is settled by
    ``on_write_failure`` (see :meth:`_not_written`).  Any other exception from a write
    fails the run (:class:`PluginError`): the sink's state is then unknown.  When the node ends — at
    end of input, on cancellation or failure — the artifact (what the sink holds: a
    file's size and SHA-256) is recorded; ``verify`` compares it with the file.  After
    each write the sink's position is recorded with the write's outcomes, so a resumed
    run can cut an appending sink back to what the Landscape says was written.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Writes so far in this run (a resumed run goes on counting).
        self.write_seq = self.run_ctx.sink_writes.get(self.node_id, 0)

    async def run(self) -> None:
        settings: SinkSettings = self.spec.settings  # type: ignore[assignment]
        sink: Sink = self.spec.plugin  # type: ignore[assignment]
        interval = settings.flush_interval_ms / 1000.0
        try:
            while batch := await self._collect(settings.batch_size, interval):
                await self._write(sink, batch)
        except BaseException:
            self._record_artifact(sink)  # what the sink holds, also when cut short
            raise
        self._record_artifact(sink)

    def _record_artifact(self, sink: Sink) -> None:
        artifact = sink.artifact()
        if artifact is not None:
            self.recorder.artifact(
                sink_node_id=self.node_id,
                uri=artifact.uri,
                content_hash=artifact.content_hash,
                size_bytes=artifact.size_bytes,
                rows_written=artifact.rows_written,
            )

    async def _collect(self, batch_size: int, interval: float) -> list[Token]:
        """Up to ``batch_size`` tokens; empty only at end of input."""
        assert self.inbox is not None
        first = await self.inbox.receive()
        if first is None:
            return []
        batch = [first]
        with anyio.move_on_after(interval):
            while len(batch) < batch_size:
                token = await self.inbox.receive()
                if token is None:
                    break
                batch.append(token)
        self.stats.received += len(batch)
        return batch

    async def _write(self, sink: Sink, batch: list[Token]) -> None:
        started = time.time()
        items = [SinkItem(t.token_id, t.row_index, t.row) for t in batch]
        self.stats.in_flight = len(batch)
        # A process that lost the run to another never writes its sinks again.
        await self.recorder.ensure_lease()
        try:
            rejections = await self._write_items(sink, items)
        finally:
            self.stats.in_flight = 0
        self.write_seq += 1
        self.run_ctx.sink_writes[self.node_id] = self.write_seq
        rejected = {r.token_id: r.error for r in rejections}
        completed = time.time()
        # The position and the outcomes of the rows written commit together: a resume
        # cuts the sink back to the last position on record, which must cover exactly
        # the rows on record as written.
        with self.recorder.together():
            self.recorder.sink_position(
                sink_node_id=self.node_id, write_seq=self.write_seq, position=sink.position()
            )
            for token in batch:
                if token.token_id not in rejected:
                    self._written(token, started, completed)
                    await self.outbox.yield_if_due()
        for token in batch:
            error = rejected.get(token.token_id)
            if error is not None:
                await self._not_written(token, error, started, completed)

    async def _write_items(self, sink: Sink, items: list[SinkItem]) -> list[SinkRejection]:
        """Write ``items``; the rows that could not be written, and why.

        A batch whose write failed without leaving anything behind is tried again row
        by row when the sink has somewhere else for its write failures, so that one
        unwritable row (a refused write, a constraint) costs only itself.
        """
        try:
            return list(await sink.write(items))
        except SinkWriteError as exc:
            if self.spec.error_route is None:
                raise self._write_error(items, exc) from exc
            if len(items) == 1:
                return [SinkRejection(items[0].token_id, str(exc))]
        except Exception as exc:
            raise self._write_error(items, exc) from exc
        return [r for item in items for r in await self._write_items(sink, [item])]

    def _write_error(self, items: list[SinkItem], exc: Exception) -> PluginError:
        """The run's error for a failed write, naming the rows (not their values)."""
        if len(items) == 1:
            rows = f"row {items[0].row_index} (token {items[0].token_id})"
        else:
            indexes = [item.row_index for item in items]
            rows = f"{len(items)} rows (row indexes {min(indexes)} to {max(indexes)})"
        return PluginError(f"sink '{self.node_id}' failed to write {rows}: {exc}")

    def _written(self, token: Token, started: float, completed: float) -> None:
        state_id = self.recorder.new_id("s")
        self.record_state(token, state_id, started, completed, output_hash=token.row_hash)
        context = None if token.error is None else {"error": token.error}
        self.run_ctx.record_outcome(
            token,
            _ARRIVAL_OUTCOMES[token.arrival],
            self.node_id,
            sink_name=self.node_id,
            context=context,
        )

    async def _not_written(
        self, token: Token, error: str, started: float, completed: float
    ) -> None:
        """Settle a row the sink could not write, as ``on_write_failure`` says: end it
        ``failed`` (``fail``) or ``diverted`` (``discard``), or send it to the failsink,
        which ends it ``diverted``.  The failed visit here records the error."""
        failure = self.recorder.scrub({"type": "SinkWriteFailure", "message": error})
        state_id = self.recorder.new_id("s")
        self.record_state(token, state_id, started, completed, output_hash=None, error=failure)
        route = self.spec.error_route
        context = {"node": self.node_id, "error": failure}
        if route is None:
            self.run_ctx.record_outcome(token, Outcome.FAILED, self.node_id, context=context)
        elif route.target is None:
            self.run_ctx.record_outcome(token, Outcome.DIVERTED, self.node_id, context=context)
        else:
            row = {**token.row, "_error": failure["message"], "_error_node": self.node_id}
            await self.divert(token, route, failure, state_id, row)
