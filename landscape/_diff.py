"""Compare two runs of the same source row by row (``ledgerflow diff RUN_A RUN_B``).

Rows are matched by ``row_index``.  The comparison takes two passes, so that its cost
follows the rows that differ rather than the rows there are:

1. *Fingerprints.*  One query per run, streamed in ``row_index`` order, reduces each row
   to its source data hash and the multiset of its tokens' ``(branch, terminal outcome,
   sink, final row hash)``; the two streams are merged like sorted lists.  A token's
   final row is the output of its last node state, or that state's input when it made
   none (a failure, a filter's discard, a batch member).  Rows with equal fingerprints
   are identical and nothing more is read about them: a row counts as identical when
   every line of it ends the same way with the same row, whatever happened on the way
   (an LLM answering in other words that parse to the same fields, a gate value that
   picks the same route).  Rows whose source data differs
   are counted and listed, not analysed: their differences say nothing about the
   pipeline.
2. *Analysis.*  For the differing rows (the first ``limit`` of them, in chunks of ``IN``
   queries) the tokens, node states, routing events and outcomes are read; tokens are
   matched across the runs by lineage shape, and each matched pair is walked in step
   order (the last attempt of each step) to the first step whose node, routes taken,
   status or output hash differ.  Payloads are read only for final rows that differ,
   for the outputs of diverging node states and for the answers of their external calls.

*Matching tokens.*  Token ids embed run-specific row ids, so tokens are matched by
*path*.  A row's source token has the path ``""``; a fork child adds its branch
(``"sentiment"``, ``"outer/inner"``); any other derived token (a coalesce's join, an
aggregation's output) hangs under the deepest token its parents in the row share and
adds ``@`` and the node that made it (``"@join"``, ``"sentiment/@stats"``); siblings of
the same name are numbered in creation order (``"@stats#1"``).

*Forks and aggregations.*  A row is identical when the multisets of its tokens' ends
are equal, so a fork's branches are compared as a whole, whatever order they finished
in.  A divergence is reported per line: the first node where a matched pair of tokens
differs, unless one of the token's parents diverged already (that explains it); the
row's first divergence is the one met first from the source token down.  An
aggregation's outputs belong, as the engine records them, to the row of the batch's
first member: a changed batch shows there as a diverging flush or output, while each
other member shows only its own ``consumed_in_batch`` end.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import and_, func, select

from . import _schema as t
from ._lineage import RunInfo, _plain, _run_info
from ._outcomes import Outcome
from ._resume import load_payloads

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence

    from sqlalchemy import Row, Select
    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._store import Landscape

__all__ = [
    "DiffCounts",
    "Divergence",
    "FieldChange",
    "NodeDecision",
    "RowDiff",
    "RunDiff",
    "TokenEnd",
    "diff_runs",
]

#: Rows per chunk of the analysis, and values per ``IN (...)`` list.
_CHUNK = 500
#: Rows fetched at a time from a fingerprint stream.
_PARTITION = 5_000
#: Outcomes of tokens whose line goes on in their children (not shown as ends).
_CONTINUING = frozenset({Outcome.FORKED.value, Outcome.COALESCED.value, Outcome.EXPANDED.value})
#: Statuses of an external call whose answer the node used.
_ANSWERED = ("success", "reused", "replayed")


# -- the result ------------------------------------------------------------------------


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

    #: The token's lineage path (``""`` for the source token; see the module docstring).
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


# -- pass 1: fingerprints ----------------------------------------------------------------


class _Fingerprint(NamedTuple):
    """A row reduced to what decides whether it came out the same."""

    row_index: int
    row_id: str
    source_hash: str
    #: Sorted ``(branch, outcome, sink, final row hash)`` of each token, ``""`` for none.
    ends: tuple[tuple[str, str, str, str], ...]


def _fingerprint_query(run_id: str) -> Select[Any]:
    R, T, TO, S = t.rows, t.tokens, t.token_outcomes, t.node_states
    final_row = (
        select(func.coalesce(S.c.output_hash, S.c.input_hash))
        .where(S.c.token_id == T.c.token_id)
        .order_by(S.c.step_index.desc().nulls_last(), S.c.attempt.desc(), S.c.started_at.desc())
        .limit(1)
        .correlate(T)
        .scalar_subquery()
    )
    return (
        select(
            R.c.row_index,
            R.c.row_id,
            R.c.source_data_hash,
            T.c.branch_name,
            TO.c.outcome,
            TO.c.sink_name,
            final_row,
        )
        .select_from(
            R.outerjoin(T, T.c.row_id == R.c.row_id).outerjoin(
                TO, and_(TO.c.token_id == T.c.token_id, TO.c.is_terminal)
            )
        )
        .where(R.c.run_id == run_id)
        .order_by(R.c.row_index)
    )


async def _fingerprints(conn: AsyncConnection, run_id: str) -> AsyncIterator[_Fingerprint]:
    """The run's rows as fingerprints, in ``row_index`` order, streamed."""
    result = await conn.stream(_fingerprint_query(run_id))
    try:
        head: tuple[int, str, str] | None = None
        ends: list[tuple[str, str, str, str]] = []
        async for part in result.partitions(_PARTITION):
            for index, row_id, source_hash, branch, outcome, sink, final in part:
                if head is not None and head[0] != index:
                    yield _Fingerprint(*head, tuple(sorted(ends)))
                    ends = []
                head = (index, row_id, source_hash)
                ends.append((branch or "", outcome or "", sink or "", final or ""))
        if head is not None:
            yield _Fingerprint(*head, tuple(sorted(ends)))
    finally:
        await result.close()


