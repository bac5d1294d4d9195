"""State shared by the node tasks of one run: identity, recorder, outcome counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from landscape import Outcome

if TYPE_CHECKING:
    from collections.abc import Mapping

    from landscape import Recorder

    from ._clock import Clock
    from ._forks import JoinListener
    from ._graph import Graph, NodeKind
    from ._streams import Inbox
    from ._tokens import Token

__all__ = ["NodeStatistics", "NodeStats", "RunContext"]


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
        self.outcomes: Counter[str] = Counter()
        self.rows_read = 0
        self.stop_requested = anyio.Event()
        self.stats = {
            node_id: NodeStats(node_id, spec.kind) for node_id, spec in graph.nodes.items()
        }

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
        name = outcome._value_
        self.outcomes[name] += 1
        self.stats[node_id].outcomes[name] += 1

    def statistics(self) -> list[NodeStatistics]:
        return [stats.snapshot() for stats in self.stats.values()]
