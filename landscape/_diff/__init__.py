"""Compare two runs of the same source row by row (``ledgerflow diff RUN_A RUN_B``).

Rows are matched by ``row_index``.  The comparison takes two passes, so that its cost
follows the rows that differ rather than the rows there are:

1. ``_fingerprints``: every row of both runs reduced to how its lines ended, streamed
   and counted; rows that ended the same way are identical and read no further.
2. For the differing rows (the first ``limit`` of them), a chunk at a time:
   ``_lines`` reads their tokens and places them by lineage path, ``_compare`` finds
   where each matched pair of lines first splits, and ``_resolve`` reads the answers
   and payloads those splits name and builds the results of ``_result``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lineage import _run_info
from .._sql import chunks
from ._compare import draft
from ._fingerprints import scan_runs
from ._lines import load_lines
from ._resolve import load_facts, node_types, resolve
from ._result import DiffCounts, Divergence, FieldChange, NodeDecision, RowDiff, RunDiff, TokenEnd

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.ext.asyncio import AsyncConnection

    from .._store import Landscape

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
        scan = await scan_runs(conn_a, conn_b, run_a, run_b, limit)
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


async def _analyse(
    conn: AsyncConnection, run_a: str, run_b: str, rows: Sequence[tuple[int, str, str]]
) -> list[RowDiff]:
    """Pass 2: the differing ``rows`` compared line by line, a chunk at a time."""
    types_a, types_b = await node_types(conn, run_a), await node_types(conn, run_b)
    analysed: list[RowDiff] = []
    for chunk in chunks(rows):
        # Row ids are unique across runs: both runs' rows load in one go.
        lines = await load_lines(conn, [row for _, ra, rb in chunk for row in (ra, rb)])
        drafts = [
            draft(index, ra, rb, lines.get(ra, {}), lines.get(rb, {})) for index, ra, rb in chunk
        ]
        facts = await load_facts(conn, drafts, types_a, types_b)
        analysed.extend(resolve(d, facts) for d in drafts)
    return analysed
