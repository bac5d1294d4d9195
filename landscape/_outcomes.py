"""The outcome vocabulary of the audit trail."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ANSWERED_CALL_STATUSES",
    "PARENT_OUTCOMES",
    "TERMINAL_OUTCOMES",
    "BatchStatus",
    "NodeStateStatus",
    "Outcome",
    "RunStatus",
]


class Outcome(StrEnum):
    """What finally happened to a token (``buffered`` is the one non-terminal value)."""

    COMPLETED = "completed"
    ROUTED = "routed"
    FORKED = "forked"
    COALESCED = "coalesced"
    CONSUMED_IN_BATCH = "consumed_in_batch"
    EXPANDED = "expanded"
    QUARANTINED = "quarantined"
    DIVERTED = "diverted"
    FAILED = "failed"
    DISCARDED = "discarded"
    BUFFERED = "buffered"

    @property
    def is_terminal(self) -> bool:
        return self is not Outcome.BUFFERED


TERMINAL_OUTCOMES = frozenset(o for o in Outcome if o.is_terminal)
#: Outcomes that hand a token's row on to tokens made from it (its line goes on there).
PARENT_OUTCOMES = frozenset(o.value for o in (Outcome.FORKED, Outcome.COALESCED, Outcome.EXPANDED))
#: Call statuses that carry an answer: made now, reused within the run, or replayed.
ANSWERED_CALL_STATUSES = ("success", "reused", "replayed")


class NodeStateStatus(StrEnum):
    """Status of one token's visit to one node."""

    OPEN = "open"
    COMPLETED = "completed"
    FAILED = "failed"
    PENDING = "pending"
    CANCELLED = "cancelled"


class RunStatus(StrEnum):
    """Status of a run.  ``crashed`` is never stored: it is what a ``running`` run whose
    owner is no longer alive is shown as (see ``landscape._leases``)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CRASHED = "crashed"


class BatchStatus(StrEnum):
    """Status of one attempt at an aggregation batch."""

    DRAFT = "draft"
    EXECUTING = "executing"
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
