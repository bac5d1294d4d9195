"""Tokens: one instance of a row travelling one path of the graph."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._graph import Arrival

if TYPE_CHECKING:
    from plugins import Row

    from ._forks import ForkInstance

__all__ = ["Token", "derived_token_id", "source_token_id"]


def source_token_id(row_id: str) -> str:
    """The id of a source row's token.

    Token ids are a function of lineage, never of chance: a token that a crashed run
    made (and whose effects may have reached a sink) but never committed gets the
    same id when a resume makes it again, so sinks keyed by token id stay exact.
    """
    return f"{row_id}-t"


def derived_token_id(kind: str, *lineage: str) -> str:
    """The id of a token made from others (``kind``: fork, join, batch), from what it
    is made of (see :func:`source_token_id`)."""
    digest = hashlib.sha256("\x1f".join((kind, *lineage)).encode()).hexdigest()
    return f"t-{kind}-{digest[:32]}"


@dataclass(slots=True)
class Token:
    """A row on its way through the graph.

    A token is owned by exactly one node at a time (it travels by stream), so the node
    holding it updates it in place as it moves on.
    """

    token_id: str
    row_id: str
    row_index: int
    row: Row
    #: Hash of ``row``'s canonical JSON (its payload key); kept in step with ``row``.
    row_hash: str
    branch: str | None = None
    #: ``step_index`` of the token's next node state.
    step: int = 1
    #: ``attempt`` of the token's next node state (above 1 when a resume re-does work).
    attempt: int = 1
    #: How the token reached the node now holding it (decides a sink's outcome).
    arrival: Arrival = Arrival.NORMAL
    #: The error that diverted the token to an error sink, if any.
    error: dict[str, Any] | None = None
    #: The fork whose join this token may still reach (``branch`` is its branch there).
    fork: ForkInstance | None = None
    #: The coalesce branch of the connection the token arrived on, at a coalesce.
    inlet: str | None = None
    #: The node whose work on the token a resume found on record: that node passes it
    #: on as recorded, in its place in the node's release order, without redoing it.
    settled_at: str | None = None
