"""Recording the external calls plugins make, and the run's totals and budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio

from landscape import CallSummary, CanonicalizationError, canonical_hash
from plugins import RecordedAnswer, ReplayMiss, Reservation, StopRun

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

    from plugins import ExternalCall

    from ._config import BudgetSettings
    from ._run_context import RunContext

__all__ = ["AnswerBook", "BudgetGuard", "CallTotals", "SharedCalls", "StateCalls", "StateOf"]

#: A node state and whose it is: ``(state_id, token_id, node_id)``.
StateOf: TypeAlias = "tuple[str, str, str]"


@dataclass(slots=True)
class CallTotals:
    """What a run's external calls added up to (every attempt counts)."""

    calls: int = 0
    retries: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def resumed(cls, summary: CallSummary) -> CallTotals:
        """Totals that go on from a run's recorded ones (prompt and completion tokens
        are on record only together)."""
        return cls(
            calls=summary.calls,
            retries=summary.retries,
            errors=summary.errors,
            prompt_tokens=summary.tokens,
            cost=summary.cost,
        )

    def snapshot(self) -> CallSummary:
        """The totals so far, frozen (what results and progress snapshots carry)."""
        return CallSummary(self.calls, self.retries, self.errors, self.tokens, self.cost)

    def add(self, call: ExternalCall) -> None:
        self.calls += 1
        self.retries += call.attempt > 1
        self.errors += call.status == "error"
        self.prompt_tokens += call.prompt_tokens or 0
        self.completion_tokens += call.completion_tokens or 0
        self.cost += call.cost or 0.0


#: What a run without a budget reserves (releasing it does nothing).
_NOTHING_RESERVED = Reservation()


class BudgetGuard:
    """Holds a run's calls to its budget (``None``: no budget): each attempt reserves
    its estimate before it is sent, and none goes whose reservation would cross it.

    The spend compared with the budget is what the run's totals have on record plus
    what the attempts on their way reserved.  An attempt that does not fit waits while
    others hold reservations (their actual usage, once recorded, may leave room); one
    that cannot fit even when none are held is refused with :class:`~plugins.StopRun`,
    and so is every attempt after it: the budget is then *exhausted*.  Spend may still
    pass the budget by what the attempts in flight used beyond their estimates.
    """

    def __init__(self, settings: BudgetSettings | None) -> None:
        self.settings = settings
        self.reserved_tokens = 0
        self.reserved_cost = 0.0
        #: Why no attempt may be sent any more, once the budget is spent.
        self.exhausted: str | None = None
        self._held = 0
        #: Set (and forgotten) when a reservation is released; made by whoever waits.
        self._released: anyio.Event | None = None

    async def reserve(self, totals: CallTotals, tokens: int, cost: float) -> Reservation:
        """Reserve ``tokens`` and ``cost`` once the budget can cover them beside
        ``totals`` and the other reservations; :class:`~plugins.StopRun` (the budget
        exhausted) when it never can.  An attempt estimated at nothing (a batch job's
        upload or poll) reserves nothing and is never refused."""
        if self.settings is None or (tokens <= 0 and cost <= 0):
            return _NOTHING_RESERVED
        while (over := self._over(totals, tokens, cost)) is not None:
            if self.exhausted is None and self._held == 0:
                self.exhaust(over)
            if self.exhausted is not None:
                raise StopRun(self.exhausted)
            if self._released is None:
                self._released = anyio.Event()
            await self._released.wait()
        self._held += 1
        self.reserved_tokens += tokens
        self.reserved_cost += cost
        return Reservation(lambda: self._release(tokens, cost))

    def crossed(self, totals: CallTotals) -> str | None:
        """Why ``totals`` spent more than the budget, the first time they do (spend
        beyond the estimates of attempts already sent); else ``None``."""
        budget = self.settings
        if budget is None or self.exhausted is not None:
            return None
        reason = None
        if budget.max_cost is not None and totals.cost > budget.max_cost:
            reason = f"budget: cost {totals.cost:.4f} > max_cost {budget.max_cost}"
        elif budget.max_tokens is not None and totals.tokens > budget.max_tokens:
            reason = f"budget: {totals.tokens} tokens > max_tokens {budget.max_tokens}"
        if reason is not None:
            self.exhaust(reason)
        return reason

    def exhaust(self, reason: str) -> None:
        """Refuse every attempt from now on, for ``reason`` (waiting ones too)."""
        self.exhausted = reason
        self._wake()

    def _over(self, totals: CallTotals, tokens: int, cost: float) -> str | None:
        """Why reserving ``tokens`` and ``cost`` now would cross the budget, or ``None``."""
        budget = self.settings
        assert budget is not None
        if self.exhausted is not None:
            return self.exhausted
        if budget.max_tokens is not None:
            committed = totals.tokens + self.reserved_tokens
            if committed + tokens > budget.max_tokens:
                return (
                    f"budget: max_tokens {budget.max_tokens}: {totals.tokens} tokens spent, "
                    f"the next call may take {tokens} more"
                )
        if budget.max_cost is not None:
            committed_cost = totals.cost + self.reserved_cost
            if committed_cost + cost > budget.max_cost:
                return (
                    f"budget: max_cost {budget.max_cost}: cost {totals.cost:.4f} spent, "
                    f"the next call may cost {cost:.4f} more"
                )
        return None

    def _release(self, tokens: int, cost: float) -> None:
        self._held -= 1
        self.reserved_tokens -= tokens
        self.reserved_cost -= cost
        self._wake()

    def _wake(self) -> None:
        released, self._released = self._released, None
        if released is not None:
            released.set()


