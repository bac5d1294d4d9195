"""State shared by the node tasks of one run: identity, recorder, outcome counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from collections.abc import Mapping

    from landscape import Outcome, Recorder

    from ._graph import Graph, NodeKind
    from ._streams import Inbox

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


class RunContext:
    """What every node of a run shares.  Terminal outcomes are counted in one place."""

    def __init__(self, run_id: str, graph: Graph, recorder: Recorder) -> None:
        self.run_id = run_id
        self.graph = graph
        self.recorder = recorder
        self.outcomes: Counter[str] = Counter()
        self.rows_read = 0
        self.stop_requested = anyio.Event()
        self.stats = {
            node_id: NodeStats(node_id, spec.kind) for node_id, spec in graph.nodes.items()
        }

    def record_outcome(
        self,
        token_id: str,
        outcome: Outcome,
        node_id: str,
        *,
        sink_name: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Record ``token_id``'s outcome and count it for the run and for ``node_id``."""
        self.recorder.outcome(
            token_id=token_id, outcome=outcome, sink_name=sink_name, context=context
        )
        name = outcome._value_
        self.outcomes[name] += 1
        self.stats[node_id].outcomes[name] += 1

    def statistics(self) -> list[NodeStatistics]:
        return [stats.snapshot() for stats in self.stats.values()]
