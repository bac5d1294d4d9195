"""Check a run's audit trail against its invariants (``docs/audit.md`` lists them).

Every check is one set-based query that returns only the offending records: a scan
of one table with ``NOT EXISTS`` probes on indexed keys, or a correlated count per
token.  Payload hashes are random, so on SQLite they are sorted before they are probed
(sorted probes hit cached index pages).  Verifying a run of a million tokens and three
million node states takes under twenty seconds on SQLite on a small machine, never
one round trip per token.  Each check reports at most ``limit`` violations, then how
many more it found.

For a ``completed`` run the per-token invariants (1 to 6) cover every token.  For an
``interrupted``, ``running`` or ``failed`` run they cover the tokens of rows at or below
the latest checkpoint's watermark (none without a checkpoint), as invariant 7 says;
the sink count (8) is checked for completed runs only.  Referential integrity (every
id and payload hash a record names exists) is checked for every run in full.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, false, func, not_, or_, select, text, true

from . import _schema as t
from ._integrity import PAYLOAD_REFS, PayloadRef, altered_payloads, altered_sink_files
from ._lineage import RunNotFound
from ._outcomes import ANSWERED_CALL_STATUSES, PARENT_OUTCOMES, NodeStateStatus, Outcome, RunStatus

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, RowMapping, Select, Table
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["Invariant", "RunNotFound", "VerifyReport", "Violation", "verify"]


class Invariant(StrEnum):
    """What a violation breaks (numbers refer to the audit invariants of ``docs/audit.md``)."""

    TERMINAL_OUTCOME = "1-terminal-outcome"
    NODE_STATE = "2-node-state"
    BATCH = "3-batch"
    TOKEN_PARENTS = "4-token-parents"
    COALESCE_FAILURE = "5-coalesce-failure"
    CALL = "6-call"
    SINK_COUNT = "8-sink-count"
    SINK_FILE = "8-sink-file"
    WRITE_FAILURE = "9-write-failure"
    REFERENCE = "referential-integrity"
    PAYLOAD_CONTENT = "payload-content"


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant, with where it was found (token and row when known)."""

    invariant: str
    message: str
    token_id: str | None = None
    row_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of :func:`verify`: ``ok`` exactly when ``violations`` is empty."""

    run_id: str
    ok: bool
    violations: list[Violation]
    #: Tokens the per-token invariants covered (all of a completed run's, else those
    #: at or below the watermark).
    checked_tokens: int
    #: The latest checkpoint's watermark row index (``None`` without a checkpoint).
    watermark: int | None
    #: Payloads hashed again (``verify --deep``; ``None`` when not asked for).
    payloads_checked: int | None = None
    #: Tokens in scope that ended ``diverted`` (a sink could not write them).
    diverted: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the report."""
        return {
            "run_id": self.run_id,
            "ok": self.ok,
            "violations": [v.to_dict() for v in self.violations],
            "checked_tokens": self.checked_tokens,
            "watermark": self.watermark,
            "payloads_checked": self.payloads_checked,
            "diverted": self.diverted,
        }


_STATE_STATUSES = tuple(s.value for s in NodeStateStatus if s is not NodeStateStatus.OPEN)
_BATCH_FINAL = ("completed", "failed")
_CALL_STATUSES = ("success", "error", "reused", "replayed")
_SINK_OUTCOMES = (
    Outcome.COMPLETED.value,
    Outcome.ROUTED.value,
    Outcome.QUARANTINED.value,
    Outcome.DIVERTED.value,
)
#: Outcomes that may name no sink: an invalid record with no quarantine sink, a row
#: its sink could not write and discarded; either stays in the Landscape.
_SINKLESS_OUTCOMES = (Outcome.QUARANTINED.value, Outcome.DIVERTED.value)
_JOB_ID_KEYS = ("job_id", "external_job_id")
_COALESCE_KEYS = ("coalesce", "policy", "missing_branches")

T, R, TO, NS, TP = t.tokens, t.rows, t.token_outcomes, t.node_states, t.token_parents