async def _pairs(
    a: AsyncIterator[_Fingerprint], b: AsyncIterator[_Fingerprint]
) -> AsyncIterator[tuple[_Fingerprint | None, _Fingerprint | None]]:
    """Two ``row_index``-ordered streams merged: each index once, with its row in A and B."""
    fa, fb = await anext(a, None), await anext(b, None)
    while fa is not None or fb is not None:
        if fb is None or (fa is not None and fa.row_index < fb.row_index):
            yield fa, None
            fa = await anext(a, None)
        elif fa is None or fb.row_index < fa.row_index:
            yield None, fb
            fb = await anext(b, None)
        else:
            yield fa, fb
            fa, fb = await anext(a, None), await anext(b, None)


@dataclass(slots=True)
class _Scan:
    """What pass 1 found: complete counts and the first ``limit`` rows of each kind."""

    limit: int | None
    counts: Counter[str] = field(default_factory=Counter)
    #: ``(row_index, row_id in A, row_id in B)`` of the rows to analyse.
    different: list[tuple[int, str, str]] = field(default_factory=list)
    source_differs: list[int] = field(default_factory=list)
    only_in_a: list[int] = field(default_factory=list)
    only_in_b: list[int] = field(default_factory=list)

    def add(self, a: _Fingerprint | None, b: _Fingerprint | None) -> None:
        """Count one row index, with its row in A and in B (``None`` where absent)."""
        if b is None:
            assert a is not None
            self._note("only_in_a", self.only_in_a, a.row_index)
        elif a is None:
            self._note("only_in_b", self.only_in_b, b.row_index)
        elif a.source_hash != b.source_hash:
            self._note("source_differs", self.source_differs, a.row_index)
        elif a.ends != b.ends:
            self._note("different", self.different, (a.row_index, a.row_id, b.row_id))
        else:
            self.counts["identical"] += 1
        if a is not None and b is not None:
            self.counts["compared"] += 1

    def _note(self, kind: str, kept: list[Any], item: Any) -> None:
        self.counts[kind] += 1
        if self.limit is None or len(kept) < self.limit:
            kept.append(item)


# -- pass 2: the lines of the differing rows ----------------------------------------------


