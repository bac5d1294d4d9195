"""The Landscape: ledgerflow's SQL audit trail.

Everything a run does is recorded here — source rows, tokens, every node visit, routing
decisions, external calls, batches, outcomes, artifacts and checkpoints — so that any
output can be explained back to its source row and a crashed run resumed.

This package imports neither ``engine`` nor ``plugins``.
"""

from __future__ import annotations

from ._canonical import (
    CanonicalizationError,
    canonical_bytes,
    canonical_hash,
    canonical_json,
    sha256_hex,
)
from ._diff import Divergence, RowDiff, RunDiff, diff_runs
from ._errors import AuditIntegrityError, LandscapeError, LandscapeNotFound, LandscapeUnavailable
from ._leases import Fence, LeaseHolder, OwnershipLost, RunExists, RunOwned
from ._outcomes import TERMINAL_OUTCOMES, BatchStatus, NodeStateStatus, Outcome, RunStatus
from ._recorder import Recorder
from ._resume import OpenBatch, PendingToken, RecordedRoute, RecordedState, UnfinishedRun
from ._store import DEFAULT_URL, CallSummary, Landscape, RunSummary, redact_url
from ._writer import GroupCommitWriter

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_OUTCOMES",
    "AuditIntegrityError",
    "BatchStatus",
    "CallSummary",
    "CanonicalizationError",
    "Divergence",
    "Fence",
    "GroupCommitWriter",
    "Landscape",
    "LandscapeError",
    "LandscapeNotFound",
    "LandscapeUnavailable",
    "LeaseHolder",
    "NodeStateStatus",
    "OpenBatch",
    "Outcome",
    "OwnershipLost",
    "PendingToken",
    "RecordedRoute",
    "RecordedState",
    "Recorder",
    "RowDiff",
    "RunDiff",
    "RunExists",
    "RunOwned",
    "RunStatus",
    "RunSummary",
    "UnfinishedRun",
    "canonical_bytes",
    "canonical_hash",
    "canonical_json",
    "diff_runs",
    "redact_url",
    "sha256_hex",
]