@dataclass(frozen=True, slots=True)
class AnswerBook:
    """Answers on record by request hash, and what a call answered from it is recorded as.

    A request it has no answer for is looked up in ``fallback``; when a replay is the
    last word (``replay_of``, the run replayed), a request nobody answered is a
    :class:`~plugins.ReplayMiss`, never a call.
    """

    status: str
    #: Request hash -> (the answer's hash, the answer).
    answers: Mapping[str, tuple[str, Any]]
    fallback: AnswerBook | None = None
    replay_of: str | None = None

    @classmethod
    def replaying(cls, run_id: str, answers: Mapping[str, tuple[str, Any]]) -> AnswerBook:
        """The answers of run ``run_id``, for a run that replays it."""
        return cls("replayed", answers, replay_of=run_id)

    def lookup(self, request: Any) -> RecordedAnswer | None:
        if not self.answers and self.fallback is None and self.replay_of is None:
            return None  # the common case: nothing on record, and no hashing for it
        return self._lookup(canonical_hash(request))

    def _lookup(self, request_hash: str) -> RecordedAnswer | None:
        answer = self.answers.get(request_hash)
        if answer is not None:
            response_hash, response = answer
            return RecordedAnswer(self.status, response, request_hash, response_hash)
        if self.fallback is not None:
            return self.fallback._lookup(request_hash)
        if self.replay_of is not None:
            raise ReplayMiss(request_hash, self.replay_of)
        return None


class StateCalls:
    """The :class:`~plugins.CallLog` of one node state (of token ``token_id`` at
    ``node_id``): each call becomes a ``calls`` row linked to the state, its request
    and response stored content-addressed.  Made for every row a node processes, so it
    holds plain fields (no record object of its own)."""

    __slots__ = ("_node_id", "_run", "_state_id", "_token_id")

    def __init__(self, run: RunContext, state_id: str, token_id: str, node_id: str) -> None:
        self._run = run
        self._state_id = state_id
        self._token_id = token_id
        self._node_id = node_id

    def record(self, call: ExternalCall) -> None:
        payloads = _store_payloads(self._run, call)
        state = (self._state_id, self._token_id, self._node_id)
        _write_call(self._run, state, call, payloads)
        self._run.count_call(call)

    async def reserve(self, tokens: int, cost: float) -> Reservation:
        return await self._run.reserve(tokens, cost)

    def recorded_answer(self, request: Any) -> RecordedAnswer | None:
        return self._run.answers.lookup(request)


class SharedCalls:
    """The :class:`~plugins.CallLog` of one request made for several rows at once.

    Each row's state gets the call (same request and response payloads, stored once),
    with its share of the tokens and cost, so every row explains itself and the shares
    add up to the call; the run's totals count the call once.
    """

    __slots__ = ("_run", "_states")

    def __init__(self, run: RunContext, states: Sequence[StateOf]) -> None:
        self._run = run
        self._states = list(states)

    def record(self, call: ExternalCall) -> None:
        n = len(self._states)
        payloads = _store_payloads(self._run, call)
        prompt = _shares(call.prompt_tokens, n)
        completion = _shares(call.completion_tokens, n)
        cost = None if call.cost is None else call.cost / n
        for i, state in enumerate(self._states):
            share = (prompt[i], completion[i], cost)
            _write_call(self._run, state, call, payloads, share)
        self._run.count_call(call)

    async def reserve(self, tokens: int, cost: float) -> Reservation:
        return await self._run.reserve(tokens, cost)

    def recorded_answer(self, request: Any) -> RecordedAnswer | None:
        return self._run.answers.lookup(request)


def _store_payloads(run: RunContext, call: ExternalCall) -> tuple[str, str | None]:
    """Store the call's request and response (unless they are on record); their hashes."""
    request_hash = call.request_hash or _store(run, call.request)
    response_hash = call.response_hash
    if response_hash is None and call.response is not None:
        response_hash = _store(run, call.response)
    return request_hash, response_hash


def _store(run: RunContext, payload: Any) -> str:
    """Store ``payload``; one with no canonical form (an answer nested deeper than the
    Landscape hashes) is stored as the reason instead, so the call is still on record."""
    try:
        return run.recorder.store(payload)
    except CanonicalizationError as exc:
        return run.recorder.store({"unrecordable": str(exc)})


def _write_call(
    run: RunContext,
    state: StateOf,
    call: ExternalCall,
    payloads: tuple[str, str | None],
    share: tuple[int | None, int | None, float | None] | None = None,
) -> None:
    """One ``calls`` row for ``state``; ``share`` replaces the call's tokens and cost."""
    request_hash, response_hash = payloads
    prompt, completion, cost = share or (call.prompt_tokens, call.completion_tokens, call.cost)
    state_id, token_id, node_id = state
    run.recorder.call(
        state_id=state_id,
        token_id=token_id,
        node_id=node_id,
        call_index=call.call_index,
        call_type=call.call_type,
        provider=call.provider,
        model=call.model,
        status=call.status,
        attempt=call.attempt,
        http_status=call.http_status,
        request_hash=request_hash,
        response_hash=response_hash,
        latency_ms=call.latency_ms,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost=cost,
        error=call.error,
    )


def _shares(total: int | None, n: int) -> list[int | None]:
    """``total`` split into ``n`` whole shares that add up to it (the first take the rest)."""
    if total is None:
        return [None] * n
    base, rest = divmod(total, n)
    return [base + (1 if i < rest else 0) for i in range(n)]