class _Step(NamedTuple):
    """A token's node state at one step (its last attempt)."""

    state_id: str
    node_id: str
    step: int
    status: str
    input_hash: str | None
    output_hash: str | None
    routes: tuple[str, ...]
    #: The routing events' reasons, the context and the error as recorded (JSON text):
    #: only the states a divergence names are ever parsed.
    reason_texts: tuple[str | None, ...]
    context_json: str | None
    error_json: str | None

    def difference(self, other: _Step) -> str | None:
        """What differs first between this step and ``other`` (``None``: nothing)."""
        if self.node_id != other.node_id:
            return "node"
        if self.routes != other.routes:
            return "route"
        if self.status != other.status:
            return "status"
        if self.output_hash != other.output_hash:
            return "output"
        return None


@dataclass(frozen=True, slots=True)
class _Line:
    """One token of a row in one run, placed by its path."""

    path: str
    #: Paths of the token's parents in the row.
    parents: tuple[str, ...]
    steps: tuple[_Step, ...]
    outcome: str | None
    sink: str | None

    @property
    def final_hash(self) -> str | None:
        if not self.steps:
            return None
        last = self.steps[-1]
        return last.output_hash or last.input_hash

    def end(self) -> TokenEnd | None:
        """The line's end, unless it goes on in the token's children."""
        if self.outcome in _CONTINUING:
            return None
        return TokenEnd(self.path, self.outcome, self.sink, self.final_hash)


class _Token(NamedTuple):
    token_id: str
    branch: str | None
    created_at: float
    parents: tuple[str, ...]
    steps: tuple[_Step, ...]
    outcome: str | None
    sink: str | None


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


async def _select_in(
    conn: AsyncConnection, make: Callable[[Sequence[str]], Select[Any]], values: Sequence[str]
) -> list[Row[Any]]:
    """The rows of ``make(chunk)`` for every chunk of ``values``."""
    found: list[Row[Any]] = []
    for chunk in _chunks(values):
        found.extend(await conn.execute(make(chunk)))
    return found


_STATE_COLUMNS = (
    t.node_states.c.state_id,
    t.node_states.c.token_id,
    t.node_states.c.node_id,
    t.node_states.c.step_index,
    t.node_states.c.attempt,
    t.node_states.c.started_at,
    t.node_states.c.status,
    t.node_states.c.input_hash,
    t.node_states.c.output_hash,
    t.node_states.c.context_json,
    t.node_states.c.error_json,
)


async def _steps_of(conn: AsyncConnection, token_ids: Sequence[str]) -> dict[str, list[_Step]]:
    """Each token's node states in step order, the last attempt of each step."""
    S = t.node_states
    states = await _select_in(
        conn, lambda ids: select(*_STATE_COLUMNS).where(S.c.token_id.in_(ids)), token_ids
    )
    last: dict[tuple[str, int], Row[Any]] = {}
    for state in sorted(states, key=lambda s: (s.attempt, s.started_at)):
        last[state.token_id, state.step_index or 0] = state
    routes = await _routes_of(conn, token_ids)
    steps: dict[str, list[_Step]] = {}
    for (token_id, _), state in sorted(last.items()):
        steps.setdefault(token_id, []).append(_step(state, routes.get(state.state_id, ())))
    return steps


async def _routes_of(conn: AsyncConnection, token_ids: Sequence[str]) -> dict[str, list[Row[Any]]]:
    """The routing events of the tokens' states, by state id, in recording order."""
    S, E = t.node_states, t.routing_events
    events = await _select_in(
        conn,
        lambda ids: (
            select(E.c.state_id, E.c.event_id, E.c.route_label, E.c.reason_json)
            .join(S, S.c.state_id == E.c.state_id)
            .where(S.c.token_id.in_(ids))
        ),
        token_ids,
    )
    routes: dict[str, list[Row[Any]]] = {}
    # A recorder's ids end in an increasing hex counter: shorter means earlier.
    for event in sorted(events, key=lambda e: (len(e.event_id), e.event_id)):
        routes.setdefault(event.state_id, []).append(event)
    return routes


