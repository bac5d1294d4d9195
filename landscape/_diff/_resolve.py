"""Pass 2 of a comparison, explaining: drafts turned into :class:`RowDiff` results.

What a chunk of drafts refers to is read at once: the answering external calls of the
diverging node states, and payloads only for final rows that differ, for the outputs of
diverging node states and for those calls' answers.  Each split then becomes a
:class:`Divergence` with both nodes' decisions (routes, reason, answer, error) and the
fields their outputs differ in; an output that differs because an external call
answered differently is a divergence of kind ``answer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from .. import _schema as t
from .._outcomes import ANSWERED_CALL_STATUSES
from .._sql import load_payloads, loads_json, select_in
from ._result import Divergence, FieldChange, NodeDecision, RowDiff

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from ._compare import RowDraft, Split
    from ._lines import Step

__all__ = ["Facts", "load_facts", "node_types", "resolve"]


@dataclass(frozen=True, slots=True)
class _Answer:
    status: str
    response_ref: str | None


@dataclass(frozen=True, slots=True)
class Facts:
    """What the drafts of one chunk refer to: node types, answers and payloads."""

    types_a: Mapping[str, str]
    types_b: Mapping[str, str]
    answers: Mapping[str, _Answer]
    payloads: Mapping[str, Any]

    def payload(self, content_hash: str | None) -> Any:
        return None if content_hash is None else self.payloads.get(content_hash)


async def node_types(conn: AsyncConnection, run_id: str) -> dict[str, str]:
    """The type of each of the run's recorded nodes, by node id."""
    N = t.nodes
    query = select(N.c.node_id, N.c.node_type).where(N.c.run_id == run_id)
    return {str(node_id): str(node_type) for node_id, node_type in await conn.execute(query)}


async def load_facts(
    conn: AsyncConnection,
    drafts: Sequence[RowDraft],
    types_a: Mapping[str, str],
    types_b: Mapping[str, str],
) -> Facts:
    """The answers and payloads ``drafts`` refer to, with the two runs' node types."""
    answers = await _answers_of(conn, _split_states(drafts))
    payloads = await load_payloads(conn, _wanted_payloads(drafts, answers))
    return Facts(types_a, types_b, answers, payloads)


def resolve(draft: RowDraft, facts: Facts) -> RowDiff:
    """The result for one draft, its divergences and field changes filled in."""
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


# -- reading the facts -----------------------------------------------------------------


async def _answers_of(conn: AsyncConnection, state_ids: Sequence[str]) -> dict[str, _Answer]:
    """The answering call of each state that has one (its last, by index and attempt)."""
    C = t.calls
    calls = await select_in(
        conn,
        lambda ids: select(
            C.c.state_id, C.c.call_index, C.c.attempt, C.c.status, C.c.response_ref
        ).where(C.c.state_id.in_(ids), C.c.status.in_(ANSWERED_CALL_STATUSES)),
        state_ids,
    )
    return {
        call.state_id: _Answer(call.status, call.response_ref)
        for call in sorted(calls, key=lambda c: (c.call_index, c.attempt))
    }


def _split_states(drafts: Iterable[RowDraft]) -> list[str]:
    return sorted({step.state_id for d in drafts for s in d.splits for step in (s.a, s.b) if step})


def _wanted_payloads(drafts: Iterable[RowDraft], answers: Mapping[str, _Answer]) -> set[str]:
    wanted: set[str] = set()
    for draft in drafts:
        for _, hash_a, hash_b in draft.changed_ends():
            wanted.update((hash_a, hash_b))
        for split in draft.splits:
            if split.a and split.b and split.a.output_hash != split.b.output_hash:
                wanted.update(h for h in (split.a.output_hash, split.b.output_hash) if h)
    wanted.update(a.response_ref for a in answers.values() if a.response_ref)
    return wanted


# -- building the results --------------------------------------------------------------


def _divergence(split: Split, facts: Facts) -> Divergence:
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
    step: Step, types: Mapping[str, str], answer: _Answer | None, facts: Facts
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
        error=loads_json(step.error_json),
    )


def _reason(step: Step) -> Any:
    reasons = [loads_json(text) for text in step.reason_texts]
    if len(reasons) == 1:
        return reasons[0]
    if reasons:
        return reasons
    context = loads_json(step.context_json)
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
