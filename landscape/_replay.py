"""The answers a run received, for replaying it: what a later run is answered from."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from . import _schema as t
from ._outcomes import ANSWERED_CALL_STATUSES

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["load_answers"]


async def load_answers(conn: AsyncConnection, run_id: str) -> dict[str, tuple[str, Any]] | None:
    """Request hash -> (answer hash, answer) of what run ``run_id`` received for that
    request (``None`` if there is no such run).

    When one request was answered more than once (an unusable answer asked for again),
    the last answer is the one kept: it is the one the run went on with.
    """
    exists = await conn.execute(select(t.runs.c.run_id).where(t.runs.c.run_id == run_id))
    if exists.first() is None:
        return None
    C, P = t.calls, t.payloads
    query = (
        select(C.c.request_hash, C.c.response_ref, P.c.content)
        .join(P, P.c.hash == C.c.response_ref)
        .where(
            C.c.run_id == run_id,
            C.c.status.in_(ANSWERED_CALL_STATUSES),
            C.c.request_hash.is_not(None),
        )
        .order_by(C.c.created_at, C.c.call_index)
    )
    return {
        str(request): (str(response), json.loads(content))
        for request, response, content in await conn.execute(query)
    }