def _step(state: Row[Any], events: Sequence[Row[Any]]) -> _Step:
    return _Step(
        state_id=state.state_id,
        node_id=state.node_id,
        step=state.step_index or 0,
        status=state.status,
        input_hash=state.input_hash,
        output_hash=state.output_hash,
        routes=tuple(e.route_label for e in events),
        reason_texts=tuple(e.reason_json for e in events),
        context_json=state.context_json,
        error_json=state.error_json,
    )


async def _tokens_of(conn: AsyncConnection, row_ids: Sequence[str]) -> dict[str, list[_Token]]:
    """Every token of ``row_ids``, by row id, with its parents, steps and outcome."""
    T, P = t.tokens, t.token_parents
    tokens = await _select_in(conn, lambda ids: select(T).where(T.c.row_id.in_(ids)), row_ids)
    token_ids = [token.token_id for token in tokens]
    links = await _select_in(conn, lambda ids: select(P).where(P.c.token_id.in_(ids)), token_ids)
    parents: dict[str, list[str]] = {}
    for link in sorted(links, key=lambda p: p.ordinal):
        parents.setdefault(link.token_id, []).append(link.parent_token_id)
    steps = await _steps_of(conn, token_ids)
    outcomes = await _outcomes_of(conn, token_ids)
    by_row: dict[str, list[_Token]] = {}
    for token in tokens:
        by_row.setdefault(token.row_id, []).append(
            _Token(
                token.token_id,
                token.branch_name,
                token.created_at,
                tuple(parents.get(token.token_id, ())),
                tuple(steps.get(token.token_id, ())),
                *outcomes.get(token.token_id, (None, None)),
            )
        )
    return by_row


async def _outcomes_of(
    conn: AsyncConnection, token_ids: Sequence[str]
) -> dict[str, tuple[str, str | None]]:
    """Each token's terminal outcome and sink (tokens without one are left out)."""
    TO = t.token_outcomes
    rows = await _select_in(
        conn,
        lambda ids: select(TO.c.token_id, TO.c.outcome, TO.c.sink_name).where(
            TO.c.token_id.in_(ids), TO.c.is_terminal
        ),
        token_ids,
    )
    return {row.token_id: (row.outcome, row.sink_name) for row in rows}


class _Paths:
    """Gives each token of one row its lineage path (see the module docstring)."""

    def __init__(self, tokens: Sequence[_Token]) -> None:
        self._tokens = {token.token_id: token for token in tokens}
        self._paths: dict[str, str] = {}
        self._taken: Counter[str] = Counter()

    def lines(self) -> dict[str, _Line]:
        """The row's lines by path, in creation order (parents before their children)."""
        for token in sorted(self._tokens.values(), key=_creation_order):
            self._path(token.token_id, frozenset())
        return {path: self._line(token_id) for token_id, path in self._paths.items()}

    def _line(self, token_id: str) -> _Line:
        token = self._tokens[token_id]
        parents = tuple(self._paths[p] for p in self._parents(token))
        return _Line(self._paths[token_id], parents, token.steps, token.outcome, token.sink)

    def _parents(self, token: _Token) -> list[str]:
        return [p for p in token.parents if p in self._tokens]

    def _path(self, token_id: str, seen: frozenset[str]) -> str:
        if token_id in self._paths:
            return self._paths[token_id]
        token = self._tokens[token_id]
        parents = [p for p in self._parents(token) if p not in seen]
        above = [self._path(p, seen | {token_id}).split("/") for p in parents]
        name = "/".join([*_common_prefix(above), self._segment(token, parents)]).strip("/")
        self._taken[name] += 1
        if self._taken[name] > 1:
            name = f"{name}#{self._taken[name] - 1}"
        self._paths[token_id] = name
        return name

    def _segment(self, token: _Token, parents: list[str]) -> str:
        """A token's own part of its path: its branch as a fork child, else ``@`` and the
        node that made it (``""`` for a root)."""
        if not parents:
            return ""
        forked = len(parents) == 1 and self._tokens[parents[0]].outcome == Outcome.FORKED.value
        if forked and token.branch is not None:
            return token.branch
        return f"@{token.steps[0].node_id if token.steps else '?'}"


