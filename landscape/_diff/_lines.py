"""Pass 2 of a comparison, reading: the lines of the differing rows, placed by path.

For the rows pass 1 found different, a chunk at a time, the tokens, node states (the
last attempt of each step), routing events and terminal outcomes are read and each token
becomes a :class:`Line`.  Payloads and external calls are not read here.

*Paths.*  Token ids embed run-specific row ids, so tokens are matched across runs by
*path*.  A row's source token has the path ``""``; a fork child adds its branch
(``"sentiment"``, ``"outer/inner"``); any other derived token (a coalesce's join, an
aggregation's output) hangs under the deepest token its parents in the row share and
adds ``@`` and the node that made it (``"@join"``, ``"sentiment/@stats"``); siblings of
the same name are numbered in creation order (``"@stats#1"``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import select

from .. import _schema as t
from .._outcomes import PARENT_OUTCOMES, Outcome
from .._sql import recording_order, select_in
from ._result import TokenEnd

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy import Row
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["Line", "Step", "load_lines"]


class Step(NamedTuple):
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

    def difference(self, other: Step) -> str | None:
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
class Line:
    """One token of a row in one run, placed by its path."""

    path: str
    #: Paths of the token's parents in the row.
    parents: tuple[str, ...]
    steps: tuple[Step, ...]
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
        if self.outcome in PARENT_OUTCOMES:
            return None
        return TokenEnd(self.path, self.outcome, self.sink, self.final_hash)


async def load_lines(conn: AsyncConnection, row_ids: Sequence[str]) -> dict[str, dict[str, Line]]:
    """The lines of each row (row id to path to line), parents before children; rows
    without tokens are left out."""
    tokens = await _tokens_of(conn, row_ids)
    return {row_id: _Paths(row).lines() for row_id, row in tokens.items()}


# -- reading ---------------------------------------------------------------------------


class _Token(NamedTuple):
    token_id: str
    branch: str | None
    created_at: float
    parents: tuple[str, ...]
    steps: tuple[Step, ...]
    outcome: str | None
    sink: str | None


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


async def _tokens_of(conn: AsyncConnection, row_ids: Sequence[str]) -> dict[str, list[_Token]]:
    """Every token of ``row_ids``, by row id, with its parents, steps and outcome."""
    T, P = t.tokens, t.token_parents
    tokens = await select_in(conn, lambda ids: select(T).where(T.c.row_id.in_(ids)), row_ids)
    token_ids = [token.token_id for token in tokens]
    links = await select_in(conn, lambda ids: select(P).where(P.c.token_id.in_(ids)), token_ids)
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


async def _steps_of(conn: AsyncConnection, token_ids: Sequence[str]) -> dict[str, list[Step]]:
    """Each token's node states in step order, the last attempt of each step."""
    S = t.node_states
    states = await select_in(
        conn, lambda ids: select(*_STATE_COLUMNS).where(S.c.token_id.in_(ids)), token_ids
    )
    # Keyed by (token, step); a state without a step sorts last, as explain orders them.
    last: dict[tuple[str, tuple[bool, int]], Row[Any]] = {}
    for state in sorted(states, key=lambda s: (s.attempt, s.started_at)):
        last[state.token_id, (state.step_index is None, state.step_index or 0)] = state
    routes = await _routes_of(conn, [state.state_id for state in last.values()])
    steps: dict[str, list[Step]] = {}
    for (token_id, _), state in sorted(last.items()):
        steps.setdefault(token_id, []).append(_step(state, routes.get(state.state_id, ())))
    return steps


async def _routes_of(conn: AsyncConnection, state_ids: Sequence[str]) -> dict[str, list[Row[Any]]]:
    """The routing events of the states ``state_ids``, by state id, in recording order."""
    E = t.routing_events
    events = await select_in(
        conn,
        lambda ids: select(E.c.state_id, E.c.event_id, E.c.route_label, E.c.reason_json).where(
            E.c.state_id.in_(ids)
        ),
        state_ids,
    )
    routes: dict[str, list[Row[Any]]] = {}
    for event in sorted(events, key=recording_order):
        routes.setdefault(event.state_id, []).append(event)
    return routes


def _step(state: Row[Any], events: Sequence[Row[Any]]) -> Step:
    return Step(
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


async def _outcomes_of(
    conn: AsyncConnection, token_ids: Sequence[str]
) -> dict[str, tuple[str, str | None]]:
    """Each token's terminal outcome and sink (tokens without one are left out)."""
    TO = t.token_outcomes
    rows = await select_in(
        conn,
        lambda ids: select(TO.c.token_id, TO.c.outcome, TO.c.sink_name).where(
            TO.c.token_id.in_(ids), TO.c.is_terminal
        ),
        token_ids,
    )
    return {row.token_id: (row.outcome, row.sink_name) for row in rows}


# -- naming paths ----------------------------------------------------------------------


class _Paths:
    """Gives each token of one row its lineage path (see the module docstring)."""

    def __init__(self, tokens: Sequence[_Token]) -> None:
        self._tokens = {token.token_id: token for token in tokens}
        self._paths: dict[str, str] = {}
        self._taken: Counter[str] = Counter()

    def lines(self) -> dict[str, Line]:
        """The row's lines by path, in creation order (parents before their children)."""
        for token in sorted(self._tokens.values(), key=_creation_order):
            self._path(token.token_id, frozenset())
        return {path: self._line(token_id) for token_id, path in self._paths.items()}

    def _line(self, token_id: str) -> Line:
        token = self._tokens[token_id]
        parents = tuple(self._paths[p] for p in self._parents(token))
        return Line(self._paths[token_id], parents, token.steps, token.outcome, token.sink)

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
