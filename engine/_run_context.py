"""State shared by the node tasks of one run: identity, recorder, outcome counts."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from landscape import Outcome
from plugins import StopRun

from ._calls import AnswerBook, BudgetGuard, CallTotals, StateCalls
from ._checkpoints import Checkpointer
from ._graph import NodeKind
from ._watermark import RowTracker

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Mapping

    from landscape import Recorder
    from plugins import CallLog, ExternalCall, Reservation, SourcePosition, SourceRecord

    from ._clock import Clock
    from ._forks import JoinListener
    from ._graph import Graph
    from ._streams import Inbox
    from ._tokens import Token

__all__ = [
    "EarlierAttempt",
    "HeldBatch",
    "NodeStatistics",
    "NodeStats",
    "RecordedJob",
    "RunContext",
]


@dataclass(frozen=True, slots=True)
class RecordedJob:
    """An external job a stopped run left ``pending``: a resume waits for it again,
    never submitting it twice."""

    job_id: str
    #: The flush state waiting for it, recorded on the token ``anchor_token_id``.
    state_id: str
    anchor_token_id: str
    started_at: float
    attempt: int


@dataclass(frozen=True, slots=True)
class EarlierAttempt:
    """The attempt a crash cut short before its external job's id was recorded: the
    job may exist at the provider all the same (see ``ExternalJobAggregation.find``)."""

    batch_id: str
    started_at: float


@dataclass(frozen=True, slots=True)
class HeldBatch:
    """A batch a stopped run left mid-flush: once its ``members`` are back, a resume
    flushes it again for ``trigger`` (as a new attempt after ``earlier``) or, when its
    external ``job`` had started, waits for that job."""

    members: int
    trigger: str
    job: RecordedJob | None = None
    earlier: EarlierAttempt | None = None
    #: The attempt the resume makes (or waits for), and the batch's failed attempts so
    #: far: ``retries`` is a budget over the run's whole life.
    attempt: int = 1
    failures: int = 0


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    """A snapshot of one node's activity (for progress displays)."""

    node_id: str
    kind: NodeKind
    received: int
    in_flight: int
    queue_depth: int
    outcomes: Mapping[str, int]


@dataclass(slots=True)
class NodeStats:
    """One node's live counters; only its own task writes them."""

    node_id: str
    kind: NodeKind
    received: int = 0
    in_flight: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    inbox: Inbox | None = None

    def snapshot(self) -> NodeStatistics:
        depth = 0 if self.inbox is None else self.inbox.queue_depth()
        return NodeStatistics(
            self.node_id, self.kind, self.received, self.in_flight, depth, dict(self.outcomes)
        )


#: Outcomes after which the token's line goes on in other tokens (children, a join).
_LINE_CONTINUES = frozenset({Outcome.FORKED, Outcome.COALESCED, Outcome.BUFFERED})
#: Outcomes that end a token's line for good: the row (or that branch of it) is done.
_LINE_ENDS = frozenset(
    {
        Outcome.COMPLETED,
        Outcome.ROUTED,
        Outcome.QUARANTINED,
        Outcome.DIVERTED,
        Outcome.FAILED,
        Outcome.DISCARDED,
    }
)
#: Outcomes that are row errors (see ``Landscape.row_errors``).
_ROW_ERRORS = frozenset({Outcome.FAILED, Outcome.DIVERTED})


