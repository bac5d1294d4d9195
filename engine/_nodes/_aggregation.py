"""The aggregation node: collects rows into batches per group and flushes them."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TypeAlias

import anyio

from landscape import BatchStatus, CanonicalizationError, NodeStateStatus, Outcome, canonical_json
from plugins import Aggregation, BatchContext, ExternalJobAggregation, MemberResult, StopRun
from plugins.expressions import ExpressionEvaluationError

from .._tokens import Token, derived_token_id
from ._base import WAKE, NodeTask, error_info

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anyio.abc import TaskGroup

    from plugins import ExternalCall, Row

    from .._config import AggregationSettings
    from .._run_context import EarlierAttempt, HeldBatch, RecordedJob

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


class _Passed(NamedTuple):
    """A member a flush passes on, with the calls made for it (recorded on its state)."""

    member: _Member
    calls: Sequence[ExternalCall] = ()


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
    #: The attempt its next flush is (a resumed batch goes on from its record), and
    #: its failed attempts so far, which ``retries`` bounds.
    attempt: int = 1
    failures: int = 0


class _FlushFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error


class _FlushLeft(Exception):
    """The plugin raised :class:`~plugins.StopRun`: the run stops and the batch is left
    as a stop that cancels its flush leaves it, for a resume."""


#: Passes a successful flush attempt's results on (what ``_attempts`` awaits last).
_PassOn: TypeAlias = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _JobDone:
    """A job's results, one per member, each succeeded row's hash, and the flush state."""

    results: list[MemberResult]
    row_hashes: list[str | None]
    state_id: str


@dataclass(slots=True)
class _Flush:
    """One attempt at flushing a batch: its node state, open until the plugin is done."""

    state_id: str
    started: float
    ctx: BatchContext


class AggregationNode(NodeTask):
    """Batches rows (one draft batch per ``group_by`` value) and flushes each batch
    through its plugin when a trigger fires: ``count``, ``timeout_seconds`` after the
    batch's first row (on the run's clock; the node waits for input *or* the earliest
    deadline), ``condition``, or end of input (``end_of_source``, or ``shutdown`` when
    the run was asked to stop — unless ``runtime.stop_aggregations`` is ``hold``: then
    a stop leaves the draft batches on record, and a resume goes on filling them).

    Each batch is recorded ``draft`` with its members as they arrive, ``executing``
    with the node state of its flush (opened before the plugin runs, on the batch's
    first member), then ``completed`` or ``failed``.  ``transform``/``single`` outputs
    are new tokens whose parents are all members (``consumed_in_batch``);
    ``passthrough`` members are ``buffered`` while they wait and then go on with their
    enriched rows.  A failed flush closes its state ``failed``; with ``retries`` left it
    is tried again as a new batch attempt, else its members take ``on_error`` (or end
    ``failed``).  A row whose ``group_by`` or trigger condition cannot be evaluated is
    that row's error.

    An :class:`~plugins.ExternalJobAggregation` (a provider's batch job) flushes in a
    task of its own, so the node goes on collecting while up to ``max_pending_jobs``
    jobs run: once the job is started its flush state and batch are recorded
    ``pending`` with the job's id (and committed) before the node waits for the job;
    a stop that cancels the wait leaves them so, and a resume waits for the same job.
    Each member then gets its own result: its row, or its error (routed by
    ``on_error``), with the calls made for it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: AggregationSettings = self.spec.settings  # type: ignore[assignment]
        self.plugin: Aggregation = self.spec.plugin  # type: ignore[assignment]
        timeout = self.settings.trigger.timeout_seconds
        self.timeout = math.inf if timeout is None else timeout
        #: Draft batches by group, in the order they began (which is deadline order).
        self.drafts: dict[str | None, _Batch] = {}
        self.job_plugin = self.plugin if isinstance(self.plugin, ExternalJobAggregation) else None
        #: Slots for pending jobs (a flush beyond them waits: back-pressure).
        self.job_slots = (
            None if self.job_plugin is None else anyio.Semaphore(self.job_plugin.max_pending_jobs)
        )
        self._jobs: TaskGroup | None = None
        #: Batches a resume re-flushes or waits for the job of, by id, while their
        #: members come back (they are not drafts: no token joins them anew).
        self.restoring: dict[str, _Batch] = {}

    async def run(self) -> None:
        async with anyio.create_task_group() as jobs:
            self._jobs = jobs
            await self._collect()

    async def _collect(self) -> None:
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
        if stopped and self.run_ctx.graph.settings.runtime.stop_aggregations == "hold":
            return  # the drafts stay on record as drafts: a resume goes on filling them
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
        restored = self.run_ctx.restored_members.get(token.token_id)
        if restored is not None and self._held(restored):
            await self._restore(token, restored, key, label)
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
        if self.settings.trigger.count is not None and count >= self.settings.trigger.count:
            await self.flush(batch, FlushTrigger.COUNT)
        elif fire:
            await self.flush(batch, FlushTrigger.CONDITION)

    def _held(self, batch_id: str) -> bool:
        """Whether a resume holds ``batch_id`` for a flush or a job (any number of those
        may share a group) rather than restoring it as the group's draft."""
        return batch_id in self.run_ctx.held_batches

    async def _restore(self, token: Token, batch_id: str, key: Any, label: str | None) -> None:
        """Put ``token`` back into a batch a resume re-flushes or waits for the job of,
        and go on with that batch once all its members are back."""
        del self.run_ctx.restored_members[token.token_id]
        held = self.run_ctx.held_batches[batch_id]
        batch = self.restoring.get(batch_id)
        if batch is None:
            now = self.run_ctx.clock.now()
            batch = self.restoring[batch_id] = _Batch(
                batch_id, key, label, now, math.inf, attempt=held.attempt, failures=held.failures
            )
        batch.members.append(_Member(token, time.time()))
        if len(batch.members) < held.members:
            return
        del self.restoring[batch_id]
        del self.run_ctx.held_batches[batch_id]
        if self.job_plugin is not None:
            await self._start_job(batch, held.trigger, held)
        else:
            await self.flush(batch, held.trigger)

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
        if self.job_plugin is not None:
            await self._start_job(batch, trigger, None)
            return
        self._undraft(batch)
        rows = [member.token.row for member in batch.members]

        async def attempt(number: int) -> _PassOn:
            outputs, state_id = await self._flush_once(batch, rows, trigger, number)
            return functools.partial(self._pass_on, batch, outputs, state_id)

        await self._attempts(batch, attempt)

    async def _attempts(self, batch: _Batch, attempt: Callable[[int], Awaitable[_PassOn]]) -> None:
        """Try ``attempt`` from the batch's attempt number on until one succeeds or the
        batch has failed ``retries + 1`` times (each retry a new batch attempt), then
        pass its results on or fail the members."""
        first = batch.attempt
        while True:
            if batch.attempt > first:
                batch.batch_id = self._retry_batch(batch, batch.attempt)
            try:
                pass_on = await attempt(batch.attempt)
            except _FlushLeft:
                return
            except _FlushFailed as failed:
                batch.failures += 1
                if batch.failures > self.settings.retries:
                    await self._fail_members(batch, failed.error)
                    return
                batch.attempt += 1
            else:
                await pass_on()
                return

    def _undraft(self, batch: _Batch) -> None:
        if self.drafts.get(batch.group_label) is batch:
            del self.drafts[batch.group_label]
            self.stats.in_flight = len(self.drafts)

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
        flush = self._open_flush(batch, trigger, attempt)
        try:
            outputs = self._checked(await self.plugin.flush(list(rows), flush.ctx), len(rows))
            stored = [(row, self.recorder.store(row)) for row in outputs]
        except anyio.get_cancelled_exc_class():
            # The run is being cancelled: the state says so instead of staying open.
            self._close_flush(batch, flush, NodeStateStatus.CANCELLED)
            raise
        except StopRun as stop:
            self._leave_flush(batch, flush, stop)
        except Exception as exc:
            self._fail_flush(batch, flush, exc)
        self._close_flush(
            batch,
            flush,
            NodeStateStatus.COMPLETED,
            output_hash=self.recorder.store([row_hash for _, row_hash in stored]),
        )
        return stored, flush.state_id

    def _open_flush(self, batch: _Batch, trigger: str, attempt: int) -> _Flush:
        """Record the flush state (``open``, on the batch's first member) and the batch
        ``executing``; the context the plugin is handed."""
        anchor = batch.members[0].token
        state_id = self.recorder.new_id("s")
        started = time.time()
        context = {
            "batch_id": batch.batch_id,
            "trigger": trigger,
            "members": len(batch.members),
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
        return _Flush(state_id, started, self._context(batch, trigger, attempt, state_id))

    def _context(self, batch: _Batch, trigger: str, attempt: int, state_id: str) -> BatchContext:
        return BatchContext(
            run_id=self.run_ctx.run_id,
            node_name=self.node_id,
            batch_id=batch.batch_id,
            attempt=attempt,
            group_key=batch.group_key,
            trigger=trigger,
            output_mode=self.settings.output_mode,
            state_id=state_id,
            grouped=self.spec.group_by is not None,
            # The flush state is recorded on the batch's first member.
            calls=self.run_ctx.calls_for(state_id, batch.members[0].token.token_id, self.node_id),
            members=tuple(member.token.token_id for member in batch.members),
        )

    def _close_flush(
        self,
        batch: _Batch,
        flush: _Flush,
        status: NodeStateStatus,
        *,
        output_hash: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Close the flush state with ``status``, and the batch as it says."""
        self.recorder.close_state(
            flush.state_id,
            status=status,
            started_at=flush.started,
            completed_at=time.time(),
            output_hash=output_hash,
            error=error,
        )
        if status is NodeStateStatus.COMPLETED:
            self.recorder.update_batch(batch.batch_id, status=BatchStatus.COMPLETED)
        elif status is NodeStateStatus.FAILED:
            self.recorder.update_batch(batch.batch_id, status=BatchStatus.FAILED)

    def _leave_flush(self, batch: _Batch, flush: _Flush, stop: StopRun) -> NoReturn:
        """Stop the run for ``stop``'s reason and close the flush state ``cancelled``,
        as a forced stop does (a resume flushes the batch again); raise
        :class:`_FlushLeft`."""
        self.run_ctx.request_stop(stop.reason)
        self._close_flush(batch, flush, NodeStateStatus.CANCELLED)
        raise _FlushLeft from stop

    def _fail_flush(self, batch: _Batch, flush: _Flush, exc: Exception) -> NoReturn:
        """Record the attempt failed with ``exc``; raise :class:`_FlushFailed`."""
        error = error_info(exc)
        self._close_flush(batch, flush, NodeStateStatus.FAILED, error=error)
        raise _FlushFailed(error) from exc

    # -- external jobs ---------------------------------------------------------------

    async def _start_job(self, batch: _Batch, trigger: str, held: HeldBatch | None) -> None:
        """Hand ``batch`` to a task of its own once a job slot is free (``held``: how a
        resumed run left it)."""
        assert self.job_slots is not None
        assert self._jobs is not None
        self._undraft(batch)
        await self.job_slots.acquire()
        self._jobs.start_soon(self._flush_job, batch, trigger, held)

    async def _flush_job(self, batch: _Batch, trigger: str, held: HeldBatch | None) -> None:
        """Flush ``batch`` through external jobs (tried ``retries + 1`` times in all);
        a resumed run's first attempt goes on from how ``held`` says it stopped."""
        assert self.job_slots is not None
        recorded = None if held is None else held.job
        earlier = None if held is None else held.earlier
        first = batch.attempt

        async def attempt(number: int) -> _PassOn:
            if number == first and recorded is not None:
                done = await self._job_recorded(batch, trigger, recorded)
            else:
                resumed = earlier if number == first else None
                done = await self._job_once(batch, trigger, number, resumed)
            return functools.partial(self._pass_on_members, batch, done)

        try:
            await self._attempts(batch, attempt)
        finally:
            self.job_slots.release()

    async def _job_once(
        self, batch: _Batch, trigger: str, attempt: int, earlier: EarlierAttempt | None
    ) -> _JobDone:
        """Submit a job for ``batch`` — or adopt the one the ``earlier`` attempt started
        without recording it — and wait for it; its results and the flush state."""
        assert self.job_plugin is not None
        rows = [member.token.row for member in batch.members]
        flush = self._open_flush(batch, trigger, attempt)
        try:
            # The attempt is on record before any job exists: a resume after a crash
            # in between knows which batch id to look for (``find``).
            await self.recorder.flush()
            submitted: str | list[MemberResult] | None = None
            if earlier is not None:
                submitted = await self.job_plugin.find(
                    earlier.batch_id, earlier.started_at, flush.ctx
                )
            if submitted is None:
                submitted = await self.job_plugin.submit(rows, flush.ctx)
        except anyio.get_cancelled_exc_class():
            self._close_flush(batch, flush, NodeStateStatus.CANCELLED)
            raise
        except StopRun as stop:
            self._leave_flush(batch, flush, stop)
        except Exception as exc:
            self._fail_flush(batch, flush, exc)
        if isinstance(submitted, str):
            # On record before waiting: whatever happens next, no one submits it again.
            self.recorder.mark_pending(flush.state_id, external_job_id=submitted)
            self.recorder.update_batch(
                batch.batch_id, status=BatchStatus.PENDING, external_job_id=submitted
            )
            await self.recorder.flush()
            submitted = await self._wait_job(batch, flush, submitted)
        return self._finish_job(batch, flush, submitted)

    async def _job_recorded(self, batch: _Batch, trigger: str, recorded: RecordedJob) -> _JobDone:
        """Wait for the job a resumed run had started for ``batch``."""
        ctx = self._context(batch, trigger, recorded.attempt, recorded.state_id)
        flush = _Flush(recorded.state_id, recorded.started_at, ctx)
        for member in batch.members:  # the flush state holds the step of its first member
            if member.token.token_id == recorded.anchor_token_id:
                member.token.step += 1
        results = await self._wait_job(batch, flush, recorded.job_id)
        return self._finish_job(batch, flush, results)

    async def _wait_job(self, batch: _Batch, flush: _Flush, job_id: str) -> list[MemberResult]:
        """The job's results; cancellation leaves its state and batch ``pending``."""
        assert self.job_plugin is not None
        rows = [member.token.row for member in batch.members]
        pending = self.run_ctx.pending_jobs
        pending[batch.batch_id] = job_id
        try:
            results = await self.job_plugin.wait(job_id, rows, flush.ctx)
        except anyio.get_cancelled_exc_class():
            raise  # still pending: the final checkpoint names it
        except StopRun as stop:  # left pending, as a cancelled wait leaves it
            self.run_ctx.request_stop(stop.reason)
            raise _FlushLeft from stop
        except Exception as exc:
            del pending[batch.batch_id]
            self._fail_flush(batch, flush, exc)
        else:
            del pending[batch.batch_id]
            return results

    def _finish_job(self, batch: _Batch, flush: _Flush, results: list[MemberResult]) -> _JobDone:
        """Close the flush state ``completed``, its output the members' row hashes."""
        if len(results) != len(batch.members):
            error = ValueError(f"the job has {len(results)} results for {len(batch.members)} rows")
            self._fail_flush(batch, flush, error)
        hashes = [None if r.row is None else self.recorder.store(r.row) for r in results]
        self._close_flush(
            batch, flush, NodeStateStatus.COMPLETED, output_hash=self.recorder.store(hashes)
        )
        return _JobDone(results, hashes, flush.state_id)

    async def _pass_on_members(self, batch: _Batch, done: _JobDone) -> None:
        """Pass the members whose requests succeeded on as the output mode says, then
        route those whose requests failed by ``on_error``; each member's state (with the
        calls made for it) is on record before the first one moves on."""
        now = time.time()
        state_id = done.state_id
        context = {"batch_id": batch.batch_id, "flush_state_id": state_id}
        outputs: list[tuple[Row, str]] = []
        passed: list[_Passed] = []
        failed: list[tuple[_Member, dict[str, Any], str]] = []
        members = zip(batch.members, done.results, done.row_hashes, strict=True)
        for member, result, row_hash in members:
            if result.row is not None and result.error is None and row_hash is not None:
                outputs.append((result.row, row_hash))
                passed.append(_Passed(member, result.calls))
                continue
            failure = {**error_info(result.error or ValueError("no result")), **context}
            failed_state = self.recorder.new_id("s")
            self._record_calls(failed_state, member.token, result.calls)
            self.record_state(
                member.token, failed_state, member.at, now, output_hash=None, error=failure,
                context=context,
            )  # fmt: skip
            failed.append((member, failure, failed_state))
        if passed:
            await self._pass_on(batch, outputs, state_id, passed)
        for member, failure, failed_state in failed:
            await self.fail_row(member.token, failure, failed_state)

    def _record_calls(self, state_id: str, token: Token, calls: Sequence[ExternalCall]) -> None:
        log = self.run_ctx.calls_for(state_id, token.token_id, self.node_id)
        for call in calls:
            log.record(call)

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

    async def _pass_on(
        self,
        batch: _Batch,
        outputs: list[tuple[Row, str]],
        state_id: str,
        passed: list[_Passed] | None = None,
    ) -> None:
        """Pass the outputs of the flush of the ``passed`` members (default: the whole
        batch, with no calls of their own) on."""
        if passed is None:
            passed = [_Passed(member) for member in batch.members]
        members = [p.member for p in passed]
        now = time.time()
        route = self.spec.routes["success"]
        context = {"batch_id": batch.batch_id, "flush_state_id": state_id}

        def member_state(
            member: _Member, spent: Sequence[ExternalCall], output: str | None
        ) -> None:
            member_state_id = self.recorder.new_id("s")
            self._record_calls(member_state_id, member.token, spent)
            self.record_state(
                member.token, member_state_id, member.at, now, output_hash=output,
                context=context,
            )  # fmt: skip

        if self.settings.output_mode == "passthrough":
            # Every member's state is on record before the first one moves on: a crash
            # cannot leave a member of a completed batch waiting for another batch.
            for (member, spent), (row, row_hash) in zip(passed, outputs, strict=True):
                member_state(member, spent, row_hash)
                member.token.row, member.token.row_hash = row, row_hash
            for member in members:
                await self.deliver(member.token, route)
            return
        tokens = [m.token for m in members]
        for member, spent in passed:
            token = member.token
            member_state(member, spent, None)
            self.run_ctx.record_outcome(
                token,
                Outcome.CONSUMED_IN_BATCH,
                self.node_id,
                batch_id=batch.batch_id,
                context={"node": self.node_id, "batch_id": batch.batch_id},
            )
        first = tokens[0]
        step = max(t.step for t in tokens)
        parents = [t.token_id for t in tokens]
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
                started_at=members[0].at,
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