def _creation_order(token: _Token) -> tuple[float, str]:
    # State ids of one recorder session sort in creation order: they break time ties.
    return (token.created_at, token.steps[0].state_id if token.steps else token.token_id)


def _common_prefix(paths: list[list[str]]) -> list[str]:
    """The path parts all ``paths`` share from their start (none for no paths)."""
    prefix: list[str] = []
    for parts in zip(*paths, strict=False):
        if any(part != parts[0] for part in parts):
            break
        prefix.append(parts[0])
    return [part for part in prefix if part]


async def _load_lines(conn: AsyncConnection, row_ids: Sequence[str]) -> dict[str, dict[str, _Line]]:
    """The lines of each row (row id to path to line), parents before children."""
    tokens = await _tokens_of(conn, row_ids)
    return {row_id: _Paths(row).lines() for row_id, row in tokens.items()}


# -- comparing one row -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Split:
    """A divergence before its payloads and answers are read."""

    path: str
    kind: str
    a: _Step | None
    b: _Step | None


@dataclass(frozen=True, slots=True)
class _RowDraft:
    row_index: int
    row_id_a: str
    row_id_b: str
    ends_a: tuple[TokenEnd, ...]
    ends_b: tuple[TokenEnd, ...]
    splits: tuple[_Split, ...]

    def changed_ends(self) -> Iterator[tuple[str, str, str]]:
        """``(path, hash in A, hash in B)`` of lines ending in both runs with other rows."""
        b_ends = {end.path: end for end in self.ends_b}
        for end in self.ends_a:
            other = b_ends.get(end.path)
            if other is None or end.row_hash is None or other.row_hash is None:
                continue
            if end.row_hash != other.row_hash:
                yield end.path, end.row_hash, other.row_hash


def _draft(
    index: int, row_a: str, row_b: str, a: Mapping[str, _Line], b: Mapping[str, _Line]
) -> _RowDraft:
    return _RowDraft(
        row_index=index,
        row_id_a=row_a,
        row_id_b=row_b,
        ends_a=_ends(a),
        ends_b=_ends(b),
        splits=tuple(_splits(a, b)),
    )


def _ends(lines: Mapping[str, _Line]) -> tuple[TokenEnd, ...]:
    ends = (line.end() for line in lines.values())
    return tuple(sorted((e for e in ends if e is not None), key=lambda e: e.path))


def _splits(a: Mapping[str, _Line], b: Mapping[str, _Line]) -> Iterator[_Split]:
    """The first divergence of each line whose parents did not diverge, parents first."""
    diverged: set[str] = set()
    for path in [*a, *(p for p in b if p not in a)]:
        la, lb = a.get(path), b.get(path)
        parents = (la.parents if la else ()) + (lb.parents if lb else ())
        if diverged.intersection(parents):
            diverged.add(path)  # explained by its parent's divergence
            continue
        split = _first_split(path, la, lb)
        if split is not None:
            diverged.add(path)
            yield split


def _first_split(path: str, a: _Line | None, b: _Line | None) -> _Split | None:
    """Where lines ``a`` and ``b`` (the same path in runs A and B) first differ."""
    if a is None or b is None:
        return _only_split(path, a, b)
    for step_a, step_b in zip_longest(a.steps, b.steps):
        if step_a is None or step_b is None:
            return _Split(path, "end", step_a, step_b)
        kind = step_a.difference(step_b)
        if kind is not None:
            return _Split(path, kind, step_a, step_b)
    if (a.outcome, a.sink) != (b.outcome, b.sink):
        return _Split(path, "outcome", _last(a), _last(b))
    return None


def _only_split(path: str, a: _Line | None, b: _Line | None) -> _Split:
    """A token of one run only: the divergence is where it was made."""
    first_a = a.steps[0] if a and a.steps else None
    first_b = b.steps[0] if b and b.steps else None
    return _Split(path, "token", first_a, first_b)


def _last(line: _Line) -> _Step | None:
    return line.steps[-1] if line.steps else None


