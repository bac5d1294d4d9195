"""What a resume needs to know about an unfinished run, read in one pass.

:func:`load_unfinished` reads the run's latest checkpoint and, above its watermark,
every token without a terminal outcome together with the node states, routing events
and parents that say where it stopped; the batches left open; where each sink stood
after its last recorded write; and the successful calls whose node state never
completed (their answers can be reused instead of paid for again).  Only rows above the
watermark are read, so the cost follows what was in flight, not the run's length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, select

from . import _schema as t
from ._outcomes import BatchStatus, NodeStateStatus
from ._sql import chunks, loads_json

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "OpenBatch",
    "OrphanState",
    "PendingToken",
    "RecordedRoute",
    "RecordedState",
    "UnfinishedRun",
    "load_unfinished",
]


@dataclass(frozen=True, slots=True)
class RecordedRoute:
    """A routing event of a node state: the edge taken and why."""

    edge_id: str
    label: str
    reason: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class RecordedState:
    """One recorded visit of a token to a node."""

    state_id: str
    node_id: str
    status: str
    step: int
    attempt: int
    started_at: float
    input_hash: str | None
    output_hash: str | None
    context: dict[str, Any] | None
    error: dict[str, Any] | None
    routes: tuple[RecordedRoute, ...] = ()


@dataclass(slots=True)
class PendingToken:
    """A token of the run without a terminal outcome."""

    token_id: str
    row_id: str
    row_index: int
    branch: str | None
    parents: list[str] = field(default_factory=list)
    #: Its node states, in step order (attempts of one step in attempt order).
    states: list[RecordedState] = field(default_factory=list)
    #: Its non-terminal outcomes (``buffered``).
    outcomes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class OpenBatch:
    """A batch that is neither ``completed`` nor ``failed``."""

    batch_id: str
    node_id: str
    attempt: int
    status: str
    group_key: str | None
    trigger_reason: str | None
    aggregation_state_id: str | None
    #: The provider's job a ``pending`` batch waits for.
    external_job_id: str | None = None
    members: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class OrphanState:
    """A node state whose calls are on record but which itself is not: the process died
    while the state's work (an LLM call and its retries) was under way."""

    state_id: str
    token_id: str
    node_id: str
    #: When its first call was recorded.
    started_at: float


@dataclass(slots=True)
class UnfinishedRun:
    """Everything a resume reads from the Landscape about one run."""

    run_id: str
    status: str
    config_hash: str | None
    #: node id -> config hash, as recorded in ``nodes``.
    node_config_hashes: dict[str, str | None]
    watermark: int
    checkpoint_state: dict[str, Any] | None
    #: Highest row index recorded (-1: none).
    max_row_index: int
    #: ``(row_index, source_data_hash)`` of the rows recorded after the checkpoint's reads.
    rows_after_checkpoint: list[tuple[int, str]]
    #: Terminal outcome counts so far.
    outcomes: dict[str, int]
    pending: list[PendingToken]
    #: Parent tokens' states, for pending tokens that have parents.
    parent_states: dict[str, list[RecordedState]]
    open_batches: list[OpenBatch]
    #: sink node id -> (last write's sequence number, position after it).
    sink_positions: dict[str, tuple[int, Any]]
    #: request hash -> response payload hash, of successful calls made for node states
    #: that never completed.
    reusable_calls: dict[str, str]
    #: The run this one replays (its answers answer this one's calls), if any.
    replayed_from: str | None = None
    #: States a crash left with calls but no record of their own (a resume records
    #: them ``cancelled``).
    orphan_states: list[OrphanState] = field(default_factory=list)

    @property
    def open_states(self) -> list[RecordedState]:
        """Node states a crash left ``open`` (a resume closes them ``cancelled``); each
        belongs to a token that never got further, so to a pending one."""
        return [
            state
            for token in self.pending
            for state in token.states
            if state.status == NodeStateStatus.OPEN.value
        ]