Describe = Callable[["RowMapping"], str]


@dataclass(frozen=True, slots=True)
class _Scope:
    """Which tokens the per-token invariants cover."""

    run_id: str
    status: str
    watermark: int | None

    @property
    def complete(self) -> bool:
        return self.status == RunStatus.COMPLETED.value

    def rows(self, row_index: ColumnElement[int]) -> ColumnElement[bool]:
        """True for the row indexes in scope."""
        if self.complete:
            return true()
        if self.watermark is None:
            return false()
        return row_index <= self.watermark

    def tokens(self) -> Any:
        """The run's tokens joined to their rows (the FROM clause of per-token checks)."""
        return T.join(R, R.c.row_id == T.c.row_id)

    def token_filter(self) -> ColumnElement[bool]:
        return and_(T.c.run_id == self.run_id, self.rows(R.c.row_index))


def _exists(column: ColumnElement[Any], *criteria: ColumnElement[bool]) -> ColumnElement[bool]:
    """``EXISTS (SELECT column ... WHERE criteria)``: selecting an indexed key column lets
    SQLite answer from the index alone (``SELECT *`` would read every matching row)."""
    return select(column).where(*criteria).exists()


class _Collector:
    """Runs checks and keeps at most ``limit`` violations of each."""

    def __init__(self, conn: AsyncConnection, limit: int) -> None:
        self.conn = conn
        self.limit = limit
        self.violations: list[Violation] = []

    async def query(self, invariant: Invariant, query: Select[Any], describe: Describe) -> None:
        """Report one violation per row ``query`` returns (its ``token_id``/``row_index``)."""
        rows = (await self.conn.execute(query.limit(self.limit + 1))).mappings().all()
        for row in rows[: self.limit]:
            self.add(invariant, describe(row), row.get("token_id"), row.get("row_index"))
        if len(rows) > self.limit:
            counted = select(func.count()).select_from(query.subquery())
            total = (await self.conn.execute(counted)).scalar_one()
            self.add(invariant, f"... and {total - self.limit} more like these")

    def add(
        self,
        invariant: Invariant,
        message: str,
        token_id: str | None = None,
        row_index: int | None = None,
    ) -> None:
        self.violations.append(Violation(invariant.value, message, token_id, row_index))

    def add_capped(self, invariant: Invariant, found: Sequence[Violation]) -> None:
        """Add violations found in Python, capped like :meth:`query`'s."""
        self.violations.extend(found[: self.limit])
        if len(found) > self.limit:
            self.add(invariant, f"... and {len(found) - self.limit} more like these")


# -- 1. exactly one terminal outcome ---------------------------------------------------


#: Spelled bare so that SQLite probes the partial unique index ``WHERE is_terminal``.
_IS_TERMINAL = text("token_outcomes.is_terminal")


async def _check_terminal_outcomes(c: _Collector, scope: _Scope) -> None:
    terminal = (
        select(func.count())
        .select_from(TO)
        .where(TO.c.token_id == T.c.token_id, _IS_TERMINAL)
        .correlate(T)
        .scalar_subquery()
    )
    if scope.complete:
        wrong = terminal != 1
    else:
        wrong = or_(terminal > 1, and_(terminal == 0, scope.rows(R.c.row_index)))
    query = (
        select(T.c.token_id, R.c.row_index, terminal.label("terminal"))
        .select_from(T.outerjoin(R, R.c.row_id == T.c.row_id))
        .where(T.c.run_id == scope.run_id, wrong)
    )
    await c.query(Invariant.TERMINAL_OUTCOME, query, _describe_terminal)
    await c.query(Invariant.TERMINAL_OUTCOME, _bad_outcome_values(scope.run_id), _describe_outcome)


def _describe_terminal(row: RowMapping) -> str:
    if row["terminal"] == 0:
        return "token has no terminal outcome"
    return f"token has {row['terminal']} terminal outcomes (exactly one allowed)"