# -- resolving the drafts ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    status: str
    response_ref: str | None


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the drafts of one chunk refer to: node types, answers and payloads."""

    types_a: Mapping[str, str]
    types_b: Mapping[str, str]
    answers: Mapping[str, _Answer]
    payloads: Mapping[str, Any]

    def payload(self, content_hash: str | None) -> Any:
        return None if content_hash is None else self.payloads.get(content_hash)


async def _answers_of(conn: AsyncConnection, state_ids: Sequence[str]) -> dict[str, _Answer]:
    """The answering call of each state that has one (its last, by index and attempt)."""
    C = t.calls
    calls = await _select_in(
        conn,
        lambda ids: select(
            C.c.state_id, C.c.call_index, C.c.attempt, C.c.status, C.c.response_ref
        ).where(C.c.state_id.in_(ids), C.c.status.in_(_ANSWERED)),
        state_ids,
    )
    return {
        call.state_id: _Answer(call.status, call.response_ref)
        for call in sorted(calls, key=lambda c: (c.call_index, c.attempt))
    }


def _split_states(drafts: Iterable[_RowDraft]) -> list[str]:
    return sorted({step.state_id for d in drafts for s in d.splits for step in (s.a, s.b) if step})


def _wanted_payloads(drafts: Iterable[_RowDraft], answers: Mapping[str, _Answer]) -> set[str]:
    wanted: set[str] = set()
    for draft in drafts:
        for _, hash_a, hash_b in draft.changed_ends():
            wanted.update((hash_a, hash_b))
        for split in draft.splits:
            if split.a and split.b and split.a.output_hash != split.b.output_hash:
                wanted.update(h for h in (split.a.output_hash, split.b.output_hash) if h)
    wanted.update(a.response_ref for a in answers.values() if a.response_ref)
    return wanted


def _resolve(draft: _RowDraft, facts: _Facts) -> RowDiff:
    changes = [
        change
        for path, hash_a, hash_b in draft.changed_ends()
        for change in _field_changes(path, facts.payload(hash_a), facts.payload(hash_b))
    ]
    return RowDiff(
        row_index=draft.row_index,
        row_id_a=draft.row_id_a,
        row_id_b=draft.row_id_b,
        ends_a=draft.ends_a,
        ends_b=draft.ends_b,
        field_changes=tuple(changes),
        divergences=tuple(_divergence(split, facts) for split in draft.splits),
    )


def _divergence(split: _Split, facts: _Facts) -> Divergence:
    a, b = split.a, split.b
    kind = split.kind
    answer_a = facts.answers.get(a.state_id) if a else None
    answer_b = facts.answers.get(b.state_id) if b else None
    if kind in ("output", "status") and (answer_a or answer_b):
        ref_a = answer_a.response_ref if answer_a else None
        ref_b = answer_b.response_ref if answer_b else None
        kind = "answer" if ref_a != ref_b else kind
    changed: tuple[FieldChange, ...] = ()
    if a and b and a.output_hash != b.output_hash:
        out_a, out_b = facts.payload(a.output_hash), facts.payload(b.output_hash)
        changed = _field_changes(split.path, out_a, out_b)
    return Divergence(
        path=split.path,
        kind=kind,
        a=None if a is None else _decision(a, facts.types_a, answer_a, facts),
        b=None if b is None else _decision(b, facts.types_b, answer_b, facts),
        changed_fields=changed,
    )


def _decision(
    step: _Step, types: Mapping[str, str], answer: _Answer | None, facts: _Facts
) -> NodeDecision:
    return NodeDecision(
        node_id=step.node_id,
        node_type=types.get(step.node_id),
        step=step.step,
        status=step.status,
        output_hash=step.output_hash,
        routes=step.routes,
        reason=_reason(step),
        answer=None if answer is None else facts.payload(answer.response_ref),
        answer_status=None if answer is None else answer.status,
        error=_loads(step.error_json),
    )


def _reason(step: _Step) -> Any:
    reasons = [_loads(text) for text in step.reason_texts]
    if len(reasons) == 1:
        return reasons[0]
    if reasons:
        return reasons
    context = _loads(step.context_json)
    if isinstance(context, dict) and "condition" in context:
        return context
    return None


def _same(a: Any, b: Any) -> bool:
    # ``1 == True`` in Python, yet they are different values in a row.
    return type(a) is type(b) and a == b


def _field_changes(path: str, a: Any, b: Any) -> tuple[FieldChange, ...]:
    """The top-level fields that differ between rows ``a`` and ``b`` (none unless both
    are rows)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return ()
    changes = [
        FieldChange(path, name, "changed", value, b[name])
        if name in b
        else FieldChange(path, name, "removed", value, None)
        for name, value in a.items()
        if name not in b or not _same(value, b[name])
    ]
    changes += [FieldChange(path, n, "added", None, v) for n, v in b.items() if n not in a]
    return tuple(changes)