async def load_unfinished(conn: AsyncConnection, run_id: str) -> UnfinishedRun | None:
    """Read what resuming ``run_id`` needs (``None`` if there is no such run)."""
    run = (await conn.execute(select(t.runs).where(t.runs.c.run_id == run_id))).first()
    if run is None:
        return None
    nodes = await conn.execute(
        select(t.nodes.c.node_id, t.nodes.c.config_hash).where(t.nodes.c.run_id == run_id)
    )
    checkpoint = (
        await conn.execute(
            select(t.checkpoints.c.watermark_row_index, t.checkpoints.c.state_json)
            .where(t.checkpoints.c.run_id == run_id)
            .order_by(t.checkpoints.c.created_at.desc(), t.checkpoints.c.watermark_row_index.desc())
            .limit(1)
        )
    ).first()
    watermark = -1 if checkpoint is None else int(checkpoint.watermark_row_index)
    state = None if checkpoint is None else loads_json(checkpoint.state_json)
    rows_read = 0 if state is None else int(state.get("rows_read", 0))
    R = t.rows
    max_row = (
        await conn.execute(select(func.max(R.c.row_index)).where(R.c.run_id == run_id))
    ).scalar()
    rows_after = [
        (int(index), str(data_hash))
        for index, data_hash in await conn.execute(
            select(R.c.row_index, R.c.source_data_hash)
            .where(R.c.run_id == run_id, R.c.row_index >= rows_read)
            .order_by(R.c.row_index)
        )
    ]
    out = t.token_outcomes
    outcomes = {
        str(o): int(n)
        for o, n in await conn.execute(
            select(out.c.outcome, func.count())
            .where(out.c.run_id == run_id, out.c.is_terminal)
            .group_by(out.c.outcome)
        )
    }
    pending = await _pending_tokens(conn, run_id, watermark)
    parent_ids = sorted({p for token in pending for p in token.parents})
    parent_states = await _states_of(conn, parent_ids)
    return UnfinishedRun(
        run_id=run_id,
        status=str(run.status),
        config_hash=run.config_hash,
        node_config_hashes={str(n): h for n, h in nodes},
        watermark=watermark,
        checkpoint_state=state,
        max_row_index=-1 if max_row is None else int(max_row),
        rows_after_checkpoint=rows_after,
        outcomes=outcomes,
        pending=pending,
        parent_states=parent_states,
        open_batches=await _open_batches(conn, run_id),
        sink_positions=await _sink_positions(conn, run_id),
        reusable_calls=await _reusable_calls(conn, run_id),
        replayed_from=run.replayed_from,
        orphan_states=await _orphan_states(conn, run_id),
    )


async def _pending_tokens(conn: AsyncConnection, run_id: str, watermark: int) -> list[PendingToken]:
    R, T, out = t.rows, t.tokens, t.token_outcomes
    terminal = (
        select(out.c.token_id)
        .where(out.c.token_id == T.c.token_id, out.c.is_terminal)
        .correlate(T)
        .exists()
    )
    query = (
        select(T.c.token_id, T.c.row_id, R.c.row_index, T.c.branch_name)
        .join(R, R.c.row_id == T.c.row_id)
        .where(R.c.run_id == run_id, R.c.row_index > watermark, ~terminal)
        .order_by(R.c.row_index, T.c.created_at, T.c.token_id)
    )
    tokens = {
        str(token_id): PendingToken(str(token_id), str(row_id), int(index), branch)
        for token_id, row_id, index, branch in await conn.execute(query)
    }
    ids = list(tokens)
    P = t.token_parents
    for chunk in chunks(ids):
        for token_id, parent_id in await conn.execute(
            select(P.c.token_id, P.c.parent_token_id)
            .where(P.c.token_id.in_(chunk))
            .order_by(P.c.token_id, P.c.ordinal)
        ):
            tokens[token_id].parents.append(str(parent_id))
        for token_id, outcome in await conn.execute(
            select(out.c.token_id, out.c.outcome).where(
                out.c.token_id.in_(chunk), ~out.c.is_terminal
            )
        ):
            tokens[token_id].outcomes.append(str(outcome))
    for token_id, states in (await _states_of(conn, ids)).items():
        tokens[token_id].states = states
    return list(tokens.values())


