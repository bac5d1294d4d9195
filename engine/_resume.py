"""Resuming an unfinished run: the same run and tokens, from where each one stopped.

:meth:`ResumePlan.load` reads the run's unfinished state from the Landscape and refuses
what cannot be resumed (a completed run, a changed pipeline, a changed source).  When
the run starts again the plan

* puts the run's counters back (outcomes, rows read, the source digest, the
  watermark's live rows, each sink's write count) and closes what a crash left open:
  ``open`` node states become ``cancelled``, a batch caught mid-flush becomes
  ``failed`` and its members go into a new attempt of it;
* re-opens each sink at the position its recorded outcomes cover (a file is cut back
  to it);
* sends every non-terminal token back into the graph where it stopped — after its last
  completed node state, with the row recorded there — before the source reads any new
  row, so batches and joins held at the crash are completed by the tokens they held;
* lets calls whose node state never completed be answered from the run's own
  recorded answers (``reused``) rather than paid for again.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from landscape import (
    BatchStatus,
    CallSummary,
    CanonicalizationError,
    NodeStateStatus,
    Outcome,
    RecordedState,
    RunStatus,
    canonical_bytes,
    canonical_hash,
    canonical_json,
    sha256_hex,
)
from plugins import Source

from ._calls import AnswerBook, CallTotals
from ._errors import ResumeError
from ._forks import ForkInstance
from ._graph import Arrival, EdgeMode, NodeKind, Route
from ._nodes import FlushTrigger, NodeTask
from ._nodes._source import raw_text
from ._replay import load_replay
from ._run_context import EarlierAttempt, HeldBatch, RecordedJob
from ._tokens import Token
from ._watermark import RowTracker

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Mapping

    from landscape import Landscape, PendingToken, UnfinishedRun
    from plugins import Sink, SourcePosition, SourceRecord

    from ._config import TransformSettings
    from ._graph import Graph, NodeSpec
    from ._run_context import RunContext
    from ._streams import Outbox

__all__ = ["ResumePlan", "check_resumable"]

_INTERRUPTED = {"type": "Interrupted", "message": "the run stopped during this work"}
_COMPLETED = NodeStateStatus.COMPLETED.value
_FAILED = NodeStateStatus.FAILED.value
_RESUMABLE = {
    RunStatus.RUNNING.value,
    RunStatus.CRASHED.value,
    RunStatus.INTERRUPTED.value,
    RunStatus.FAILED.value,
}


@dataclass(slots=True)
class _Reentry:
    """Where one pending token goes back into the graph."""

    token: Token
    #: The node whose route the token takes (it sends the token as it did).
    via: str
    route: Route | None
    #: ``discarded`` reason, or the error and state of a failure still to be routed.
    discard_reason: str | None = None
    error: dict[str, Any] | None = None
    failed_state: str | None = None


@dataclass(slots=True)
class _SourceReread:
    """The source as a resume found it: the digest of the rows the run read (checked
    against the run's), and the reader, at the first row the run never read."""

    digest: Any
    records: AsyncGenerator[SourceRecord, None]
    #: Where the source stands after the last row the run read, if it can say.
    position: SourcePosition | None


class ResumePlan:
    """How one unfinished run goes on; built by :meth:`load`, used by the pipeline."""

    def __init__(
        self,
        graph: Graph,
        unfinished: UnfinishedRun,
        calls: CallSummary,
        payloads: dict[str, Any],
        source: _SourceReread,
        replay: AnswerBook | None = None,
    ) -> None:
        self.graph = graph
        self.unfinished = unfinished
        self._calls = calls
        self._payloads = payloads
        self._source = source
        own = {
            request: (response, payloads[response])
            for request, response in unfinished.reusable_calls.items()
            if response in payloads
        }
        #: The run's own answers, then (for a replaying run) the replayed run's.
        self.answers = AnswerBook("reused", own, fallback=replay)

    @property
    def run_id(self) -> str:
        return self.unfinished.run_id

    async def aclose(self) -> None:
        """Close the source reader (the source node closes it when it ran)."""
        await self._source.records.aclose()

    # -- loading and refusing -----------------------------------------------------------

    @classmethod
    async def load(cls, graph: Graph, landscape: Landscape, run_id: str) -> ResumePlan:
        """Read ``run_id``'s unfinished state; raise :class:`ResumeError` if it cannot
        be resumed with ``graph``."""
        unfinished = await landscape.unfinished_run(run_id)
        _refuse_status(run_id, None if unfinished is None else unfinished.status)
        assert unfinished is not None
        _check_graph(graph, unfinished)
        summary = await landscape.get_run(run_id)
        calls = CallSummary() if summary is None else summary.calls
        replay = None
        if unfinished.replayed_from is not None:
            replay = await load_replay(landscape, unfinished.replayed_from)
        source = await _reread_source(graph, unfinished)
        try:
            payloads = await landscape.load_payloads(_payloads_needed(unfinished))
        except BaseException:
            await source.records.aclose()
            raise
        return cls(graph, unfinished, calls, payloads, source, replay)

    # -- putting the run back -------------------------------------------------------------

    def prepare(self, run: RunContext) -> None:
        """Give ``run`` the counters and held state of the unfinished run, and close
        what a crash left open (queued on the run's recorder)."""
        unfinished = self.unfinished
        recorder = run.recorder
        run.outcomes.update(unfinished.outcomes)
        run.rows_read = unfinished.max_row_index + 1  # where the source reads on
        run.source_digest = self._source.digest
        run.source_records = self._source.records
        run.source_position = self._source.position
        run.rows = RowTracker(rows_admitted=run.rows_read)
        run.checkpoints.due_at_rows = (
            run.rows_read + self.graph.settings.runtime.checkpoint_every_rows
        )
        run.sink_writes = {node: seq for node, (seq, _) in unfinished.sink_positions.items()}
        run.answers = self.answers
        run.calls = CallTotals.resumed(self._calls)
        for state in unfinished.open_states:
            recorder.close_state(
                state.state_id,
                status=NodeStateStatus.CANCELLED,
                started_at=state.started_at,
                completed_at=state.started_at,
                error=_INTERRUPTED,
            )
        self._record_orphan_states(run)
        for token in unfinished.pending:
            run.rows.add(token.row_index)
        self._restore_batches(run)

    def _record_orphan_states(self, run: RunContext) -> None:
        """Record ``cancelled`` each state a crash left with calls but no record of its
        own, as an attempt of its token at its node (the re-done work is the next)."""
        pending = {token.token_id: token for token in self.unfinished.pending}
        for orphan in self.unfinished.orphan_states:
            token = pending.get(orphan.token_id)
            states = [] if token is None else token.states
            at_node = [s for s in states if s.node_id == orphan.node_id]
            state = RecordedState(
                state_id=orphan.state_id,
                node_id=orphan.node_id,
                status=NodeStateStatus.CANCELLED.value,
                step=max((s.step for s in states), default=-1) + 1,
                attempt=1 + sum(1 for s in at_node if s.status not in (_COMPLETED, _FAILED)),
                started_at=orphan.started_at,
                input_hash=None,
                output_hash=None,
                context=None,
                error=_INTERRUPTED,
            )
            run.recorder.node_state(
                state_id=state.state_id,
                token_id=orphan.token_id,
                node_id=state.node_id,
                status=NodeStateStatus.CANCELLED,
                input_hash=None,
                output_hash=None,
                started_at=state.started_at,
                completed_at=state.started_at,
                step_index=state.step,
                attempt=state.attempt,
                error=state.error,
            )
            states.append(state)  # counted as an attempt when the token re-enters

    def _restore_batches(self, run: RunContext) -> None:
        """Put each open batch's pending members back into it: a first-attempt draft
        goes on collecting, a batch whose external job is pending waits for that job, a
        retry recorded before its flush began is flushed, and a batch caught mid-flush
        fails that attempt and is flushed again as the next one.  Attempt numbers go on
        from the recorded ones, and ``retries`` counts the failed attempts of the
        batch's whole life (an attempt a stop or crash cut short is no failure)."""
        unfinished = self.unfinished
        recorder = run.recorder
        pending = {token.token_id: token for token in unfinished.pending}
        unfinished_states = (NodeStateStatus.PENDING.value, NodeStateStatus.OPEN.value)
        flush_states = {
            state.state_id: (token.token_id, state)
            for token in unfinished.pending
            for state in token.states
            if state.status in unfinished_states
        }
        for batch in unfinished.open_batches:
            members = [m for m in batch.members if m in pending]
            trigger = batch.trigger_reason or FlushTrigger.END_OF_SOURCE
            failures = 0
            if members:
                failures = sum(
                    1
                    for state in pending[members[0]].states  # flushes are on the first member
                    if state.node_id == batch.node_id
                    and state.status == _FAILED
                    and self._is_flush(state)
                )
            batch_id = batch.batch_id
            if batch.status == BatchStatus.DRAFT.value and batch.attempt == 1:
                pass  # restored as its group's draft: rows may still join it
            elif batch.status == BatchStatus.DRAFT.value:
                # A retry whose flush never began: flush it, as the attempt it is.
                run.held_batches[batch_id] = HeldBatch(
                    len(members), trigger, attempt=batch.attempt, failures=failures
                )
            elif batch.status == BatchStatus.PENDING.value and batch.external_job_id:
                # Its job runs on at the provider: wait for it again, never resubmit.
                anchor, state = flush_states[str(batch.aggregation_state_id)]
                job = RecordedJob(
                    job_id=batch.external_job_id,
                    state_id=state.state_id,
                    anchor_token_id=anchor,
                    started_at=state.started_at,
                    attempt=batch.attempt,
                )
                run.held_batches[batch_id] = HeldBatch(
                    len(members), trigger, job, attempt=batch.attempt, failures=failures
                )
            else:  # caught mid-flush: that attempt failed, its members make the next one
                recorder.update_batch(batch.batch_id, status=BatchStatus.FAILED)
                batch_id = recorder.new_id("b")
                # Flushed again, for the same reason, once all its members are back.
                # An external job it started may exist without a record of it.
                flush = flush_states.get(str(batch.aggregation_state_id))
                earlier = None
                if flush is not None:
                    earlier = EarlierAttempt(batch.batch_id, flush[1].started_at)
                run.held_batches[batch_id] = HeldBatch(
                    len(members),
                    trigger,
                    earlier=earlier,
                    attempt=batch.attempt + 1,
                    failures=failures,
                )
                recorder.batch(
                    batch_id=batch_id,
                    node_id=batch.node_id,
                    attempt=batch.attempt + 1,
                    status=BatchStatus.DRAFT,
                    group_key=batch.group_key,
                )
                for ordinal, token_id in enumerate(members):
                    recorder.batch_member(batch_id=batch_id, token_id=token_id, ordinal=ordinal)
            for token_id in members:
                run.restored_members[token_id] = batch_id

    async def resume_sink(self, node_id: str, sink: Sink) -> None:
        """Open ``sink`` at the position its recorded writes reached."""
        recorded = self.unfinished.sink_positions.get(node_id)
        await sink.resume(None if recorded is None else recorded[1])

    async def reenter(self, run: RunContext, outbox: Outbox) -> None:
        """Send every pending token back into the graph, then let the source go on."""
        try:
            reentries = [self._reentry(token) for token in self.unfinished.pending]
            self._reopen_forks(run, reentries)
            senders: dict[str, NodeTask] = {}
            for entry in reentries:
                if run.stop_requested.is_set():
                    break  # the rest stay as they are for the next resume
                sender = senders.get(entry.via)
                if sender is None:
                    spec = self.graph.nodes[entry.via]
                    sender = senders[entry.via] = NodeTask(spec, run, None, outbox)
                await _send(sender, entry)
        finally:
            outbox.close()
            run.restored.set()

    # -- where each token goes ------------------------------------------------------------

    def _reentry(self, pending: PendingToken) -> _Reentry:
        states = [s for s in pending.states if not self._is_flush(s)]
        token = Token(pending.token_id, pending.row_id, pending.row_index, {}, "", pending.branch)
        last = states[-1] if states else None
        if last is not None and last.status == _FAILED:
            return self._after_failure(token, last)
        completed = [s for s in states if s.status == _COMPLETED]
        if completed:
            base = completed[-1]
            spec = self.graph.nodes[base.node_id]
            context = base.context or {}
            if spec.kind is NodeKind.TRANSFORM and "discarded" in context:
                self._take_row(token, base.input_hash, base.step)
                return _Reentry(token, base.node_id, None, discard_reason=context["discarded"])
            label = context["route"] if spec.kind is NodeKind.GATE else "success"
            route = spec.routes[label]
        else:  # a fork child that never got further than its fork
            base = self._fork_state(pending)
            spec = self.graph.nodes[base.node_id]
            route = spec.routes[str(pending.branch)]
        self._take_row(token, base.output_hash, base.step + 1)
        if _releases_in_order(spec):
            # Back through the node's release window, done: it keeps its place in the
            # node's order behind the rows the node still has to (re)do.
            token.settled_at = spec.node_id
            route = Route("resume", spec.node_id, None, EdgeMode.MOVE, Arrival.NORMAL)
            return _Reentry(token, base.node_id, route)
        target = route.target
        token.attempt = 1 + sum(
            1 for s in states if s.node_id == target and s.status not in (_COMPLETED, _FAILED)
        )
        return _Reentry(token, base.node_id, route)

    def _after_failure(self, token: Token, failed: RecordedState) -> _Reentry:
        spec = self.graph.nodes[failed.node_id]
        diverted = next((r for r in failed.routes if r.reason and "row_hash" in r.reason), None)
        error = failed.error or {"type": "Error", "message": "unknown"}
        if diverted is not None:
            assert diverted.reason is not None
            route = spec.error_route
            self._take_row(token, str(diverted.reason["row_hash"]), failed.step + 1)
            token.error = error
            return _Reentry(token, failed.node_id, route)
        self._take_row(token, failed.input_hash, failed.step + 1)
        return _Reentry(token, failed.node_id, None, error=error, failed_state=failed.state_id)

    def _take_row(self, token: Token, row_hash: str | None, step: int) -> None:
        if row_hash is None or row_hash not in self._payloads:
            raise ResumeError(
                f"token {token.token_id} of row {token.row_index}: its row is not on record"
            )
        token.row, token.row_hash, token.step = self._payloads[row_hash], row_hash, step

    def _fork_state(self, pending: PendingToken) -> RecordedState:
        """The fork gate state that made ``pending``."""
        for parent in pending.parents:
            state = self._fork_state_of(parent)
            if state is not None:
                return state
        raise ResumeError(
            f"token {pending.token_id} of row {pending.row_index} has no state and no fork"
        )

    def _fork_state_of(self, parent_id: str) -> RecordedState | None:
        """The state in which token ``parent_id`` was forked, if it was."""
        for state in reversed(self.unfinished.parent_states.get(parent_id, [])):
            if state.context and "fork_to" in state.context:
                return state
        return None

    def _is_flush(self, state: RecordedState) -> bool:
        """An aggregation's flush state (recorded on a batch's first member)."""
        spec = self.graph.nodes.get(state.node_id)
        context = state.context or {}
        return (
            spec is not None
            and spec.kind is NodeKind.AGGREGATION
            and "trigger" in context
            and "members" in context
        )

    def _reopen_forks(self, run: RunContext, reentries: list[_Reentry]) -> None:
        """Give the branch tokens of joined forks a fork instance again, counting the
        branches still on their way (a branch with none left is lost)."""
        by_parent: dict[str, list[Token]] = {}
        pending = {t.token_id: t for t in self.unfinished.pending}
        for entry in reentries:
            token = entry.token
            if token.branch is None:
                continue
            parents = pending[token.token_id].parents
            if len(parents) == 1:
                by_parent.setdefault(parents[0], []).append(token)
        for parent_id, tokens in by_parent.items():
            fork_state = self._fork_state_of(parent_id)
            if fork_state is None:
                continue
            join = run.joins.get(fork_state.node_id)
            if join is None:
                continue
            counts = Counter(str(t.branch) for t in tokens)
            branches = fork_state.context["fork_to"] if fork_state.context else []
            fork = ForkInstance(
                parent_id,
                fork_state.node_id,
                {str(b): counts.get(str(b), 0) for b in branches},
                join=join,
            )
            for token in tokens:
                token.fork = fork


async def check_resumable(
    graph: Graph, landscape: Landscape, run_id: str, pipeline_file: Path | None
) -> None:
    """Raise :class:`ResumeError` when run ``run_id`` cannot be resumed at all — it is
    not on record, it completed, or its source cannot be read — before the resume takes
    the run over.  ``pipeline_file`` is the file ``graph`` was loaded from, if any."""
    summary = await landscape.get_run(run_id)
    _refuse_status(run_id, None if summary is None else summary.status)
    assert summary is not None
    source: Source = graph.source.plugin  # type: ignore[assignment]
    problem = await source.check_readable()
    if problem is None:
        return
    started_with = summary.pipeline_file
    if started_with is not None and Path(started_with) != pipeline_file:
        how = (
            f"it was started with {started_with}, and relative paths in a pipeline file "
            "are read from the file's directory: resume with --pipeline "
            f"{started_with}, or put the input where this pipeline file expects it"
        )
    else:
        how = "put the input back where it was (the rows the run read are checked against it)"
    raise ResumeError(f"cannot resume run {run_id}: its source cannot be read ({problem}); {how}")


def _refuse_status(run_id: str, status: str | None) -> None:
    if status is None:
        raise ResumeError(f"run {run_id} is not in the Landscape")
    if status == RunStatus.COMPLETED.value:
        raise ResumeError(f"run {run_id} is completed: there is nothing to resume")
    if status not in _RESUMABLE:
        raise ResumeError(f"run {run_id} has status {status!r}")


def _releases_in_order(spec: NodeSpec) -> bool:
    """Whether ``spec`` is a transform that works on several rows at once and releases
    them in arrival order (a row it completed may have waited there for an earlier one)."""
    if spec.kind is not NodeKind.TRANSFORM:
        return False
    settings: TransformSettings = spec.settings  # type: ignore[assignment]
    parallel = settings.concurrency > 1 or settings.batch_size > 1
    return parallel and settings.ordered


async def _send(sender: NodeTask, entry: _Reentry) -> None:
    token = entry.token
    run = sender.run_ctx
    if entry.discard_reason is not None:
        run.record_outcome(
            token,
            Outcome.DISCARDED,
            sender.node_id,
            context={"node": sender.node_id, "reason": entry.discard_reason},
        )
    elif entry.error is not None:
        assert entry.failed_state is not None
        await sender.fail_row(token, entry.error, entry.failed_state)
    else:
        assert entry.route is not None
        await sender.deliver(token, entry.route)


def _check_graph(graph: Graph, unfinished: UnfinishedRun) -> None:
    recorded = unfinished.node_config_hashes
    current = {
        node_id: sha256_hex(canonical_json(spec.config())) for node_id, spec in graph.nodes.items()
    }
    added = sorted(set(current) - set(recorded))
    removed = sorted(set(recorded) - set(current))
    changed = sorted(n for n in set(current) & set(recorded) if current[n] != recorded[n])
    if not (added or removed or changed):
        return
    parts = []
    if added:
        parts.append(f"nodes added: {', '.join(added)}")
    if removed:
        parts.append(f"nodes removed: {', '.join(removed)}")
    if changed:
        parts.append(f"nodes changed: {', '.join(changed)}")
    raise ResumeError(
        f"run {unfinished.run_id} cannot be resumed with this pipeline: it differs from the "
        f"one the run started with ({'; '.join(parts)})"
    )


def _raw_hash(raw: Any) -> str:
    """The hash the source node records for a raw record (its text if not JSON)."""
    try:
        return hashlib.sha256(canonical_bytes(raw)).hexdigest()
    except CanonicalizationError:
        return canonical_hash(raw_text(raw))


def _payloads_needed(unfinished: UnfinishedRun) -> set[str]:
    """The payloads a resume reads: the rows its tokens go on with, and reusable answers."""
    states = [s for token in unfinished.pending for s in token.states]
    states += [s for parent in unfinished.parent_states.values() for s in parent]
    needed = {h for s in states for h in (s.input_hash, s.output_hash) if h is not None}
    needed |= {
        str(route.reason["row_hash"])
        for s in states
        for route in s.routes
        if route.reason and route.reason.get("row_hash")
    }
    needed |= set(unfinished.reusable_calls.values())
    return needed


async def _reread_source(graph: Graph, unfinished: UnfinishedRun) -> _SourceReread:
    """Check that the source still holds the rows the run read; refuse if not.

    A source that can seek checks its bytes up to the checkpoint's position itself and
    reads on from there; any other source is read again from its start, each row hashed
    into the digest the checkpoint recorded.  Rows read after the checkpoint are compared
    one by one with their recorded hashes.  The reader then goes on from the first row
    the run never read.
    """
    node_id, source = graph.source.node_id, graph.source.plugin
    assert isinstance(source, Source)
    if source.one_shot:
        raise ResumeError(
            f"source '{node_id}' reads a one-shot iterator, which cannot be read again to "
            "resume; pass a re-iterable (such as a list, or an object whose __iter__ or "
            "__aiter__ starts a new iteration)"
        )
    checkpoint = unfinished.checkpoint_state or {}
    rows_read = int(checkpoint.get("rows_read", 0))
    position = checkpoint.get("source_position")
    expected_digest = checkpoint.get("source_digest")
    digest: Any = None
    if position is not None:
        problem = await source.check_position(position)
        if problem is not None:
            raise _source_changed(node_id, problem)
        records = source.read(start_index=rows_read, resume_from=position)
        index = rows_read - 1
        last_position: SourcePosition | None = _Recorded(position)
    else:
        records = source.read(start_index=0)
        digest = hashlib.sha256()
        index = -1
        last_position = None
    after = dict(unfinished.rows_after_checkpoint)
    last = unfinished.max_row_index
    try:
        while index < last:
            try:
                record = await anext(records)
            except StopAsyncIteration:
                raise _source_changed(
                    node_id, f"it now has {index + 1} rows, the run read {last + 1}"
                ) from None
            index += 1
            last_position = record.position
            raw_hash = _raw_hash(record.raw)
            if digest is not None:
                digest.update(raw_hash.encode())
                at_checkpoint = index + 1 == rows_read and expected_digest is not None
                if at_checkpoint and digest.hexdigest() != expected_digest:
                    raise _source_changed(node_id, f"rows 0-{index} differ from the recorded rows")
            recorded = after.get(index)
            if recorded is not None and recorded != raw_hash:
                raise _source_changed(node_id, f"row {index} differs from the recorded row")
    except BaseException:
        await records.aclose()
        raise
    return _SourceReread(digest, records, last_position)


@dataclass(frozen=True, slots=True)
class _Recorded:
    """A source position as a checkpoint recorded it."""

    data: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dict(self.data)


def _source_changed(node_id: str, what: str) -> ResumeError:
    return ResumeError(
        f"source '{node_id}' changed since the run read it ({what}): resuming would mix "
        "two inputs; start a new run"
    )
