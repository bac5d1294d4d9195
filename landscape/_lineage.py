"""Explain one source row: everything the Landscape recorded about it, as a token tree.

:func:`explain` reads a row's tokens and every token descended from them (fork branches,
coalesce and aggregation outputs, expansions), with their node states, routing decisions,
external calls, batch memberships and outcomes, in a fixed number of queries whatever
the size of the tree: one per table, each over the whole token set (``IN`` clauses),
plus one per level of descent.

    LandscapeError ─┐
    LookupError ────┴── LineageNotFound   no such run, row or token
                        └── RunNotFound   no such run
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select

from . import _schema as t
from ._errors import LandscapeError
from ._sql import load_payloads, loads_json, recording_order

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

    from sqlalchemy import ColumnElement, Row
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "BatchMembership",
    "CallRecord",
    "Lineage",
    "LineageNotFound",
    "NodeStateRecord",
    "OutcomeRecord",
    "RouteRecord",
    "RunInfo",
    "RunNotFound",
    "SourceRow",
    "TokenLineage",
    "explain",
]


class LineageNotFound(LandscapeError, LookupError):
    """The run, row or token asked about is not in the Landscape."""


class RunNotFound(LineageNotFound):
    """The run asked about is not in the Landscape."""


# -- the lineage record ----------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` with dataclasses turned into dicts and tuples into lists (JSON-ready)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass(frozen=True, slots=True)
class RunInfo:
    run_id: str
    status: str


@dataclass(frozen=True, slots=True)
class SourceRow:
    """The source record a lineage starts from."""

    row_id: str
    row_index: int
    source_node_id: str
    source_data_hash: str
    #: The raw record as stored in ``payloads`` (``None`` if the payload is missing).
    data: Any
    validation_errors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RouteRecord:
    """One route a gate (or fork, or error route) sent a token down."""

    route_label: str
    edge_id: str
    #: Edge endpoints and mode (``move``, ``copy``, ``divert``); ``None`` if the edge is unknown.
    from_node: str | None
    to_node: str | None
    mode: str | None
    reason: Any


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One external call attempt, with its request and response loaded from payloads."""

    call_id: str
    call_index: int
    call_type: str
    provider: str | None
    model: str | None
    status: str
    attempt: int
    http_status: int | None
    request_hash: str | None
    request_ref: str | None
    response_hash: str | None
    response_ref: str | None
    error: Any
    latency_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: float | None
    created_at: float | None
    request: Any
    response: Any


@dataclass(frozen=True, slots=True)
class NodeStateRecord:
    """One visit of a token to a node."""

    state_id: str
    node_id: str
    #: ``None`` when the node is not among the run's recorded nodes.
    node_type: str | None
    step_index: int | None
    attempt: int
    status: str
    input_hash: str | None
    output_hash: str | None
    started_at: float
    completed_at: float | None
    duration_ms: float | None
    error: Any
    context: Any
    #: The row this node produced, loaded from payloads (``None`` without output).
    output: Any
    routes: tuple[RouteRecord, ...]
    calls: tuple[CallRecord, ...]


@dataclass(frozen=True, slots=True)
class BatchMembership:
    """An aggregation batch the token is a member of."""

    batch_id: str
    aggregation_node_id: str
    ordinal: int
    attempt: int
    status: str
    trigger_reason: str | None
    aggregation_state_id: str | None
    external_job_id: str | None


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    outcome: str
    is_terminal: bool
    sink_name: str | None
    batch_id: str | None
    context: Any
    recorded_at: float


@dataclass(frozen=True, slots=True)
class TokenLineage:
    """One token and, nested, the tokens made from it.

    A token with several parents (a coalesce or aggregation output) appears once, under
    its first parent in this lineage; its other parents list it in ``merged_into``.
    """

    token_id: str
    row_id: str
    branch_name: str | None
    parent_ids: tuple[str, ...]
    states: tuple[NodeStateRecord, ...]
    batches: tuple[BatchMembership, ...]
    outcomes: tuple[OutcomeRecord, ...]
    children: tuple[TokenLineage, ...]
    merged_into: tuple[str, ...]

    @property
    def terminal_outcome(self) -> OutcomeRecord | None:
        """The token's terminal outcome (the first, should the trail hold several)."""
        return next((o for o in self.outcomes if o.is_terminal), None)

    def walk(self) -> Iterator[TokenLineage]:
        """This token and every token below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True, slots=True)
class Lineage:
    """Everything recorded about one source row, from its raw record to its sinks."""

    run: RunInfo
    row: SourceRow
    #: The row's tokens that have no parent in this lineage (normally the one source token).
    tokens: tuple[TokenLineage, ...]
    #: The token the lineage was asked for (``explain(token_id=...)``), else ``None``.
    focus_token_id: str | None = None

    def walk(self) -> Iterator[TokenLineage]:
        """Every token of the lineage, depth first, each once."""
        for token in self.tokens:
            yield from token.walk()

    def find(self, token_id: str) -> TokenLineage | None:
        return next((tok for tok in self.walk() if tok.token_id == token_id), None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the whole lineage (``ledgerflow explain --json``)."""
        result: dict[str, Any] = _plain(self)
        return result


