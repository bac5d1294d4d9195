"""Replaying a recorded run: every external call answered from that run's record.

A replay sends nothing over the network.  Each call is looked up by the hash of its
request among the answers the replayed run received and recorded ``replayed``; a
request that run never made is the row's error (``replay_miss``).  The replaying run
records which run it replays (``runs.replayed_from``), so that resuming it replays too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._calls import AnswerBook
from ._errors import ReplayError

if TYPE_CHECKING:
    from landscape import Landscape

__all__ = ["load_replay"]


async def load_replay(landscape: Landscape, run_id: str) -> AnswerBook:
    """The answers of run ``run_id`` for a run that replays it; :class:`ReplayError`
    when there is no such run."""
    answers = await landscape.recorded_answers(run_id)
    if answers is None:
        raise ReplayError(f"run {run_id} is not in the Landscape: there is nothing to replay")
    return AnswerBook.replaying(run_id, answers)
