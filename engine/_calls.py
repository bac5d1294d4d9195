"""Recording the external calls plugins make, and the run's totals and budget."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from plugins import ExternalCall

    from ._run_context import RunContext

__all__ = ["CallTotals", "SharedCalls", "StateCalls"]


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

    def add(self, call: ExternalCall) -> None:
        self.calls += 1
        self.retries += call.attempt > 1
        self.errors += call.status != "success"
        self.prompt_tokens += call.prompt_tokens or 0
        self.completion_tokens += call.completion_tokens or 0
        self.cost += call.cost or 0.0


class StateCalls:
    """The :class:`~plugins.CallLog` of one node state: each call becomes a ``calls``
    row linked to the state, its request and response stored content-addressed."""

    __slots__ = ("_run", "_state_id")

    def __init__(self, run: RunContext, state_id: str) -> None:
        self._run = run
        self._state_id = state_id

    def record(self, call: ExternalCall) -> None:
        self.write(call)
        self._run.count_call(call)

    def write(self, call: ExternalCall) -> None:
        """Record ``call`` for this state without counting it in the run's totals."""
        recorder = self._run.recorder
        request_hash = recorder.store(call.request)
        response_hash = None if call.response is None else recorder.store(call.response)
        recorder.call(
            {
                "state_id": self._state_id,
                "call_index": call.call_index,
                "call_type": call.call_type,
                "provider": call.provider,
                "model": call.model,
                "status": call.status,
                "attempt": call.attempt,
                "http_status": call.http_status,
                "request_hash": request_hash,
                "request_ref": request_hash,
                "response_hash": response_hash,
                "response_ref": response_hash,
                "latency_ms": call.latency_ms,
                "prompt_tokens": call.prompt_tokens,
                "completion_tokens": call.completion_tokens,
                "cost": call.cost,
            },
            error=call.error,
        )


class SharedCalls:
    """The :class:`~plugins.CallLog` of one request made for several rows at once.

    Each row's state gets the call (same request and response payloads), with its
    share of the tokens and cost, so every row explains itself and the shares add up
    to the call; the run's totals count the call once.
    """

    __slots__ = ("_run", "_states")

    def __init__(self, run: RunContext, state_ids: Sequence[str]) -> None:
        self._run = run
        self._states = [StateCalls(run, state_id) for state_id in state_ids]

    def record(self, call: ExternalCall) -> None:
        n = len(self._states)
        prompt = _shares(call.prompt_tokens, n)
        completion = _shares(call.completion_tokens, n)
        cost = None if call.cost is None else call.cost / n
        for i, state in enumerate(self._states):
            state.write(
                dataclasses.replace(
                    call, prompt_tokens=prompt[i], completion_tokens=completion[i], cost=cost
                )
            )
        self._run.count_call(call)


def _shares(total: int | None, n: int) -> list[int | None]:
    """``total`` split into ``n`` whole shares that add up to it (the first take the rest)."""
    if total is None:
        return [None] * n
    base, rest = divmod(total, n)
    return [base + (1 if i < rest else 0) for i in range(n)]