# -- querying --------------------------------------------------------------------------


async def _rows(conn: AsyncConnection, query: Any) -> Sequence[Row[Any]]:
    return (await conn.execute(query)).all()


async def _run_info(conn: AsyncConnection, run_id: str) -> RunInfo:
    query = select(t.runs.c.status).where(t.runs.c.run_id == run_id)
    status = (await conn.execute(query)).scalar_one_or_none()
    if status is None:
        raise RunNotFound(f"no run {run_id!r} in the Landscape")
    return RunInfo(run_id=run_id, status=status)


def _row_filter(
    run_id: str, row_index: int | None, row_id: str | None, token_id: str | None
) -> ColumnElement[bool]:
    if row_index is not None:
        return and_(t.rows.c.run_id == run_id, t.rows.c.row_index == row_index)
    if row_id is not None:
        return and_(t.rows.c.run_id == run_id, t.rows.c.row_id == row_id)
    owner = select(t.tokens.c.row_id).where(
        t.tokens.c.run_id == run_id, t.tokens.c.token_id == token_id
    )
    return and_(t.rows.c.run_id == run_id, t.rows.c.row_id.in_(owner.scalar_subquery()))


def _describe(row_index: int | None, row_id: str | None, token_id: str | None) -> str:
    if row_index is not None:
        return f"row index {row_index}"
    return f"row {row_id!r}" if row_id is not None else f"token {token_id!r}"


async def _source_row(
    conn: AsyncConnection, run_id: str, selector: ColumnElement[bool], what: str
) -> Row[Any]:
    row = (await conn.execute(select(t.rows).where(selector))).first()
    if row is None:
        raise LineageNotFound(f"run {run_id!r} has no {what}")
    return row


async def _token_set(conn: AsyncConnection, row_id: str) -> dict[str, Row[Any]]:
    """The row's tokens and all their descendants, by token id."""
    found = {
        r.token_id: r
        for r in await _rows(conn, select(t.tokens).where(t.tokens.c.row_id == row_id))
    }
    frontier = set(found)
    while frontier:
        children = (
            select(t.tokens)
            .join(t.token_parents, t.token_parents.c.token_id == t.tokens.c.token_id)
            .where(t.token_parents.c.parent_token_id.in_(sorted(frontier)))
        )
        new = {r.token_id: r for r in await _rows(conn, children) if r.token_id not in found}
        found.update(new)
        frontier = set(new)
    return found


def _group(rows: Iterable[Row[Any]], key: str) -> dict[str, list[Row[Any]]]:
    grouped: dict[str, list[Row[Any]]] = {}
    for row in rows:
        grouped.setdefault(getattr(row, key), []).append(row)
    return grouped


@dataclass(frozen=True, slots=True)
class _Records:
    """Everything fetched for a token set, grouped for assembly."""

    tokens: Mapping[str, Row[Any]]
    parents: Mapping[str, list[Row[Any]]]
    states: Mapping[str, list[Row[Any]]]
    routes: Mapping[str, list[Row[Any]]]
    calls: Mapping[str, list[Row[Any]]]
    batches: Mapping[str, list[Row[Any]]]
    outcomes: Mapping[str, list[Row[Any]]]
    payloads: Mapping[str, Any]


async def _fetch_states(conn: AsyncConnection, run_id: str, token_ids: list[str]) -> list[Row[Any]]:
    node = t.nodes
    query = (
        select(t.node_states, node.c.node_type)
        .outerjoin(
            node,
            and_(
                node.c.run_id == t.node_states.c.run_id, node.c.node_id == t.node_states.c.node_id
            ),
        )
        .where(t.node_states.c.token_id.in_(token_ids))
    )
    return list(await _rows(conn, query))


