"""Pass 1 of a comparison: every row reduced to a fingerprint, counted and sorted out.

One query per run, streamed in ``row_index`` order, reduces each row to its source data
hash and the multiset of its tokens' ``(branch, terminal outcome, sink, final row
hash)``; the two streams are merged like sorted lists.  A token's final row is the output
of its last node state, or that state's input when it made none (a failure, a filter's
discard, a batch member).  Rows with equal fingerprints are identical and nothing more is
read about them: a row counts as identical when every line of it ends the same way with
the same row, whatever happened on the way (an LLM answering in other words that parse
to the same fields, a gate value that picks the same route).  Rows whose source data
differs are counted and listed, not analysed: their differences say nothing about the
pipeline.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import and_, func, select

from .. import _schema as t

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy import Select
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["Scan", "scan_runs"]

#: Rows fetched at a time from a fingerprint stream.
_PARTITION = 5_000


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
        # A state without a step counts as the latest, as explain orders them.
        .order_by(S.c.step_index.desc().nulls_first(), S.c.attempt.desc(), S.c.started_at.desc())
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
class Scan:
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


async def scan_runs(
    conn_a: AsyncConnection, conn_b: AsyncConnection, run_a: str, run_b: str, limit: int | None
) -> Scan:
    """Both runs' fingerprints, streamed side by side (``run_a`` on ``conn_a``, ``run_b``
    on ``conn_b``), merged and counted; the first ``limit`` rows of each kind kept."""
    # Reading the two streams from two threads at once gains nothing: turning rows into
    # Python objects holds the GIL, and that is most of the time.
    scan = Scan(limit)
    async for a, b in _pairs(_fingerprints(conn_a, run_a), _fingerprints(conn_b, run_b)):
        scan.add(a, b)
    return scan