def _bad_outcome_values(run_id: str) -> Select[Any]:
    buffered = TO.c.outcome == Outcome.BUFFERED.value
    bad = or_(
        TO.c.outcome.not_in([o.value for o in Outcome]),
        and_(buffered, TO.c.is_terminal.is_(True)),
        and_(not_(buffered), TO.c.is_terminal.is_(False)),
    )
    return select(TO.c.token_id, TO.c.outcome, TO.c.is_terminal).where(TO.c.run_id == run_id, bad)


def _describe_outcome(row: RowMapping) -> str:
    return f"outcome {row['outcome']!r} recorded with is_terminal={bool(row['is_terminal'])}"


# -- 2. node states closed with a known status -----------------------------------------


async def _check_node_states(c: _Collector, scope: _Scope) -> None:
    in_scope = NS.join(T, T.c.token_id == NS.c.token_id).join(R, R.c.row_id == T.c.row_id)
    base = select(NS.c.state_id, NS.c.token_id, NS.c.node_id, NS.c.status, R.c.row_index)
    base = base.select_from(in_scope).where(NS.c.run_id == scope.run_id, scope.rows(R.c.row_index))
    await c.query(
        Invariant.NODE_STATE, base.where(NS.c.status.not_in(_STATE_STATUSES)), _describe_status
    )
    has_job = _exists(
        t.batches.c.batch_id,
        t.batches.c.aggregation_state_id == NS.c.state_id,
        t.batches.c.external_job_id.is_not(None),
    )
    pending = base.add_columns(
        NS.c.context_json, NS.c.external_job_id, has_job.label("batch_job")
    ).where(NS.c.status == NodeStateStatus.PENDING.value)
    rows = (await c.conn.execute(pending)).mappings().all()
    found = [
        Violation(
            Invariant.NODE_STATE.value,
            f"node_state {row['state_id']} at {row['node_id']!r} is pending without a job id",
            row["token_id"],
            row["row_index"],
        )
        for row in rows
        if not (row["batch_job"] or row["external_job_id"] or _has_job_id(row["context_json"]))
    ]
    c.add_capped(Invariant.NODE_STATE, found)


def _describe_status(row: RowMapping) -> str:
    where = f"node_state {row['state_id']} at {row['node_id']!r}"
    if row["status"] == NodeStateStatus.OPEN.value:
        return f"{where} was left open"
    return f"{where} has unknown status {row['status']!r}"


def _has_job_id(context_json: str | None) -> bool:
    context = _json_object(context_json)
    return any(context.get(key) for key in _JOB_ID_KEYS)


def _json_object(text: str | None) -> dict[str, Any]:
    """``text`` parsed as a JSON object; ``{}`` when it is absent or not an object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- 3. batches closed and linked to their flush ---------------------------------------


def _batch_scope(scope: _Scope) -> ColumnElement[bool]:
    if scope.complete or scope.watermark is None:
        return true() if scope.complete else false()
    bm = t.batch_members
    beyond = _exists(
        bm.c.batch_id,
        bm.c.batch_id == t.batches.c.batch_id,
        T.c.token_id == bm.c.token_id,
        R.c.row_id == T.c.row_id,
        R.c.row_index > scope.watermark,
    )
    return not_(beyond)


async def _check_batches(c: _Collector, scope: _Scope) -> None:
    b = t.batches
    state_exists = _exists(NS.c.state_id, NS.c.state_id == b.c.aggregation_state_id)
    settled = or_(
        b.c.status.in_(_BATCH_FINAL),
        and_(b.c.status == "pending", b.c.external_job_id.is_not(None)),
    )
    query = (
        select(b.c.batch_id, b.c.aggregation_node_id, b.c.status, b.c.aggregation_state_id)
        .add_columns(case((state_exists, True), else_=False).label("state_exists"))
        .where(b.c.run_id == scope.run_id, _batch_scope(scope))
        .where(or_(not_(settled), b.c.aggregation_state_id.is_(None), not_(state_exists)))
    )
    await c.query(Invariant.BATCH, query, _describe_batch)


def _describe_batch(row: RowMapping) -> str:
    problems = []
    status = row["status"]
    if status not in _BATCH_FINAL:
        problems.append(f"status {status!r} (must end completed or failed)")
    if row["aggregation_state_id"] is None:
        problems.append("no aggregation_state_id")
    elif not row["state_exists"]:
        problems.append(f"aggregation_state_id {row['aggregation_state_id']} names no node_state")
    return f"batch {row['batch_id']} of {row['aggregation_node_id']!r}: " + "; ".join(problems)


# -- 4. parents of every derived token -------------------------------------------------


def _row_index_of(token_id: ColumnElement[str]) -> ColumnElement[int]:
    """The row index of ``token_id``'s row, as a correlated scalar subquery."""
    owner = select(R.c.row_index).select_from(T.join(R, R.c.row_id == T.c.row_id))
    return owner.where(T.c.token_id == token_id).scalar_subquery()