# -- the comparison ---------------------------------------------------------------------


async def _node_types(conn: AsyncConnection, run_id: str) -> dict[str, str]:
    N = t.nodes
    query = select(N.c.node_id, N.c.node_type).where(N.c.run_id == run_id)
    return {str(node_id): str(node_type) for node_id, node_type in await conn.execute(query)}


async def _scan(
    conn_a: AsyncConnection, conn_b: AsyncConnection, run_a: str, run_b: str, limit: int | None
) -> _Scan:
    """Pass 1: both runs' fingerprints, streamed side by side, merged and counted."""
    # Reading the two streams from two threads at once gains nothing: turning rows into
    # Python objects holds the GIL, and that is most of the time.
    scan = _Scan(limit)
    async for a, b in _pairs(_fingerprints(conn_a, run_a), _fingerprints(conn_b, run_b)):
        scan.add(a, b)
    return scan


async def _analyse(
    conn: AsyncConnection, run_a: str, run_b: str, rows: Sequence[tuple[int, str, str]]
) -> list[RowDiff]:
    """Pass 2: the differing ``rows`` compared line by line, a chunk at a time."""
    types_a, types_b = await _node_types(conn, run_a), await _node_types(conn, run_b)
    analysed: list[RowDiff] = []
    for chunk in _chunks(rows):
        lines_a = await _load_lines(conn, [row_a for _, row_a, _ in chunk])
        lines_b = await _load_lines(conn, [row_b for _, _, row_b in chunk])
        drafts = [
            _draft(index, ra, rb, lines_a.get(ra, {}), lines_b.get(rb, {}))
            for index, ra, rb in chunk
        ]
        answers = await _answers_of(conn, _split_states(drafts))
        payloads = await load_payloads(conn, _wanted_payloads(drafts, answers))
        facts = _Facts(types_a, types_b, answers, payloads)
        analysed.extend(_resolve(draft, facts) for draft in drafts)
    return analysed


async def diff_runs(
    landscape: Landscape, run_a: str, run_b: str, *, limit: int | None = None
) -> RunDiff:
    """Compare runs ``run_a`` and ``run_b`` row by row (rows matched by ``row_index``).

    Counts are always complete; the first ``limit`` differing rows (all without a limit)
    are analysed: their ends in each run, the fields of their final rows that differ and
    the first node where each line diverged.  Raises :class:`RunNotFound` when either
    run does not exist.
    """
    engine = landscape.engine
    async with engine.connect() as conn_a, engine.connect() as conn_b:
        info_a, info_b = await _run_info(conn_a, run_a), await _run_info(conn_a, run_b)
        scan = await _scan(conn_a, conn_b, run_a, run_b, limit)
        rows = await _analyse(conn_a, run_a, run_b, scan.different)
    return RunDiff(
        run_a=info_a,
        run_b=info_b,
        counts=DiffCounts(**scan.counts),
        rows=tuple(rows),
        source_differs=tuple(scan.source_differs),
        only_in_a=tuple(scan.only_in_a),
        only_in_b=tuple(scan.only_in_b),
        limit=limit,
    )
