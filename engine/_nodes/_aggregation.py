"""The aggregation node: collects rows into batches per group and flushes them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from landscape import BatchStatus, CanonicalizationError, NodeStateStatus, Outcome, canonical_json
from plugins import Aggregation, BatchContext
from plugins.expressions import ExpressionEvaluationError

from .._tokens import Token, derived_token_id
from ._base import WAKE, NodeTask, error_info

if TYPE_CHECKING:
    from plugins import Row

    from .._config import AggregationSettings

__all__ = ["AggregationNode", "FlushTrigger"]


class FlushTrigger:
    """Why a batch was flushed (recorded as the batch's ``trigger_reason``)."""

    COUNT = "count"
    TIMEOUT = "timeout"
    CONDITION = "condition"
    END_OF_SOURCE = "end_of_source"
    SHUTDOWN = "shutdown"


@dataclass(slots=True)
class _Member:
    token: Token
    at: float  # wall time it joined, for its node state


@dataclass(slots=True, eq=False)
class _Batch:
    """A draft batch of one group: its members so far and when it began."""

    batch_id: str
    group_key: Any
    #: The key's canonical JSON (``1`` and ``"1"`` are different groups); ``None``
    #: without ``group_by``.
    group_label: str | None
    began: float  # on the run's clock
    deadline: float
    members: list[_Member] = field(default_factory=list)


class _FlushFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error


class AggregationNode(NodeTask):
    """Batches rows (one draft batch per ``group_by`` value) and flushes each batch
    through its plugin when a trigger fires: ``count``, ``timeout_seconds`` after the
    batch's first row (on the run's clock; the node waits for input *or* the earliest
    deadline), ``condition``, or end of input (``end_of_source``, or ``shutdown`` when
    the run was asked to stop).

    Each batch is recorded ``draft`` with its members as they arrive, ``executing``
    with the node state of its flush (opened before the plugin runs, on the batch's
    first member), then ``completed`` or ``failed``.  ``transform``/``single`` outputs
    are new tokens whose parents are all members (``consumed_in_batch``);
    ``passthrough`` members are ``buffered`` while they wait and then go on with their
    enriched rows.  A failed flush closes its state ``failed``; with ``retries`` left it
    is tried again as a new batch attempt, else its members take ``on_error`` (or end
    ``failed``).  A row whose ``group_by`` or trigger condition cannot be evaluated is
    that row's error.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: AggregationSettings = self.spec.settings  # type: ignore[assignment]
        self.plugin: Aggregation = self.spec.plugin  # type: ignore[assignment]
        timeout = self.settings.trigger.timeout_seconds
        self.timeout = math.inf if timeout is None else timeout
        #: Draft batches by group, in the order they began (which is deadline order).
        self.drafts: dict[str | None, _Batch] = {}

    async def run(self) -> None:
        while True:
            await self._expire()
            first = next(iter(self.drafts.values()), None)
            token = await self.next_input(math.inf if first is None else first.deadline)
            if token is None:
                break
            if token is not WAKE:
                assert isinstance(token, Token)
                self.stats.received += 1
                await self._add(token)
        stopped = self.run_ctx.stop_requested.is_set()
        trigger = FlushTrigger.SHUTDOWN if stopped else FlushTrigger.END_OF_SOURCE
        for batch in list(self.drafts.values()):
            await self.flush(batch, trigger)

    async def _expire(self) -> None:
        while self.drafts:
            batch = next(iter(self.drafts.values()))
            # Read the clock for each batch: another may have come due during a flush.
            if batch.deadline > self.run_ctx.clock.now():
                return
            await self.flush(batch, FlushTrigger.TIMEOUT)

    # -- collecting ------------------------------------------------------------------

    async def _add(self, token: Token) -> None:
        key = label = None
        if self.spec.group_by is not None:
            try:
                key = self.spec.group_by.evaluate({"row": token.row})
                label = canonical_json(key)
            except (ExpressionEvaluationError, CanonicalizationError) as exc:
                await self._reject(token, {**error_info(exc), "group_by": self.settings.group_by})
                return
        now = self.run_ctx.clock.now()
        batch = self.drafts.get(label)
        count = 1 if batch is None else len(batch.members) + 1
        fire = False
        condition = self.spec.condition
        if condition is not None:
            age = 0.0 if batch is None else now - batch.began
            variables = {"row": token.row, "batch_count": count, "batch_age_seconds": age}
            try:
                fire = bool(condition.evaluate(variables))
            except ExpressionEvaluationError as exc:
                await self._reject(token, {**error_info(exc), "condition": condition.source})
                return
        if batch is None:
            batch = self._begin(key, label, now, token)
        self._join(batch, token)
        redo = self.run_ctx.restored_flushes.get(batch.batch_id)
        if redo is not None and len(batch.members) == redo[0]:
            del self.run_ctx.restored_flushes[batch.batch_id]
            await self.flush(batch, redo[1] or FlushTrigger.END_OF_SOURCE)
        elif self.settings.trigger.count is not None and count >= self.settings.trigger.count:
            await self.flush(batch, FlushTrigger.COUNT)
        elif fire:
            await self.flush(batch, FlushTrigger.CONDITION)

    def _begin(self, key: Any, label: str | None, now: float, first: Token) -> _Batch:
        restored = self.run_ctx.restored_members.get(first.token_id)
        if restored is not None:  # a resumed run's batch: it is on record already
            batch = _Batch(restored, key, label, now, now + self.timeout)
        else:
            batch = _Batch(self.recorder.new_id("b"), key, label, now, now + self.timeout)
            self.recorder.batch(
                batch_id=batch.batch_id,
                node_id=self.node_id,
                attempt=1,
                status=BatchStatus.DRAFT,
                group_key=label,
            )
        self.drafts[label] = batch
        self.stats.in_flight = len(self.drafts)
        return batch

    def _join(self, batch: _Batch, token: Token) -> None:
        ordinal = len(batch.members)
        batch.members.append(_Member(token, time.time()))
        if self.run_ctx.restored_members.get(token.token_id) == batch.batch_id:
            # Back in the batch it was recorded in before a resume, with its outcome.
            del self.run_ctx.restored_members[token.token_id]
            return
        self.recorder.batch_member(
            batch_id=batch.batch_id, token_id=token.token_id, ordinal=ordinal
        )
        if self.settings.output_mode == "passthrough":
            self.run_ctx.record_outcome(
                token,
                Outcome.BUFFERED,
                self.node_id,
                batch_id=batch.batch_id,
                context={"node": self.node_id, "batch_id": batch.batch_id},
            )

    async def _reject(self, token: Token, error: dict[str, Any]) -> None:
        state_id = self.recorder.new_id("s")
        now = time.time()
        self.record_state(token, state_id, now, now, output_hash=None, error=error)
        await self.fail_row(token, error, state_id)

    # -- flushing --------------------------------------------------------------------

    async def flush(self, batch: _Batch, trigger: str) -> None:
        """Flush ``batch`` (tried ``retries + 1`` times) and pass its results on."""
        del self.drafts[batch.group_label]
        self.stats.in_flight = len(self.drafts)
        rows = [member.token.row for member in batch.members]
        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                batch.batch_id = self._retry_batch(batch, attempt)
            try:
                outputs, state_id = await self._flush_once(batch, rows, trigger, attempt)
            except _FlushFailed as failed:
                if attempt == attempts:
                    await self._fail_members(batch, failed.error)
                    return
            else:
                await self._pass_on(batch, outputs, state_id)
                return

    def _retry_batch(self, batch: _Batch, attempt: int) -> str:
        batch_id = self.recorder.new_id("b")
        self.recorder.batch(
            batch_id=batch_id,
            node_id=self.node_id,
            attempt=attempt,
            status=BatchStatus.DRAFT,
            group_key=batch.group_label,
        )
        for ordinal, member in enumerate(batch.members):
            self.recorder.batch_member(
                batch_id=batch_id, token_id=member.token.token_id, ordinal=ordinal
            )
        return batch_id

    async def _flush_once(
        self, batch: _Batch, rows: list[Row], trigger: str, attempt: int
    ) -> tuple[list[tuple[Row, str]], str]:
        """One attempt: its state opened before the plugin runs and closed after.

        Returns the output rows with their hashes and the flush state's id; raises
        :class:`_FlushFailed` after recording a failed attempt.
        """
        anchor = batch.members[0].token
        state_id = self.recorder.new_id("s")
        started = time.time()
        context = {
            "batch_id": batch.batch_id,
            "trigger": trigger,
            "members": len(rows),
            "group_key": batch.group_label,
        }
        input_hash = self.recorder.store([m.token.row_hash for m in batch.members])
        self.recorder.node_state(
            state_id=state_id,
            token_id=anchor.token_id,
            node_id=self.node_id,
            status=NodeStateStatus.OPEN,
            input_hash=input_hash,
            output_hash=None,
            started_at=started,
            completed_at=None,
            step_index=anchor.step,
            attempt=attempt,
            context=context,
        )
        anchor.step += 1
        self.recorder.update_batch(
            batch.batch_id,
            status=BatchStatus.EXECUTING,
            trigger_reason=trigger,
            aggregation_state_id=state_id,
        )
        ctx = BatchContext(
            run_id=self.run_ctx.run_id,
            node_name=self.node_id,
            batch_id=batch.batch_id,
            attempt=attempt,
            group_key=batch.group_key,
            trigger=trigger,
            output_mode=self.settings.output_mode,
            state_id=state_id,
            grouped=self.spec.group_by is not None,
            calls=self.run_ctx.calls_for(state_id),
        )
        try:
            outputs = self._checked(await self.plugin.flush(list(rows), ctx), len(rows))
            stored = [(row, self.recorder.store(row)) for row in outputs]
        except anyio.get_cancelled_exc_class():
            # The run is being cancelled: the state says so instead of staying open.
            self.recorder.close_state(
                state_id,
                status=NodeStateStatus.CANCELLED,
                started_at=started,
                completed_at=time.time(),
            )
            raise
        except Exception as exc:
            error = error_info(exc)
            self.recorder.close_state(
                state_id,
                status=NodeStateStatus.FAILED,
                started_at=started,
                completed_at=time.time(),
                error=error,
            )
            self.recorder.update_batch(batch.batch_id, status=BatchStatus.FAILED)
            raise _FlushFailed(error) from exc
        output_hash = self.recorder.store([row_hash for _, row_hash in stored])
        self.recorder.close_state(
            state_id,
            status=NodeStateStatus.COMPLETED,
            started_at=started,
            completed_at=time.time(),
            output_hash=output_hash,
        )
        self.recorder.update_batch(batch.batch_id, status=BatchStatus.COMPLETED)
        return stored, state_id

    def _checked(self, outputs: Any, members: int) -> list[Row]:
        """The plugin's result, if it is what the output mode promises."""
        mode = self.settings.output_mode
        if not isinstance(outputs, list) or not all(isinstance(r, dict) for r in outputs):
            raise TypeError(f"flush returned {type(outputs).__name__}, not a list of rows")
        if mode == "single" and len(outputs) != 1:
            raise ValueError(f"output_mode single needs 1 row, flush returned {len(outputs)}")
        if mode == "passthrough" and len(outputs) != members:
            raise ValueError(
                f"output_mode passthrough needs {members} rows (one per member), "
                f"flush returned {len(outputs)}"
            )
        return outputs

    async def _pass_on(self, batch: _Batch, outputs: list[tuple[Row, str]], state_id: str) -> None:
        now = time.time()
        route = self.spec.routes["success"]
        context = {"batch_id": batch.batch_id, "flush_state_id": state_id}
        if self.settings.output_mode == "passthrough":
            # Every member's state is on record before the first one moves on: a crash
            # cannot leave a member of a completed batch waiting for another batch.
            for member, (row, row_hash) in zip(batch.members, outputs, strict=True):
                token = member.token
                state_id = self.recorder.new_id("s")
                self.record_state(
                    token, state_id, member.at, now, output_hash=row_hash, context=context
                )
                token.row, token.row_hash = row, row_hash
            for member in batch.members:
                await self.deliver(member.token, route)
            return
        members = [m.token for m in batch.members]
        for member in batch.members:
            token = member.token
            self.record_state(
                token, self.recorder.new_id("s"), member.at, now, output_hash=None, context=context
            )
            self.run_ctx.record_outcome(
                token,
                Outcome.CONSUMED_IN_BATCH,
                self.node_id,
                batch_id=batch.batch_id,
                context={"node": self.node_id, "batch_id": batch.batch_id},
            )
        first = members[0]
        step = max(t.step for t in members)
        parents = [t.token_id for t in members]
        made = []
        # Every output is on record before the first one moves on, so a crash cannot
        # lose the outputs of a batch whose members are already consumed.
        for ordinal, (row, row_hash) in enumerate(outputs):
            output_id = derived_token_id("batch", self.node_id, str(ordinal), *parents)
            output = Token(output_id, first.row_id, first.row_index, row, row_hash, step=step)
            self.recorder.token(token_id=output.token_id, row_id=output.row_id, parents=parents)
            self.run_ctx.token_made(output)
            self.recorder.node_state(
                state_id=self.recorder.new_id("s"),
                token_id=output.token_id,
                node_id=self.node_id,
                status=NodeStateStatus.COMPLETED,
                input_hash=None,
                output_hash=row_hash,
                started_at=batch.members[0].at,
                completed_at=now,
                step_index=step,
                context=context,
            )
            output.step += 1
            made.append(output)
        for output in made:
            await self.deliver(output, route)

    async def _fail_members(self, batch: _Batch, error: dict[str, Any]) -> None:
        now = time.time()
        context = {"batch_id": batch.batch_id}
        failure = {**error, "batch_id": batch.batch_id}
        for member in batch.members:
            token = member.token
            state_id = self.recorder.new_id("s")
            self.record_state(
                token, state_id, member.at, now, output_hash=None, error=failure, context=context
            )
            await self.fail_row(token, failure, state_id)