def _outcomes_in_scope(scope: _Scope, *outcomes: str) -> Select[Any]:
    """Outcomes ``outcomes`` of the run's tokens in scope, driven by the outcomes table."""
    row_index = _row_index_of(TO.c.token_id)
    query = select(TO.c.token_id, TO.c.outcome, TO.c.batch_id, row_index.label("row_index"))
    query = query.where(TO.c.run_id == scope.run_id, TO.c.outcome.in_(outcomes))
    return query if scope.complete else query.where(scope.rows(row_index))


async def _check_token_parents(c: _Collector, scope: _Scope) -> None:
    bm = t.batch_members
    has_child = _exists(TP.c.parent_token_id, TP.c.parent_token_id == TO.c.token_id)
    childless = _outcomes_in_scope(scope, *PARENT_OUTCOMES).where(not_(has_child))
    await c.query(Invariant.TOKEN_PARENTS, childless, _describe_childless)
    in_batch = _exists(
        bm.c.batch_id, bm.c.batch_id == TO.c.batch_id, bm.c.token_id == TO.c.token_id
    )
    consumed = _outcomes_in_scope(scope, Outcome.CONSUMED_IN_BATCH.value).where(not_(in_batch))
    await c.query(Invariant.TOKEN_PARENTS, consumed, _describe_unbatched)
    has_parent = _exists(TP.c.token_id, TP.c.token_id == T.c.token_id)
    branch = select(T.c.token_id, R.c.row_index, T.c.branch_name).select_from(scope.tokens())
    branch = branch.where(scope.token_filter(), T.c.branch_name.is_not(None), not_(has_parent))
    await c.query(Invariant.TOKEN_PARENTS, branch, _describe_orphan_branch)
    await c.query(Invariant.TOKEN_PARENTS, _root_counts(scope), _describe_roots)


def _describe_unbatched(row: RowMapping) -> str:
    if row["batch_id"] is None:
        return "consumed_in_batch but the outcome names no batch"
    return f"consumed_in_batch but not a member of batch {row['batch_id']}"


def _describe_childless(row: RowMapping) -> str:
    return f"token is {row['outcome']} but no token names it as parent"


def _describe_orphan_branch(row: RowMapping) -> str:
    return f"token of branch {row['branch_name']!r} has no parent recorded"


def _root_counts(scope: _Scope) -> Select[Any]:
    """Rows whose number of parentless tokens is not exactly one."""
    parentless = (
        select(func.count())
        .select_from(T)
        .where(
            T.c.row_id == R.c.row_id, not_(_exists(TP.c.token_id, TP.c.token_id == T.c.token_id))
        )
        .correlate(R)
        .scalar_subquery()
    )
    counted = (
        select(R.c.row_id, R.c.row_index, parentless.label("roots"))
        .where(R.c.run_id == scope.run_id, scope.rows(R.c.row_index))
        .subquery()
    )
    return select(counted).where(counted.c.roots != 1)