async def _fetch_routes(conn: AsyncConnection, state_ids: list[str]) -> list[Row[Any]]:
    ev, edge = t.routing_events, t.edges
    query = (
        select(ev, edge.c.from_node_id, edge.c.to_node_id, edge.c.mode)
        .outerjoin(edge, and_(edge.c.run_id == ev.c.run_id, edge.c.edge_id == ev.c.edge_id))
        .where(ev.c.state_id.in_(state_ids))
    )
    return sorted(await _rows(conn, query), key=recording_order)


async def _fetch_batches(conn: AsyncConnection, token_ids: list[str]) -> list[Row[Any]]:
    bm, b = t.batch_members, t.batches
    query = (
        select(b, bm.c.token_id, bm.c.ordinal)
        .join(bm, bm.c.batch_id == b.c.batch_id)
        .where(bm.c.token_id.in_(token_ids))
    )
    return list(await _rows(conn, query))


async def _fetch_records(
    conn: AsyncConnection, run_id: str, tokens: dict[str, Row[Any]], source_hash: str
) -> _Records:
    ids = sorted(tokens)
    parents = await _rows(conn, select(t.token_parents).where(t.token_parents.c.token_id.in_(ids)))
    states = await _fetch_states(conn, run_id, ids)
    state_ids = [s.state_id for s in states]
    routes = await _fetch_routes(conn, state_ids) if state_ids else []
    calls = (
        await _rows(conn, select(t.calls).where(t.calls.c.state_id.in_(state_ids)))
        if state_ids
        else []
    )
    outcomes = await _rows(
        conn, select(t.token_outcomes).where(t.token_outcomes.c.token_id.in_(ids))
    )
    hashes = {source_hash, *(s.output_hash for s in states if s.output_hash)}
    hashes.update(h for c in calls for h in (c.request_ref, c.response_ref) if h)
    return _Records(
        tokens=tokens,
        parents=_group(sorted(parents, key=lambda p: p.ordinal), "token_id"),
        states=_group(states, "token_id"),
        routes=_group(routes, "state_id"),
        calls=_group(sorted(calls, key=lambda c: (c.call_index, c.attempt)), "state_id"),
        batches=_group(await _fetch_batches(conn, ids), "token_id"),
        outcomes=_group(sorted(outcomes, key=lambda o: o.recorded_at), "token_id"),
        payloads=await load_payloads(conn, hashes),
    )


# -- assembling ------------------------------------------------------------------------


def _route(row: Row[Any]) -> RouteRecord:
    return RouteRecord(
        route_label=row.route_label,
        edge_id=row.edge_id,
        from_node=row.from_node_id,
        to_node=row.to_node_id,
        mode=row.mode,
        reason=loads_json(row.reason_json),
    )


def _call(row: Row[Any], payloads: Mapping[str, Any]) -> CallRecord:
    m = row._mapping
    columns = {name: m[name] for name in CallRecord.__dataclass_fields__ if name in m}
    columns.pop("error", None)
    return CallRecord(
        **columns,
        error=loads_json(m["error_json"]),
        request=payloads.get(m["request_ref"]) if m["request_ref"] else None,
        response=payloads.get(m["response_ref"]) if m["response_ref"] else None,
    )


def _state(row: Row[Any], records: _Records) -> NodeStateRecord:
    return NodeStateRecord(
        state_id=row.state_id,
        node_id=row.node_id,
        node_type=row.node_type,
        step_index=row.step_index,
        attempt=row.attempt,
        status=row.status,
        input_hash=row.input_hash,
        output_hash=row.output_hash,
        started_at=row.started_at,
        completed_at=row.completed_at,
        duration_ms=row.duration_ms,
        error=loads_json(row.error_json),
        context=loads_json(row.context_json),
        output=records.payloads.get(row.output_hash) if row.output_hash else None,
        routes=tuple(_route(r) for r in records.routes.get(row.state_id, ())),
        calls=tuple(_call(c, records.payloads) for c in records.calls.get(row.state_id, ())),
    )


def _state_order(row: Row[Any]) -> tuple[bool, int, float, int]:
    return (row.step_index is None, row.step_index or 0, row.started_at, row.attempt)


