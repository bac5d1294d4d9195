"""The coalesce node: joins the branch tokens of each forked row into one token."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from landscape import NodeStateStatus, Outcome

from .._forks import ForkInstance, JoinResult
from .._merge import MergeError, merge_rows
from .._tokens import Token, derived_token_id
from ._base import WAKE, NodeTask

if TYPE_CHECKING:
    from .._config import CoalesceSettings

__all__ = ["CoalesceNode"]

_MERGE = "merge"
#: Why a join fails when a branch it needed was lost; its stragglers fail for the same.
_LOST_BRANCH_REASONS = frozenset({"missing_branches", "quorum_not_met", "no_branch_arrived"})


@dataclass(slots=True)
class _Arrived:
    token: Token
    at: float  # wall time, for the node state


@dataclass(slots=True, eq=False)
class _Join:
    """One pending join: the fork it belongs to and the branches that arrived so far."""

    fork: ForkInstance
    deadline: float
    arrived: dict[str, _Arrived] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class CoalesceNode(NodeTask):
    """Waits for the branches of each forked row and resolves the join by its policy.

    A join is keyed by its fork (the forked token), so a row forked twice is joined per
    fork.  It resolves as soon as its policy is decided: enough branches arrived, or a
    branch was lost elsewhere (routed to a sink, discarded, failed) so the policy can
    no longer be met; else when its ``timeout_seconds`` (from its first event, on the
    run's clock) passes — the node waits for its next input *or* the earliest
    deadline — or at end of input (but not at a stop: its joins wait for the resume).
    A successful join makes one token, whose parents are the arrived tokens
    (``coalesced``).  A failed one ends every arrived token
    ``failed`` (or routes it by ``on_error``) with the policy and the arrived and
    missing branches in its context.  Tokens arriving after their join resolved are
    ``coalesced`` into the output with policy ``first``, fail for the join's reason
    when it failed on a lost branch, and are ``failed`` as ``late_arrival`` otherwise.
    Only pending joins are remembered; a resolved join's outcome lives on the fork
    that its stragglers still carry.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: CoalesceSettings = self.spec.settings  # type: ignore[assignment]
        self.branches = tuple(self.settings.branches)
        assert self.spec.joins is not None
        self.run_ctx.joins[self.spec.joins] = self
        timeout = self.settings.timeout_seconds
        self.timeout = math.inf if timeout is None else timeout
        #: Pending joins in the order they began, which is also deadline order.
        self.pending: dict[ForkInstance, _Join] = {}
        #: Forks with a branch lost since the node last looked (told by other tasks).
        self.lost: deque[ForkInstance] = deque()

    # -- told by other nodes -------------------------------------------------------

    def branch_lost(self, instance: ForkInstance, branch: str) -> None:
        """A token of ``branch`` ended elsewhere: the join may be decided now."""
        if branch in self.settings.branches:
            self.lost.append(instance)
            self.wake()

    # -- the node loop ---------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self._settle_lost()
            await self._expire()
            token = await self.next_input(self._next_deadline())
            if token is None:
                break
            if token is not WAKE:
                assert isinstance(token, Token)
                self.stats.received += 1
                await self._arrive(token)
        await self._settle_lost()
        if self.run_ctx.stop_requested.is_set():
            # Not the end of the input: a branch may have been left for the resume (a
            # StopRun, a held aggregation).  The arrived tokens stay without an outcome,
            # as after a crash, and the resume delivers them to the join again.
            return
        for join in list(self.pending.values()):
            await self._resolve(join, final="end_of_input")

    def _next_deadline(self) -> float:
        first = next(iter(self.pending.values()), None)
        return math.inf if first is None else first.deadline

    async def _settle_lost(self) -> None:
        while self.lost:
            fork = self.lost.popleft()
            if fork.result is not None:
                continue
            join = self.pending.get(fork) or self._begin(fork)
            await self._resolve(join)

    async def _expire(self) -> None:
        while self.pending:
            join = next(iter(self.pending.values()))
            if join.deadline > self.run_ctx.clock.now():
                return
            await self._resolve(join, final="timeout")

    def _begin(self, fork: ForkInstance) -> _Join:
        join = _Join(fork, self.run_ctx.clock.now() + self.timeout)
        self.pending[fork] = join
        self.stats.in_flight = len(self.pending)
        return join

    # -- arrivals --------------------------------------------------------------------

    async def _arrive(self, token: Token) -> None:
        fork = token.fork
        branch = token.inlet
        assert branch is not None, "a coalesce is only fed through its branch connections"
        if fork is None or fork.fork_node != self.spec.joins:
            await self._refuse(token, "not_forked", f"token did not come from '{self.spec.joins}'")
            return
        if token.branch != branch:
            message = f"a token of branch {token.branch!r} arrived on branch {branch!r}"
            await self._refuse(token, "wrong_branch", message)
            return
        # From here on the coalesce accounts for the token, not its fork.
        token.fork = None
        fork.leave(branch, lost=False)
        if fork.result is not None:
            await self._late(token, fork)
            return
        join = self.pending.get(fork) or self._begin(fork)
        if branch in join.arrived:
            await self._refuse(token, "duplicate_branch", f"branch {branch!r} arrived twice")
            return
        join.arrived[branch] = _Arrived(token, time.time())
        await self._resolve(join)

    # -- deciding --------------------------------------------------------------------

    def _decide(self, join: _Join, final: str | None) -> str | None:
        """:data:`_MERGE`: merge now; another reason: fail now; ``None``: keep waiting."""
        arrived = set(join.arrived)
        possible = arrived | {b for b in self.branches if join.fork.live.get(b, 0) > 0}
        complete = arrived.issuperset(self.branches)
        exhausted = possible == arrived  # nothing more can arrive
        policy = self.settings.policy
        if policy == "require_all":
            if complete:
                return _MERGE
            if exhausted or not possible.issuperset(self.branches):
                return "missing_branches"
        elif policy == "quorum":
            needed = self.settings.quorum or len(self.branches)
            if len(arrived) >= needed:
                return _MERGE
            if len(possible) < needed:
                return "quorum_not_met"
        elif policy == "best_effort":
            if complete or (exhausted and arrived):
                return _MERGE
            if exhausted:
                return "no_branch_arrived"
            if final is not None:
                return _MERGE if arrived else "no_branch_arrived"
        elif arrived:  # first
            return _MERGE
        elif exhausted:
            return "no_branch_arrived"
        if final is not None:
            return final
        return None

    async def _resolve(self, join: _Join, final: str | None = None) -> None:
        decision = self._decide(join, final)
        if decision is None:
            return
        del self.pending[join.fork]
        self.stats.in_flight = len(self.pending)
        rows = {b: join.arrived[b].token.row for b in self.branches if b in join.arrived}
        if decision == _MERGE:
            try:
                merged = merge_rows(
                    self.settings.merge,
                    rows,
                    prefer=self.settings.prefer,
                    select_branch=self.settings.select_branch,
                )
            except MergeError as exc:
                await self._fail(join, _Failure("merge_failed", str(exc), exc.details))
                return
            await self._succeed(join, merged)
        else:
            missing = ", ".join(self._missing(join))
            message = {
                "missing_branches": f"branches missing: {missing}",
                "quorum_not_met": f"quorum of {self.settings.quorum} not met",
                "no_branch_arrived": "no branch arrived",
                "timeout": f"timed out after {self.settings.timeout_seconds} s "
                f"waiting for {missing}",
                "end_of_input": "input ended before the join was complete",
            }[decision]
            await self._fail(join, _Failure(decision, message))

    def _missing(self, join: _Join) -> list[str]:
        return [b for b in self.branches if b not in join.arrived]

    def _context(self, arrived: list[str], missing: list[str]) -> dict[str, Any]:
        """What every state and failed outcome here records about the join."""
        return {
            "coalesce": self.node_id,
            "policy": self.settings.policy,
            "merge": self.settings.merge,
            "arrived_branches": arrived,
            "missing_branches": missing,
        }

    # -- outcomes --------------------------------------------------------------------

    async def _succeed(self, join: _Join, row: dict[str, Any]) -> None:
        fork = join.fork
        arrived = [join.arrived[b] for b in self.branches if b in join.arrived]
        tokens = [a.token for a in arrived]
        row_hash = self.recorder.store(row)
        output = Token(
            derived_token_id("join", fork.key, self.node_id),
            tokens[0].row_id,
            tokens[0].row_index,
            row,
            row_hash,
            branch=fork.parent_branch,
            step=max(t.step for t in tokens),
            fork=fork.parent,
        )
        self.recorder.token(
            token_id=output.token_id,
            row_id=output.row_id,
            branch_name=output.branch,
            parents=[t.token_id for t in tokens],
        )
        self.run_ctx.token_made(output)
        missing = self._missing(join)
        fork.result = JoinResult(output.token_id, tuple(join.arrived), tuple(missing))
        fork.hand_over()
        context = self._context(list(join.arrived), missing)
        now = time.time()
        for item in arrived:
            self._record_joined(item.token, item.at, now, output.token_id, context)
        state_id = self.recorder.new_id("s")
        self.recorder.node_state(
            state_id=state_id,
            token_id=output.token_id,
            node_id=self.node_id,
            status=NodeStateStatus.COMPLETED,
            input_hash=None,
            output_hash=row_hash,
            started_at=min(a.at for a in arrived),
            completed_at=now,
            step_index=output.step,
            context=context,
        )
        output.step += 1
        await self.deliver(output, self.spec.routes["success"])

    def _record_joined(
        self, token: Token, at: float, now: float, output_id: str, context: dict[str, Any]
    ) -> None:
        state_id = self.recorder.new_id("s")
        joined = {**context, "joined_into": output_id}
        self.record_state(token, state_id, at, now, output_hash=token.row_hash, context=joined)
        self.run_ctx.record_outcome(
            token,
            Outcome.COALESCED,
            self.node_id,
            context={"node": self.node_id, "joined_into": output_id, "branch": token.branch},
        )

    async def _fail(self, join: _Join, failure: _Failure) -> None:
        fork = join.fork
        missing = self._missing(join)
        fork.result = JoinResult(None, tuple(join.arrived), tuple(missing), failure.reason)
        context = {**self._context(list(join.arrived), missing), "reason": failure.reason}
        error = {"type": "CoalesceError", "message": failure.message, **failure.details}
        now = time.time()
        for branch in self.branches:
            item = join.arrived.get(branch)
            if item is not None:
                await self._fail_token(item.token, item.at, now, error, context)
        fork.release()

    async def _late(self, token: Token, fork: ForkInstance) -> None:
        """A branch arriving after its join was resolved.

        With policy ``first`` it is coalesced into the join's token.  At a join that
        failed because a branch was lost it fails for the same reason; after a join
        resolved by its policy or its timeout it is a ``late_arrival``.
        """
        result = fork.result
        assert result is not None
        assert token.inlet is not None
        arrived = (*result.arrived, token.inlet)
        fork.result = dataclasses.replace(result, arrived=arrived)
        missing = [b for b in result.missing if b not in arrived]
        context = self._context(list(arrived), missing)
        now = time.time()
        if result.output_token_id is not None and self.settings.policy == "first":
            self.recorder.token_parent(
                token_id=result.output_token_id,
                parent_token_id=token.token_id,
                ordinal=len(result.arrived),
            )
            self._record_joined(token, now, now, result.output_token_id, context)
            return
        if result.reason in _LOST_BRANCH_REASONS:
            reason = result.reason or "failed"
            message = f"its join had already failed ({reason})"
        else:
            reason = "late_arrival"
            message = f"branch {token.inlet!r} arrived after its join was resolved"
        error = {"type": "CoalesceError", "message": message}
        await self._fail_token(token, now, now, error, {**context, "reason": reason})

    async def _refuse(self, token: Token, reason: str, message: str) -> None:
        error = {"type": "CoalesceError", "message": message}
        context = {**self._context([], []), "reason": reason}
        now = time.time()
        await self._fail_token(token, now, now, error, context)

    async def _fail_token(
        self,
        token: Token,
        at: float,
        now: float,
        error: dict[str, Any],
        context: dict[str, Any],
    ) -> None:
        state_id = self.recorder.new_id("s")
        self.record_state(token, state_id, at, now, output_hash=None, error=error, context=context)
        await self.fail_row(token, error, state_id, context=context)
