"""State shared by the node tasks of one run: identity, recorder, outcome counts."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from landscape import Outcome

from ._calls import AnswerBook, CallTotals, StateCalls
from ._checkpoints import Checkpointer
from ._watermark import RowTracker

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Mapping

    from landscape import Recorder
    from plugins import CallLog, ExternalCall, SourcePosition, SourceRecord

    from ._clock import Clock
    from ._forks import JoinListener
    from ._graph import Graph, NodeKind
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

    def token_made(self, token: Token) -> None:
        """Count a token made from other tokens (fork child, join or batch output) as live."""
        self.rows.add(token.row_index)

    def calls_for(self, state_id: str, token_id: str, node_id: str) -> CallLog:
        """Where the plugin of node state ``state_id`` (of ``token_id`` at ``node_id``)
        reports its external calls."""
        return StateCalls(self, state_id, token_id, node_id)

    def count_call(self, call: ExternalCall) -> None:
        """Add ``call`` to the run's totals; crossing the budget stops the run."""
        self.calls.add(call)
        budget = self.graph.settings.budget
        if budget is None or self.stop_requested.is_set():
            return
        totals = self.calls
        if budget.max_cost is not None and totals.cost > budget.max_cost:
            self.request_stop(f"budget: cost {totals.cost:.4f} > max_cost {budget.max_cost}")
        elif budget.max_tokens is not None and totals.tokens > budget.max_tokens:
            self.request_stop(f"budget: {totals.tokens} tokens > max_tokens {budget.max_tokens}")

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