def _describe_roots(row: RowMapping) -> str:
    if row["roots"] == 0:
        return f"row {row['row_id']} has no source token"
    return (
        f"row {row['row_id']} has {row['roots']} tokens without parents: derived tokens "
        "(branch, coalesce, aggregation or expansion outputs) must record their parents"
    )


# -- 5. failed coalesces say what was missing ------------------------------------------


async def _check_coalesce_failures(c: _Collector, scope: _Scope) -> None:
    n = t.nodes
    names = select(n.c.node_id).where(n.c.run_id == scope.run_id, n.c.node_type == "coalesce")
    coalesce_nodes = set((await c.conn.execute(names)).scalars())
    if not coalesce_nodes:
        return
    failed_there = _exists(
        NS.c.state_id,
        NS.c.token_id == TO.c.token_id,
        NS.c.status == NodeStateStatus.FAILED.value,
        NS.c.node_id.in_(sorted(coalesce_nodes)),
    )
    query = (
        select(TO.c.token_id, R.c.row_index, TO.c.context_json, failed_there.label("at_coalesce"))
        .select_from(scope.tokens().join(TO, TO.c.token_id == T.c.token_id))
        .where(scope.token_filter(), TO.c.outcome == Outcome.FAILED.value)
    )
    rows = (await c.conn.execute(query)).mappings().all()
    found = [v for row in rows if (v := _coalesce_violation(row, coalesce_nodes)) is not None]
    c.add_capped(Invariant.COALESCE_FAILURE, found)


def _coalesce_violation(row: RowMapping, coalesce_nodes: set[str]) -> Violation | None:
    context = _json_object(row["context_json"])
    named = {context.get("node"), context.get("coalesce")} & coalesce_nodes
    if not (row["at_coalesce"] or named):
        return None
    missing = [key for key in _COALESCE_KEYS if key not in context]
    if not missing and isinstance(context["missing_branches"], list):
        return None
    detail = ", ".join(missing) if missing else "missing_branches is not a list"
    message = f"failed coalesce outcome lacks {detail} in its context"
    return Violation(Invariant.COALESCE_FAILURE.value, message, row["token_id"], row["row_index"])


# -- 9. a diverted row's failed write is on record ---------------------------------------


async def _check_write_failures(c: _Collector, scope: _Scope) -> int:
    """Check invariant 9; returns how many tokens in scope ended ``diverted``."""
    n = t.nodes
    sinks = select(n.c.node_id).where(n.c.run_id == scope.run_id, n.c.node_type == "sink")
    failed_write = _exists(
        NS.c.state_id,
        NS.c.token_id == TO.c.token_id,
        NS.c.status == NodeStateStatus.FAILED.value,
        NS.c.error_json.is_not(None),
        NS.c.node_id.in_(sinks.scalar_subquery()),
    )
    query = (
        select(TO.c.token_id, R.c.row_index)
        .select_from(scope.tokens().join(TO, TO.c.token_id == T.c.token_id))
        .where(scope.token_filter(), TO.c.outcome == Outcome.DIVERTED.value, not_(failed_write))
    )
    await c.query(Invariant.WRITE_FAILURE, query, _describe_unexplained_diversion)
    count = (
        select(func.count())
        .select_from(scope.tokens().join(TO, TO.c.token_id == T.c.token_id))
        .where(scope.token_filter(), TO.c.outcome == Outcome.DIVERTED.value)
    )
    return int((await c.conn.execute(count)).scalar_one())


def _describe_unexplained_diversion(row: RowMapping) -> str:
    return "diverted outcome without a failed sink write recording its error"


# -- 6. external calls fully recorded --------------------------------------------------


async def _check_calls(c: _Collector, scope: _Scope) -> None:
    cl = t.calls
    incomplete = or_(
        cl.c.request_hash.is_(None),
        cl.c.latency_ms.is_(None),
        cl.c.attempt.is_(None),
        cl.c.status.not_in(_CALL_STATUSES),
        and_(cl.c.status.in_(ANSWERED_CALL_STATUSES), cl.c.response_hash.is_(None)),
    )
    query = (
        select(cl, T.c.token_id, R.c.row_index)
        .select_from(
            cl.join(NS, NS.c.state_id == cl.c.state_id)
            .join(T, T.c.token_id == NS.c.token_id)
            .join(R, R.c.row_id == T.c.row_id)
        )
        .where(cl.c.run_id == scope.run_id, scope.rows(R.c.row_index), incomplete)
    )
    await c.query(Invariant.CALL, query, _describe_call)


