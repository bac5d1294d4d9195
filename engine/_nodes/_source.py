"""The source node: reads records, validates them, and admits them as tokens."""

from __future__ import annotations

import reprlib
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio

from landscape import CanonicalizationError, NodeStateStatus, Outcome

from .._row_schema import RowSchema, RowValidationError
from .._tokens import Token, source_token_id
from ._base import NodeTask

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from plugins import Source, SourceRecord

    from .._config import SourceSettings

__all__ = ["SourceNode", "raw_text"]

#: Python's ``repr`` recurses once per level of nesting; a record nested deeper than this
#: is shown abbreviated instead (the depth is measured without recursion).
_REPR_DEPTH = 200
_ABBREVIATED = reprlib.Repr()
_ABBREVIATED.maxlevel = 24
_ABBREVIATED.maxstring = _ABBREVIATED.maxother = 4096


def raw_text(raw: Any) -> str:
    """What is stored for a raw record that has no JSON form: its ``repr``, abbreviated
    for one nested deeper than ``repr`` can go (the same text for the same record, so a
    resume can check the record again)."""
    return _ABBREVIATED.repr(raw) if _deeper_than(raw, _REPR_DEPTH) else repr(raw)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists, tuples and dicts more than ``limit`` deep."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list | tuple):
            continue
        if depth >= limit:
            return True
        pending.extend((member, depth + 1) for member in item)
    return False