async def _states_of(
    conn: AsyncConnection, token_ids: Sequence[str]
) -> dict[str, list[RecordedState]]:
    """The node states of ``token_ids`` with their routing events, in step order."""
    S, E = t.node_states, t.routing_events
    states: dict[str, list[RecordedState]] = {}
    for chunk in chunks(token_ids):
        rows = list(
            await conn.execute(
                select(S)
                .where(S.c.token_id.in_(chunk))
                .order_by(S.c.token_id, S.c.step_index, S.c.attempt, S.c.started_at)
            )
        )
        routes: dict[str, list[RecordedRoute]] = {}
        state_ids = [row.state_id for row in rows]
        for ids in chunks(state_ids):
            for state_id, edge_id, label, reason in await conn.execute(
                select(E.c.state_id, E.c.edge_id, E.c.route_label, E.c.reason_json).where(
                    E.c.state_id.in_(ids)
                )
            ):
                routes.setdefault(state_id, []).append(
                    RecordedRoute(str(edge_id), str(label), loads_json(reason))
                )
        for row in rows:
            states.setdefault(row.token_id, []).append(
                RecordedState(
                    state_id=row.state_id,
                    node_id=row.node_id,
                    status=row.status,
                    step=int(row.step_index or 0),
                    attempt=int(row.attempt),
                    started_at=float(row.started_at),
                    input_hash=row.input_hash,
                    output_hash=row.output_hash,
                    context=loads_json(row.context_json),
                    error=loads_json(row.error_json),
                    routes=tuple(routes.get(row.state_id, ())),
                )
            )
    return states


async def _open_batches(conn: AsyncConnection, run_id: str) -> list[OpenBatch]:
    B, M = t.batches, t.batch_members
    done = (BatchStatus.COMPLETED.value, BatchStatus.FAILED.value)
    batches = {
        row.batch_id: OpenBatch(
            batch_id=row.batch_id,
            node_id=row.aggregation_node_id,
            attempt=int(row.attempt),
            status=row.status,
            group_key=row.group_key,
            trigger_reason=row.trigger_reason,
            aggregation_state_id=row.aggregation_state_id,
            external_job_id=row.external_job_id,
        )
        for row in await conn.execute(
            select(B).where(B.c.run_id == run_id, B.c.status.not_in(done)).order_by(B.c.batch_id)
        )
    }
    for chunk in chunks(list(batches)):
        for batch_id, token_id in await conn.execute(
            select(M.c.batch_id, M.c.token_id)
            .where(M.c.batch_id.in_(chunk))
            .order_by(M.c.batch_id, M.c.ordinal)
        ):
            batches[batch_id].members.append(str(token_id))
    return list(batches.values())


async def _sink_positions(conn: AsyncConnection, run_id: str) -> dict[str, tuple[int, Any]]:
    SP = t.sink_positions
    latest = (
        select(SP.c.sink_node_id, func.max(SP.c.write_seq).label("seq"))
        .where(SP.c.run_id == run_id)
        .group_by(SP.c.sink_node_id)
        .subquery()
    )
    query = select(SP.c.sink_node_id, SP.c.write_seq, SP.c.position_json).join(
        latest,
        and_(
            SP.c.sink_node_id == latest.c.sink_node_id,
            SP.c.write_seq == latest.c.seq,
            SP.c.run_id == run_id,
        ),
    )
    return {
        str(node): (int(seq), loads_json(position))
        for node, seq, position in await conn.execute(query)
    }


async def _orphan_states(conn: AsyncConnection, run_id: str) -> list[OrphanState]:
    C, S = t.calls, t.node_states
    recorded = select(S.c.state_id).where(S.c.state_id == C.c.state_id).correlate(C).exists()
    query = (
        select(C.c.state_id, C.c.token_id, C.c.node_id, func.min(C.c.created_at))
        .where(C.c.run_id == run_id, C.c.token_id.is_not(None), ~recorded)
        .group_by(C.c.state_id, C.c.token_id, C.c.node_id)
        .order_by(C.c.state_id)
    )
    return [
        OrphanState(str(state), str(token), str(node), float(started or 0.0))
        for state, token, node, started in await conn.execute(query)
    ]


async def _reusable_calls(conn: AsyncConnection, run_id: str) -> dict[str, str]:
    C, S = t.calls, t.node_states
    completed = (
        select(S.c.state_id)
        .where(S.c.state_id == C.c.state_id, S.c.status == NodeStateStatus.COMPLETED.value)
        .correlate(C)
        .exists()
    )
    query = select(C.c.request_hash, C.c.response_ref).where(
        C.c.run_id == run_id,
        C.c.status == "success",
        C.c.request_hash.is_not(None),
        C.c.response_ref.is_not(None),
        ~completed,
    )
    return {str(request): str(response) for request, response in await conn.execute(query)}