def _describe_call(row: RowMapping) -> str:
    problems = [name for name in ("request_hash", "latency_ms", "attempt") if row[name] is None]
    if row["status"] not in _CALL_STATUSES:
        problems.append(f"unknown status {row['status']!r}")
    elif row["status"] in ANSWERED_CALL_STATUSES and row["response_hash"] is None:
        problems.append("response_hash")
    return f"call {row['call_id']} of node_state {row['state_id']} lacks " + ", ".join(problems)


# -- 8. sinks hold every token that reached them ---------------------------------------


async def _check_sinks(c: _Collector, run_id: str) -> None:
    n, a = t.nodes, t.artifacts
    names = select(n.c.node_id).where(n.c.run_id == run_id, n.c.node_type == "sink")
    sinks = set((await c.conn.execute(names)).scalars())
    landed = (
        select(TO.c.sink_name, func.count())
        .where(TO.c.run_id == run_id, TO.c.is_terminal.is_(True), TO.c.outcome.in_(_SINK_OUTCOMES))
        .where(or_(TO.c.sink_name.is_not(None), TO.c.outcome.not_in(_SINKLESS_OUTCOMES)))
        .group_by(TO.c.sink_name)
    )
    tokens: dict[str | None, int] = dict((await c.conn.execute(landed)).all())
    # A resumed run records an artifact per session, each counting the whole sink: the
    # latest one says what the sink holds.
    written_q = (
        select(a.c.sink_node_id, a.c.rows_written)
        .where(a.c.run_id == run_id)
        .order_by(a.c.created_at, a.c.artifact_id)
    )
    written = {name: total or 0 for name, total in (await c.conn.execute(written_q)).all()}
    found = [_sink_violation(name, tokens, written, sinks) for name in _sink_names(tokens, written)]
    c.add_capped(Invariant.SINK_COUNT, [v for v in found if v is not None])


def _sink_names(tokens: dict[str | None, int], written: dict[str, int]) -> list[str | None]:
    names = set(tokens) | set(written)
    return sorted(names, key=lambda name: (name is not None, name or ""))


def _sink_violation(
    name: str | None, tokens: dict[str | None, int], written: dict[str, int], sinks: set[str]
) -> Violation | None:
    landed = tokens.get(name, 0)
    if name is None:
        message = f"{landed} completed/routed outcomes name no sink"
        return Violation(Invariant.SINK_COUNT.value, message)
    if name not in sinks:
        message = f"{landed} outcomes and artifacts name {name!r}, which is not a sink of the run"
        return Violation(Invariant.SINK_COUNT.value, message)
    if name not in written:
        # A sink whose plugin reports no artifact (a custom in-memory sink, say) has no
        # row count to compare against.
        return None
    if landed != written[name]:
        message = (
            f"sink {name!r}: {landed} tokens landed there but its artifacts record "
            f"{written[name]} rows written"
        )
        return Violation(Invariant.SINK_COUNT.value, message)
    return None


# -- referential integrity -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ref:
    """``column`` of a table names a ``key`` of ``target`` (within the run if ``same_run``)."""

    column: str
    target: Table
    key: str
    same_run: bool = False


