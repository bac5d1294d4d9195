"""What a comparison of two runs returns: frozen records, serialisable with ``to_dict``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._lineage import RunInfo, _plain

__all__ = [
    "DiffCounts",
    "Divergence",
    "FieldChange",
    "NodeDecision",
    "RowDiff",
    "RunDiff",
    "TokenEnd",
]


@dataclass(frozen=True, slots=True)
class DiffCounts:
    """How the rows of two runs compare; always complete, whatever the ``limit``."""

    #: Rows present in both runs: ``identical + different + source_differs``.
    compared: int = 0
    identical: int = 0
    different: int = 0
    #: Rows whose source data differs (not analysed).
    source_differs: int = 0
    only_in_a: int = 0
    only_in_b: int = 0


@dataclass(frozen=True, slots=True)
class TokenEnd:
    """Where one line of a row ended in one run."""

    #: The token's lineage path (``""`` for the source token; see ``_diff._lines``).
    path: str
    #: The terminal outcome (``None`` while there is none: an unfinished run).
    outcome: str | None
    sink: str | None
    #: Hash of the token's final row.
    row_hash: str | None


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One top-level field that differs between two rows of the same line."""

    path: str
    field: str
    #: ``changed``, ``added`` (only in run B) or ``removed`` (only in run A).
    change: str
    #: The value in run A (``None`` when ``added``).
    a: Any
    #: The value in run B (``None`` when ``removed``).
    b: Any


@dataclass(frozen=True, slots=True)
class NodeDecision:
    """What one node did with a token in one run."""

    node_id: str
    #: ``None`` when the node is not among the run's recorded nodes.
    node_type: str | None
    step: int
    status: str
    output_hash: str | None
    #: Labels of the routes the state took (a gate's route, a fork's branches, an
    #: error route), in recording order.
    routes: tuple[str, ...]
    #: Why: the routing event's reason (a gate's ``{condition, value, route}``; a list
    #: when the state took several routes), else a gate's decision as its state records
    #: it (a discarding route has no event), else ``None``.
    reason: Any
    #: The response of the state's answering external call (an LLM's answer), if any.
    answer: Any
    #: That call's status: ``success``, ``reused`` or ``replayed``.
    answer_status: str | None
    error: Any


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first node where one line of a row went differently in the two runs."""

    path: str
    #: What differs first: ``node`` (the line reached different nodes), ``route``,
    #: ``answer`` (an external call answered differently), ``status``, ``output``,
    #: ``end`` (the line stops here in one run), ``outcome`` (same steps, different
    #: outcome) or ``token`` (the token exists in one run only).
    kind: str
    #: The node's decision in run A (``None`` where the line has no such step).
    a: NodeDecision | None
    b: NodeDecision | None
    #: Fields of the two outputs that differ, when both outputs are rows.
    changed_fields: tuple[FieldChange, ...]

    @property
    def node_id(self) -> str:
        decision = self.a or self.b
        return "" if decision is None else decision.node_id

    @property
    def node_type(self) -> str | None:
        decision = self.a or self.b
        return None if decision is None else decision.node_type


@dataclass(frozen=True, slots=True)
class RowDiff:
    """One row that came out differently, and why."""

    row_index: int
    row_id_a: str
    row_id_b: str
    #: Where the row's lines ended in each run, by path (tokens whose line goes on in
    #: their children, such as a fork's parent, are left out).
    ends_a: tuple[TokenEnd, ...]
    ends_b: tuple[TokenEnd, ...]
    #: Fields of the final rows that differ, for lines that ended in both runs.
    field_changes: tuple[FieldChange, ...]
    #: One per line that diverged by itself, the row's first divergence first.
    divergences: tuple[Divergence, ...]

    @property
    def first_divergence(self) -> Divergence | None:
        return self.divergences[0] if self.divergences else None


@dataclass(frozen=True, slots=True)
class RunDiff:
    """Two runs compared row by row: complete counts, the differing rows analysed."""

    run_a: RunInfo
    run_b: RunInfo
    counts: DiffCounts
    #: The first ``limit`` differing rows (all without a limit), in row order.
    rows: tuple[RowDiff, ...]
    #: Row indexes (the first ``limit`` of each kind) whose source data differs, and
    #: those present in one run only.
    source_differs: tuple[int, ...]
    only_in_a: tuple[int, ...]
    only_in_b: tuple[int, ...]
    limit: int | None

    @property
    def identical(self) -> bool:
        """True when every row is in both runs and came out the same."""
        c = self.counts
        return c.compared == c.identical and not (c.only_in_a or c.only_in_b)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the whole comparison (``ledgerflow diff --json``)."""
        result: dict[str, Any] = _plain(self)
        return result