class RunContext:
    """What every node of a run shares.  Outcomes are recorded and counted in one place."""

    def __init__(self, run_id: str, graph: Graph, recorder: Recorder, clock: Clock) -> None:
        self.run_id = run_id
        self.graph = graph
        self.recorder = recorder
        self.clock = clock
        #: Fork gate -> the coalesce that joins its branches (registered by the coalesces).
        self.joins: dict[str, JoinListener] = {}
        self.calls = CallTotals()
        #: The budget, and the estimates of the attempts on their way.
        self.budget = BudgetGuard(graph.settings.budget)
        #: This session's row errors (as ``Landscape.row_errors`` counts them: tokens
        #: that ended ``failed`` or that a node other than the source sent down an
        #: error route) and finished tokens (sent to a sink, or ended before one):
        #: what ``max_failed_rows`` and ``max_failed_ratio`` are held to.
        self.row_errors = 0
        self.rows_finished = 0
        self._sinks = _nodes_of(graph, NodeKind.SINK)
        self._sources = _nodes_of(graph, NodeKind.SOURCE)
        self._ratio_from = graph.settings.runtime.failed_ratio_min_rows
        #: Answers a call may take instead of being made (a resume's own, or a replay's).
        self.answers = AnswerBook("reused", {})
        #: Why the run was asked to stop early (``None``: it was not, or by ``stop()``).
        self.stop_reason: str | None = None
        self.outcomes: Counter[str] = Counter()
        self.rows_read = 0
        #: Where the source stands after the last row read (for sources that can seek),
        #: and a SHA-256 over the raw hashes of the rows read, in order: what a resume
        #: checks the source against (``None`` when a resume went on from a position).
        self.source_position: SourcePosition | None = None
        self.source_digest: Any = hashlib.sha256()
        #: Live tokens per row: what the watermark of a checkpoint is computed from.
        self.rows = RowTracker()
        #: Token -> the open batch a resume puts it back into (emptied as they arrive).
        self.restored_members: dict[str, str] = {}
        #: Batches a resume flushes again, or waits for the job of, by batch id.
        self.held_batches: dict[str, HeldBatch] = {}
        #: Batch -> the external job it waits for now (at most ``max_pending_jobs`` per
        #: node); what checkpoints report as held at the provider.
        self.pending_jobs: dict[str, str] = {}
        #: Set once a resume has sent every restored token on (at once for a new run);
        #: the source reads new rows only then, so restored batches fill up first.
        self.restored = anyio.Event()
        #: The reader a resume opened at row ``rows_read`` (``None``: the source node
        #: opens one there).
        self.source_records: AsyncGenerator[SourceRecord, None] | None = None
        #: Sink -> writes recorded before this session (a resumed run goes on counting).
        self.sink_writes: dict[str, int] = {}
        self.stop_requested = anyio.Event()
        #: Set to cancel in-flight work now (a second signal) rather than after the drain.
        self.force_requested = anyio.Event()
        self.stats = {
            node_id: NodeStats(node_id, spec.kind) for node_id, spec in graph.nodes.items()
        }
        runtime = graph.settings.runtime
        self.checkpoints = Checkpointer(
            self,
            every_rows=runtime.checkpoint_every_rows,
            interval=runtime.checkpoint_interval_seconds,
        )

    def record_outcome(
        self,
        token: Token,
        outcome: Outcome,
        node_id: str,
        *,
        sink_name: str | None = None,
        batch_id: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Record ``token``'s outcome and count it for the run and for ``node_id``.

        A terminal outcome that ends the token's line tells its fork (if a join waits
        for it) that the token's branch has one token fewer on the way.
        """
        self.recorder.outcome(
            token_id=token.token_id,
            outcome=outcome,
            sink_name=sink_name,
            batch_id=batch_id,
            context=context,
        )
        if token.fork is not None and outcome not in _LINE_CONTINUES:
            assert token.branch is not None
            token.fork.leave(token.branch, lost=True)
        if outcome is not Outcome.BUFFERED:
            self.rows.end(token.row_index)
        name = outcome._value_
        self.outcomes[name] += 1
        self.stats[node_id].outcomes[name] += 1
        if outcome in _LINE_ENDS:
            # A sink's outcome ends a token counted as finished when it was sent there.
            at_sink = node_id in self._sinks
            self._count_finished(finished=not at_sink, failed=outcome in _ROW_ERRORS)

    def token_to_sink(self, token: Token, node_id: str) -> None:
        """Count ``token`` as finished: ``node_id`` sent it to a sink, down its error
        route if ``token.error`` is set (a row error unless ``node_id`` is the source,
        whose invalid records are quarantined, not errors).  Successes and errors are
        counted alike as they are decided, not as sinks write them.  A sink passing a row
        it could not write to its ``on_write_failure`` sink counts nothing here: the row
        was counted when it was sent to the first, and its ``diverted`` outcome is the
        row error."""
        if node_id in self._sinks:
            return
        diverted = token.error is not None
        self._count_finished(finished=True, failed=diverted and node_id not in self._sources)

    def _count_finished(self, *, finished: bool, failed: bool) -> None:
        """Count a finished token and a row error; crossing ``runtime.max_failed_rows``
        or ``runtime.max_failed_ratio`` stops the run (looked at on each error, and
        when enough tokens finished for the ratio to apply)."""
        self.rows_finished += finished
        self.row_errors += failed
        ratio_applies = finished and self.rows_finished == self._ratio_from
        if (failed or ratio_applies) and not self.stop_requested.is_set():
            reason = self._failures_crossed()
            if reason is not None:
                self.request_stop(reason)

    def _failures_crossed(self) -> str | None:
        """Why the row errors so far are too many, or ``None``: more than
        ``max_failed_rows``, or more than ``max_failed_ratio`` of the tokens finished
        once at least ``failed_ratio_min_rows`` have."""
        runtime = self.graph.settings.runtime
        errors, finished = self.row_errors, self.rows_finished
        limit = runtime.max_failed_rows
        if limit is not None and errors > limit:
            return f"failed rows: {errors} > max_failed_rows {limit}"
        ratio = runtime.max_failed_ratio
        if (
            ratio is not None
            and finished >= runtime.failed_ratio_min_rows
            and errors > ratio * finished
        ):
            return (
                f"failed rows: {errors} of {finished} finished "
                f"({errors / finished:.0%}) > max_failed_ratio {ratio:g}"
            )
        return None

    def token_made(self, token: Token) -> None:
        """Count a token made from other tokens (fork child, join or batch output) as live."""
        self.rows.add(token.row_index)

    def calls_for(self, state_id: str, token_id: str, node_id: str) -> CallLog:
        """Where the plugin of node state ``state_id`` (of ``token_id`` at ``node_id``)
        reports its external calls."""
        return StateCalls(self, state_id, token_id, node_id)

    def count_call(self, call: ExternalCall) -> None:
        """Add ``call`` to the run's totals; crossing the budget (a call that used more
        than its reservation, or one made without any) stops the run."""
        self.calls.add(call)
        reason = self.budget.crossed(self.calls)
        if reason is not None:
            self.request_stop(reason)

    async def reserve(self, tokens: int, cost: float) -> Reservation:
        """Reserve one attempt's estimate against the budget (see :class:`BudgetGuard`);
        a refusal stops the run with the budget as its reason and raises
        :class:`~plugins.StopRun`."""
        try:
            return await self.budget.reserve(self.calls, tokens, cost)
        except StopRun as refused:
            self.request_stop(refused.reason)
            raise

    def request_stop(self, reason: str | None, *, force: bool = False) -> None:
        """Stop reading the source at the next row boundary and finish what is held;
        with ``force``, cancel what still runs now instead of after the drain timeout."""
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_requested.set()
        if force:
            self.force_requested.set()

    def statistics(self) -> list[NodeStatistics]:
        return [stats.snapshot() for stats in self.stats.values()]


def _nodes_of(graph: Graph, kind: NodeKind) -> frozenset[str]:
    return frozenset(node_id for node_id, spec in graph.nodes.items() if spec.kind is kind)