_N = t.nodes
_REFERENCES: tuple[tuple[Table, tuple[_Ref, ...]], ...] = (
    (t.tokens, (_Ref("row_id", t.rows, "row_id"),)),
    (t.rows, (_Ref("source_node_id", _N, "node_id", True),)),
    (t.token_parents, (_Ref("token_id", T, "token_id"), _Ref("parent_token_id", T, "token_id"))),
    (
        t.node_states,
        (
            _Ref("token_id", T, "token_id"),
            _Ref("node_id", _N, "node_id", True),
        ),
    ),
    (
        t.routing_events,
        (_Ref("state_id", NS, "state_id"), _Ref("edge_id", t.edges, "edge_id", True)),
    ),
    (t.calls, (_Ref("state_id", NS, "state_id"),)),
    (t.batches, (_Ref("aggregation_node_id", _N, "node_id", True),)),
    (
        t.batch_members,
        (_Ref("batch_id", t.batches, "batch_id"), _Ref("token_id", T, "token_id")),
    ),
    (TO, (_Ref("token_id", T, "token_id"), _Ref("batch_id", t.batches, "batch_id"))),
    (
        t.edges,
        (_Ref("from_node_id", _N, "node_id", True), _Ref("to_node_id", _N, "node_id", True)),
    ),
    (t.artifacts, (_Ref("sink_node_id", _N, "node_id", True),)),
)


def _dangling(source: Table, ref: _Ref) -> ColumnElement[bool]:
    """True when ``source``'s ``ref.column`` is set but names nothing."""
    column = source.c[ref.column]
    match = [ref.target.c[ref.key] == column]
    if ref.same_run:
        match.append(ref.target.c.run_id == source.c.run_id)
    return and_(column.is_not(None), not_(_exists(ref.target.c[ref.key], *match)))


def _reference_query(source: Table, refs: tuple[_Ref, ...], run_id: str) -> Select[Any]:
    flags = [
        case((_dangling(source, ref), 1), else_=0).label(f"_dangling_{ref.column}") for ref in refs
    ]
    return (
        select(source, *flags)
        .where(source.c.run_id == run_id)
        .where(or_(*(_dangling(source, ref) for ref in refs)))
    )


async def _check_references(c: _Collector, run_id: str) -> None:
    for source, refs in _REFERENCES:
        query = _reference_query(source, refs, run_id)
        rows = (await c.conn.execute(query.limit(c.limit + 1))).mappings().all()
        found = [
            Violation(
                Invariant.REFERENCE.value,
                _describe_reference(source, ref, row),
                row.get("token_id"),
            )
            for row in rows
            for ref in refs
            if row[f"_dangling_{ref.column}"]
        ]
        c.add_capped(Invariant.REFERENCE, found)
        if len(rows) > c.limit:
            c.add(Invariant.REFERENCE, f"... and more dangling references in {source.name}")


def _record_name(table: Table, row: RowMapping) -> str:
    key = ", ".join(f"{col.name}={row[col.name]}" for col in table.primary_key.columns)
    return f"{table.name} ({key})"


def _describe_reference(source: Table, ref: _Ref, row: RowMapping) -> str:
    what = _record_name(source, row)
    return f"{what}: {ref.column} {row[ref.column]!r} not found in {ref.target.name}"


def _missing_payloads(ref: PayloadRef, run_id: str, *, sort: bool) -> Select[Any]:
    """The distinct hashes in ``ref`` that name no payload.

    Hashes are random, so probing the payload index in table order misses the cache on
    every probe; with ``sort`` (for SQLite) they are probed in order instead, which
    costs a sort and makes the probes several times cheaper on large runs.
    """
    column = ref.table.c[ref.column]
    hashes = select(column.label("hash")).where(ref.table.c.run_id == run_id, column.is_not(None))
    if ref.skip is not None:
        hashes = hashes.where(not_(ref.skip()))
    if sort:
        hashes = hashes.order_by(column)
    sub = hashes.subquery()
    # GROUP BY (not DISTINCT, not LIMIT) keeps SQLite from flattening the sorted subquery.
    found = _exists(t.payloads.c.hash, t.payloads.c.hash == sub.c.hash)
    return select(sub.c.hash).where(not_(found)).group_by(sub.c.hash)


