"""The ``llm_batch`` aggregation: a batch's rows answered by a provider batch job.

Providers answer batch jobs (a JSONL file of requests) within hours at about half the
price of online calls.  Each flush renders one chat request per member, exactly as the
``llm`` transform would for that row, starts a job for them and waits for it on an
event-loop timer whose interval grows (``poll_interval_seconds`` times
``poll_backoff`` up to ``max_poll_interval_seconds``), giving up — and cancelling the
job — after ``max_wait_seconds`` from its creation.  A job that ends ``failed``,
``expired`` or ``cancelled`` fails the batch attempt (the node's ``retries`` start a
new one).  Results come back by ``custom_id`` (the member's token id): each member
gets its answer mapped into its row like ``llm`` does, or its own error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from pydantic import BaseModel, Field

from plugins.protocols import (
    Determinism,
    ExternalCall,
    ExternalJobAggregation,
    JobFailed,
    MemberResult,
    PluginSetup,
    ReplayMiss,
    Row,
)

from ._batch_jobs import BatchJobs, JobLine, JobState
from ._endpoint import reported_usage
from ._prompts import PromptError
from ._transform import AnswerError, LlmOptions, LlmTransform

if TYPE_CHECKING:
    from collections.abc import Sequence

    from plugins.protocols import BatchContext

__all__ = ["BatchRequestFailed", "LlmBatchAggregation", "LlmBatchOptions"]

#: What the ledger calls each member's request answered in (or for) a job.
_CALL_TYPE = "llm_batch"


class BatchRequestFailed(Exception):
    """One request of a job failed at the provider (its line in the job's error file)."""


class LlmBatchOptions(LlmOptions):
    poll_interval_seconds: float = Field(
        30.0, gt=0, description="First wait between looks at a running job."
    )
    poll_backoff: float = Field(1.5, ge=1, description="Each wait is this much longer...")
    max_poll_interval_seconds: float = Field(300.0, gt=0, description="...up to this.")
    max_wait_seconds: float = Field(
        86_400.0, gt=0, description="A job running longer is cancelled and fails the batch."
    )
    completion_window: str = Field("24h", description="Sent with the job (OpenAI: 24h).")
    max_pending_jobs: int = Field(16, ge=1, description="Jobs of this node running at once.")
    batch_price_factor: float = Field(
        0.5, ge=0, description="Batch price as a share of the endpoint's online `prices`."
    )


class LlmBatchAggregation(ExternalJobAggregation):
    """Answers each member of a batch through one provider batch job (see the module).

    ``parse_retries`` does not apply: an unusable answer is its row's error.  Answers on
    record (a replayed run's) are taken without starting a job; a job is started only
    for the members still unanswered.
    """

    name: ClassVar[str] = "llm_batch"
    version: ClassVar[str] = "1"
    determinism: ClassVar[Determinism] = Determinism.EXTERNAL
    Options: ClassVar[type[BaseModel]] = LlmBatchOptions
    options: LlmBatchOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        o: LlmBatchOptions = options
        #: Renders, parses and merges exactly as the ``llm`` transform does.
        self.llm = LlmTransform(o, setup)
        self.jobs = BatchJobs(
            self.llm.endpoint, timeout_seconds=o.timeout_seconds, max_attempts=o.max_attempts
        )
        self.max_pending_jobs = o.max_pending_jobs

    def audit_details(self) -> dict[str, Any]:
        return self.llm.audit_details()

    async def open(self) -> None:
        await self.llm.open()

    async def aclose(self) -> None:
        await self.llm.aclose()

    # -- submitting ----------------------------------------------------------------------

    async def submit(self, rows: Sequence[Row], ctx: BatchContext) -> str | list[MemberResult]:
        plan = self._plan(rows, ctx)
        unanswered = plan.unanswered()
        if not unanswered:
            return plan.results()
        metadata = {"ledgerflow_run": ctx.run_id, "ledgerflow_batch": ctx.batch_id}
        return await self.jobs.start(
            unanswered,
            completion_window=self.options.completion_window,
            metadata=metadata,
            calls=ctx.calls,
        )

    async def find(self, batch_id: str, since: float, ctx: BatchContext) -> str | None:
        return await self.jobs.find(batch_id, since, ctx.calls)

    async def wait(self, job_id: str, rows: Sequence[Row], ctx: BatchContext) -> list[MemberResult]:
        state = await self._await_end(job_id, ctx)
        if state.status != "completed":
            raise JobFailed(job_id, state.status, state.errors or "the job ended without answers")
        found: dict[str, JobLine] = {}
        for file_id in (state.output_file_id, state.error_file_id):
            for line in await self.jobs.lines(file_id, ctx.calls):
                found[line.custom_id] = line
        plan = self._plan(rows, ctx)
        for custom_id, body in plan.unanswered():
            row = plan.rows[custom_id]
            plan.done[custom_id] = self._from_line(row, body, found.get(custom_id), state)
        return plan.results()

    async def _await_end(self, job_id: str, ctx: BatchContext) -> JobState:
        """Look at the job on a growing interval until it ends; cancel it (and fail)
        once it has run ``max_wait_seconds``."""
        o = self.options
        interval = o.poll_interval_seconds
        while True:
            state = await self.jobs.state(job_id, ctx.calls)
            if state.final:
                return state
            created = state.created_at
            if created is not None and time.time() - created > o.max_wait_seconds:
                await self.jobs.cancel(job_id, ctx.calls)
                raise JobFailed(
                    job_id, "timed out", f"still {state.status} after {o.max_wait_seconds} s"
                )
            await anyio.sleep(interval)
            interval = min(interval * o.poll_backoff, o.max_poll_interval_seconds)

    # -- answers -------------------------------------------------------------------------

    def _plan(self, rows: Sequence[Row], ctx: BatchContext) -> _Plan:
        """Each member's request, and the results known without a job: rows whose
        prompt cannot be rendered, and answers on record (or a replay's misses)."""
        ids = list(ctx.members) or [str(i) for i in range(len(rows))]
        plan = _Plan(dict(zip(ids, rows, strict=True)))
        endpoint = self.llm.endpoint
        for custom_id, row in plan.rows.items():
            try:
                body = self.llm.request(row)
            except PromptError as exc:
                plan.done[custom_id] = MemberResult(None, exc)
                continue
            plan.requests.append((custom_id, body))
            try:
                recorded = ctx.calls.recorded_answer(body)
            except ReplayMiss as miss:
                call = endpoint.answered_call(body, _CALL_TYPE, 0, None, miss.error)
                plan.done[custom_id] = MemberResult(None, miss, (call,))
                continue
            if recorded is not None:
                call = endpoint.answered_call(body, _CALL_TYPE, 0, recorded)
                plan.done[custom_id] = self._answer(row, recorded.response, call)
        return plan

    def _from_line(
        self, row: Row, body: dict[str, Any], line: JobLine | None, state: JobState
    ) -> MemberResult:
        """The member's result from its line of the job's files (``None``: it has none)."""
        latency = 0.0 if state.duration is None else state.duration * 1000.0
        if line is None:
            error = {
                "type": "BatchRequestFailed",
                "message": f"job {state.job_id} has no result for this row",
            }
            call = self._call(body, "error", None, error=error, latency_ms=latency)
            return MemberResult(None, BatchRequestFailed(error["message"]), (call,))
        if not line.succeeded:
            message = _line_error(line)
            error = {"type": "BatchRequestFailed", "message": message, "job_id": state.job_id}
            call = self._call(
                body,
                "error",
                line.body,
                error=error,
                latency_ms=latency,
                http_status=line.status_code,
            )
            return MemberResult(None, BatchRequestFailed(message), (call,))
        prompt, completion = reported_usage(line.body)
        model = str(body.get("model"))
        cost = self.llm.endpoint.cost(model, prompt, completion) * self.options.batch_price_factor
        call = self._call(
            body, "success", line.body, latency_ms=latency, http_status=line.status_code,
            prompt_tokens=prompt, completion_tokens=completion, cost=cost,
        )  # fmt: skip
        return self._answer(row, line.body, call)

    def _answer(self, row: Row, answer: Any, call: ExternalCall) -> MemberResult:
        """``row`` with ``answer`` mapped in, or the answer's fault as the row's error."""
        try:
            return MemberResult(self.llm.merge(row, self.llm.parse(answer)), None, (call,))
        except AnswerError as exc:
            return MemberResult(None, exc, (call,))

    def _call(
        self, body: dict[str, Any], status: str, response: Any, **fields: Any
    ) -> ExternalCall:
        values: dict[str, Any] = {"latency_ms": 0.0, **fields}
        return ExternalCall(
            call_type=_CALL_TYPE,
            provider=self.llm.endpoint.settings.provider,
            model=body.get("model"),
            attempt=1,
            status=status,
            request=body,
            response=response,
            **values,
        )


@dataclass(slots=True)
class _Plan:
    """The members of one flush by ``custom_id``: their requests, and the results
    settled so far."""

    rows: dict[str, Row]
    #: ``(custom_id, body)`` of each member whose request could be rendered.
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    done: dict[str, MemberResult] = field(default_factory=dict)

    def unanswered(self) -> list[tuple[str, dict[str, Any]]]:
        return [(cid, body) for cid, body in self.requests if cid not in self.done]

    def results(self) -> list[MemberResult]:
        """One result per member, in member order (every member must be settled)."""
        return [self.done[custom_id] for custom_id in self.rows]


def _line_error(line: JobLine) -> str:
    """What a failed line of a job says went wrong."""
    if line.error:
        return f"{line.error.get('code')}: {line.error.get('message')}"
    body = line.body if isinstance(line.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    message = error.get("message") if error else None
    return f"HTTP {line.status_code}: {message or 'the request failed in the job'}"
