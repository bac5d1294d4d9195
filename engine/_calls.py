"""Recording the external calls plugins make, and the run's totals and budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from landscape import CallSummary, canonical_hash
from plugins import RecordedAnswer, ReplayMiss

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

    from plugins import ExternalCall

    from ._run_context import RunContext

__all__ = ["AnswerBook", "CallTotals", "SharedCalls", "StateCalls", "StateOf"]

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

    def recorded_answer(self, request: Any) -> RecordedAnswer | None:
        return self._run.answers.lookup(request)


def _store_payloads(run: RunContext, call: ExternalCall) -> tuple[str, str | None]:
    """Store the call's request and response (unless they are on record); their hashes."""
    recorder = run.recorder
    request_hash = call.request_hash or recorder.store(call.request)
    response_hash = call.response_hash
    if response_hash is None and call.response is not None:
        response_hash = recorder.store(call.response)
    return request_hash, response_hash


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