async def _check_payloads(c: _Collector, run_id: str) -> None:
    sort = c.conn.dialect.name == "sqlite"
    for ref in PAYLOAD_REFS:
        query = _missing_payloads(ref, run_id, sort=sort).limit(c.limit + 1)
        missing = list((await c.conn.execute(query)).scalars())
        if missing:
            await _report_missing_payloads(c, ref, run_id, missing)


async def _report_missing_payloads(
    c: _Collector, ref: PayloadRef, run_id: str, missing: list[str]
) -> None:
    """One violation per record of ``ref.table`` that names one of the ``missing`` hashes."""
    table, column = ref.table, ref.table.c[ref.column]
    query = select(table).where(table.c.run_id == run_id, column.in_(missing[: c.limit]))
    rows = (await c.conn.execute(query.limit(c.limit + 1))).mappings().all()
    found = [
        Violation(
            Invariant.REFERENCE.value,
            f"{_record_name(table, row)}: {ref.column} {row[ref.column]!r} not found in payloads",
            row.get("token_id"),
        )
        for row in rows
    ]
    c.add_capped(Invariant.REFERENCE, found)
    if len(missing) > c.limit:
        c.add(Invariant.REFERENCE, f"... and more missing payloads in {table.name}.{ref.column}")


# -- the report ------------------------------------------------------------------------


async def _scope(conn: AsyncConnection, run_id: str) -> _Scope:
    status = (await conn.execute(select(t.runs.c.status).where(t.runs.c.run_id == run_id))).scalar()
    if status is None:
        raise RunNotFound(f"no run {run_id!r} in the Landscape")
    cp = t.checkpoints
    latest = (
        select(cp.c.watermark_row_index)
        .where(cp.c.run_id == run_id)
        .order_by(cp.c.created_at.desc(), cp.c.watermark_row_index.desc())
        .limit(1)
    )
    watermark = (await conn.execute(latest)).scalar()
    return _Scope(run_id, str(status), watermark)


async def _checked_tokens(conn: AsyncConnection, scope: _Scope) -> int:
    query = select(func.count()).select_from(scope.tokens()).where(scope.token_filter())
    return int((await conn.execute(query)).scalar_one())


async def verify(
    conn: AsyncConnection, run_id: str, *, limit: int = 100, deep: bool = False
) -> VerifyReport:
    """Check the audit invariants for ``run_id`` and report every violation found.

    The file of each file sink is compared with the run's record of it (size and
    SHA-256) once the run is no longer executing; with ``deep`` every payload the run
    names is hashed again too.  Each check reports at most ``limit`` violations, then
    one line counting the rest.  Raises :class:`RunNotFound` when the run does not exist.
    """
    scope = await _scope(conn, run_id)
    c = _Collector(conn, limit)
    await _check_terminal_outcomes(c, scope)
    await _check_node_states(c, scope)
    await _check_batches(c, scope)
    await _check_token_parents(c, scope)
    await _check_coalesce_failures(c, scope)
    await _check_calls(c, scope)
    diverted = await _check_write_failures(c, scope)
    if scope.complete:
        await _check_sinks(c, run_id)
    if scope.status != RunStatus.RUNNING.value:  # its files are as it left them
        altered = await altered_sink_files(conn, run_id)
        c.add_capped(
            Invariant.SINK_FILE, [Violation(Invariant.SINK_FILE.value, m) for m in altered]
        )
    await _check_references(c, run_id)
    await _check_payloads(c, run_id)
    payloads_checked = None
    if deep:
        audit = await altered_payloads(conn, run_id, c.limit)
        payloads_checked = audit.checked
        for message in audit.problems:
            c.add(Invariant.PAYLOAD_CONTENT, message)
        if audit.altered > len(audit.problems):
            more = audit.altered - len(audit.problems)
            c.add(Invariant.PAYLOAD_CONTENT, f"... and {more} more altered payloads")
    return VerifyReport(
        run_id=run_id,
        ok=not c.violations,
        violations=c.violations,
        checked_tokens=await _checked_tokens(conn, scope),
        watermark=scope.watermark,
        payloads_checked=payloads_checked,
        diverted=diverted,
    )
