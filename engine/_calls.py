"""Recording the external calls plugins make, and the run's totals and budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plugins import ExternalCall

    from ._run_context import RunContext

__all__ = ["CallTotals", "StateCalls"]


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
        self._run.count_call(call)