def _batch(row: Row[Any]) -> BatchMembership:
    return BatchMembership(
        batch_id=row.batch_id,
        aggregation_node_id=row.aggregation_node_id,
        ordinal=row.ordinal,
        attempt=row.attempt,
        status=row.status,
        trigger_reason=row.trigger_reason,
        aggregation_state_id=row.aggregation_state_id,
        external_job_id=row.external_job_id,
    )


def _outcome(row: Row[Any]) -> OutcomeRecord:
    return OutcomeRecord(
        outcome=row.outcome,
        is_terminal=bool(row.is_terminal),
        sink_name=row.sink_name,
        batch_id=row.batch_id,
        context=loads_json(row.context_json),
        recorded_at=row.recorded_at,
    )


class _TreeBuilder:
    """Places each token of the set once, under its first parent inside the set."""

    def __init__(self, records: _Records) -> None:
        self._records = records
        self._owner: dict[str, str] = {}
        self._children: dict[str, list[str]] = {}
        for token_id in sorted(records.tokens, key=self._creation_order):
            inside = [p.parent_token_id for p in records.parents.get(token_id, ())]
            inside = [p for p in inside if p in records.tokens]
            if inside:
                self._owner[token_id] = inside[0]
            for parent in inside:
                self._children.setdefault(parent, []).append(token_id)

    def _creation_order(self, token_id: str) -> tuple[float, str]:
        return (self._records.tokens[token_id].created_at, token_id)

    def roots(self) -> tuple[TokenLineage, ...]:
        ids = sorted(self._records.tokens, key=self._creation_order)
        return tuple(self._build(tid, set()) for tid in ids if tid not in self._owner)

    def _build(self, token_id: str, path: set[str]) -> TokenLineage:
        records, row = self._records, self._records.tokens[token_id]
        below = [c for c in self._children.get(token_id, ()) if c not in path]
        owned = [c for c in below if self._owner.get(c) == token_id]
        states = sorted(records.states.get(token_id, ()), key=_state_order)
        return TokenLineage(
            token_id=token_id,
            row_id=row.row_id,
            branch_name=row.branch_name,
            parent_ids=tuple(p.parent_token_id for p in records.parents.get(token_id, ())),
            states=tuple(_state(s, records) for s in states),
            batches=tuple(_batch(b) for b in records.batches.get(token_id, ())),
            outcomes=tuple(_outcome(o) for o in records.outcomes.get(token_id, ())),
            children=tuple(self._build(c, path | {token_id}) for c in owned),
            merged_into=tuple(c for c in below if self._owner.get(c) != token_id),
        )


async def _validation_errors(conn: AsyncConnection, run_id: str, row_index: int) -> tuple[str, ...]:
    ve = t.validation_errors
    query = (
        select(ve.c.error)
        .where(ve.c.run_id == run_id, ve.c.row_index == row_index)
        .order_by(ve.c.error_id)
    )
    return tuple((await conn.execute(query)).scalars())


async def explain(
    conn: AsyncConnection,
    run_id: str,
    *,
    row_index: int | None = None,
    row_id: str | None = None,
    token_id: str | None = None,
) -> Lineage:
    """The lineage of one source row of ``run_id``, chosen by exactly one selector.

    With ``token_id`` the lineage is that of the token's row (the token is its
    ``focus_token_id``).  Raises :class:`ValueError` unless exactly one selector is
    given, and :class:`LineageNotFound` when the run, row or token does not exist.
    """
    if sum(s is not None for s in (row_index, row_id, token_id)) != 1:
        raise ValueError("explain needs exactly one of row_index, row_id or token_id")
    run = await _run_info(conn, run_id)
    what = _describe(row_index, row_id, token_id)
    row = await _source_row(conn, run_id, _row_filter(run_id, row_index, row_id, token_id), what)
    tokens = await _token_set(conn, row.row_id)
    records = await _fetch_records(conn, run_id, tokens, row.source_data_ref)
    source = SourceRow(
        row_id=row.row_id,
        row_index=row.row_index,
        source_node_id=row.source_node_id,
        source_data_hash=row.source_data_hash,
        data=records.payloads.get(row.source_data_ref),
        validation_errors=await _validation_errors(conn, run_id, row.row_index),
    )
    return Lineage(
        run=run, row=source, tokens=_TreeBuilder(records).roots(), focus_token_id=token_id
    )