class SourceNode(NodeTask):
    """Reads the source in order and sends each valid row on as a new token.

    Every record, valid or not, gets a ``rows`` entry (its raw content stored as a
    payload), a token and a node state, so any row index can be explained.  Malformed
    records go to ``on_validation_failure`` (a sink, or ``discard``) and otherwise end
    ``quarantined`` in the Landscape.  Before admitting a row the source waits for room
    in the audit queue, which bounds the recorder's memory.  A stop ends reading at once,
    also while the source waits for its next record; the row being admitted is
    finished first.  At the end the outbox closes, which is end of input for the rest
    of the graph.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings: SourceSettings = self.spec.settings  # type: ignore[assignment]
        schema = settings.row_schema
        self.schema = None if schema is None else RowSchema.from_config(schema.mode, schema.fields)
        self.row_prefix = f"{self.run_ctx.run_id}-r"
        #: The reading loop's scope, which a stop cancels while a record is awaited.
        self._reading = anyio.CancelScope()
        self._awaiting_record = False

    async def run(self) -> None:
        source: Source = self.spec.plugin  # type: ignore[assignment]
        run = self.run_ctx
        await run.restored.wait()
        if run.stop_requested.is_set():
            return
        reader = run.source_records or source.read(start_index=run.rows_read)
        async with aclosing(reader) as records, anyio.create_task_group() as tg:
            tg.start_soon(self._interrupt_read_on_stop)
            await self._read(records)
            tg.cancel_scope.cancel()

    async def _read(self, records: AsyncIterator[SourceRecord]) -> None:
        """Admit records until the source ends or a stop is requested.  A stop also ends
        a wait for the next record (an idle source): that record was never read, and a
        resume reads it."""
        run = self.run_ctx
        checkpoints = run.checkpoints
        index = run.rows_read  # above 0 when a run resumes
        # One scope for the whole loop, cancelled only while a record is awaited (a
        # scope per record would cost more than the rest of reading it).
        next_record = records.__anext__
        with self._reading:
            while not run.stop_requested.is_set():
                self._awaiting_record = True
                try:
                    record = await next_record()
                except StopAsyncIteration:
                    return
                self._awaiting_record = False
                await self.recorder.wait_writable()
                await self.admit(index, record)
                index += 1
                if index >= checkpoints.due_at_rows:
                    checkpoints.rows_read(index)

    async def _interrupt_read_on_stop(self) -> None:
        await self.run_ctx.stop_requested.wait()
        if self._awaiting_record:
            self._reading.cancel()

    async def admit(self, index: int, record: SourceRecord) -> None:
        """Record one source record and send it on (or quarantine it)."""
        started = time.time()
        self.stats.received += 1
        raw, raw_hash, error = self._store_raw(record)
        # Read together by checkpoints: all change here, before the row can wait anywhere.
        run = self.run_ctx
        run.source_position = record.position
        if record.position is None and run.source_digest is not None:
            # Only a source that cannot say where it is needs its rows digested.
            run.source_digest.update(raw_hash.encode())
        run.rows_read = index + 1
        row_id = f"{self.row_prefix}{index}"
        token = Token(source_token_id(row_id), row_id, index, {}, raw_hash, step=0)
        self.recorder.source_row(
            row_id=token.row_id, row_index=index, source_node_id=self.node_id, data_hash=raw_hash
        )
        self.recorder.token(token_id=token.token_id, row_id=token.row_id)
        self.run_ctx.rows.admit(index)
        row, row_hash, error = (
            self._validated(record, raw_hash) if error is None else (None, None, error)
        )
        if row is None or row_hash is None:
            await self._reject(token, raw, error or "unreadable record", started)
            return
        token.row, token.row_hash = row, row_hash
        self._record_source_state(token, self.recorder.new_id("s"), started, row_hash)
        await self.deliver(token, self.spec.routes["success"])

    def _store_raw(self, record: SourceRecord) -> tuple[Any, str, str | None]:
        """The raw record as stored (its ``repr`` when it has no JSON form), its hash and
        the record's error, if any."""
        try:
            return record.raw, self.recorder.store(record.raw), record.error
        except CanonicalizationError as exc:
            raw = raw_text(record.raw)
            return raw, self.recorder.store(raw), record.error or f"record has no JSON form: {exc}"

    def _validated(
        self, record: SourceRecord, raw_hash: str
    ) -> tuple[dict[str, Any] | None, str | None, str | None]:
        """``(row, row_hash, None)`` for a valid record, ``(None, None, error)`` otherwise."""
        if record.row is None:
            return None, None, None
        try:
            row = record.row if self.schema is None else self.schema.validate(record.row)
            row_hash = raw_hash if row is record.raw else self.recorder.store(row)
        except RowValidationError as exc:
            return None, None, str(exc)
        except CanonicalizationError as exc:
            return None, None, f"row has no JSON form: {exc}"
        return row, row_hash, None

    def _record_source_state(
        self,
        token: Token,
        state_id: str,
        started: float,
        output_hash: str | None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """The source's node state: no input, the validated row (or the error) as output."""
        self.recorder.node_state(
            state_id=state_id,
            token_id=token.token_id,
            node_id=self.node_id,
            status=NodeStateStatus.FAILED if error else NodeStateStatus.COMPLETED,
            input_hash=None,
            output_hash=output_hash,
            started_at=started,
            completed_at=time.time(),
            step_index=0,
            error=error,
        )
        token.step = 1

    async def _reject(self, token: Token, raw: Any, error: str, started: float) -> None:
        self.recorder.validation_error(
            node_id=self.node_id,
            row_index=token.row_index,
            error=error,
            row_data_ref=token.row_hash,
        )
        state_id = self.recorder.new_id("s")
        failure = {"type": "ValidationError", "message": error}
        self._record_source_state(token, state_id, started, None, failure)
        route = self.spec.error_route
        if route is None:
            self.run_ctx.record_outcome(
                token,
                Outcome.QUARANTINED,
                self.node_id,
                context={"node": self.node_id, "error": error},
            )
        elif route.target is None:
            self.run_ctx.record_outcome(
                token,
                Outcome.DISCARDED,
                self.node_id,
                context={"node": self.node_id, "reason": f"validation failed: {error}"},
            )
        else:
            await self.divert(
                token, route, failure, state_id, self._quarantine_row(token, raw, error)
            )

    def _quarantine_row(self, token: Token, raw: Any, error: str) -> dict[str, Any]:
        """The row a malformed record is sent to its sink as, given to ``token``: the raw
        record as stored, or — when that is nested as deep as a payload may be, leaving
        no level to wrap it in — its text."""
        row = {"_row_index": token.row_index, "_raw": raw, "_error": error}
        try:
            self.set_row(token, row)
        except CanonicalizationError:
            row = {**row, "_raw": raw_text(raw)}
            self.set_row(token, row)
        return row
