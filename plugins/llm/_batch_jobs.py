"""A client for an OpenAI-style batch API: upload a JSONL file, start a job, read it back.

Every exchange goes through the endpoint (its limits, retries and breaker) and is
reported to the call log it is given: the flush state's, so a batch explains which
file was uploaded, which job started and how it ended.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from ._endpoint import HttpRequest

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from plugins.protocols import CallLog

    from ._endpoint import Endpoint

__all__ = ["BatchJobs", "JobLine", "JobState"]

#: How far a provider's clock may be behind ours (when searching jobs by time).
_CLOCK_SKEW_SECONDS = 300.0

#: Job statuses after which nothing changes.
FINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True, slots=True)
class JobState:
    """A job as the provider reports it."""

    job_id: str
    status: str
    created_at: float | None
    output_file_id: str | None
    error_file_id: str | None
    #: What the provider says went wrong with the job as a whole, if anything.
    errors: str | None
    #: Seconds from creation to the end (``None`` while it runs).
    duration: float | None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, job: Mapping[str, Any]) -> JobState:
        created = job.get("created_at")
        ended = next(
            (
                job[k]
                for k in ("completed_at", "failed_at", "expired_at", "cancelled_at")
                if job.get(k)
            ),
            None,
        )
        errors = (job.get("errors") or {}).get("data") or []
        messages = "; ".join(str(e.get("message")) for e in errors if isinstance(e, dict))
        return cls(
            job_id=str(job["id"]),
            status=str(job["status"]),
            created_at=float(created) if isinstance(created, int | float) else None,
            output_file_id=job.get("output_file_id"),
            error_file_id=job.get("error_file_id"),
            errors=messages or None,
            duration=None if ended is None or created is None else float(ended) - float(created),
        )


@dataclass(frozen=True, slots=True)
class JobLine:
    """One request's line of a job's output or error file."""

    custom_id: str
    status_code: int | None
    body: Any
    error: Mapping[str, Any] | None

    @classmethod
    def parse(cls, line: bytes) -> JobLine:
        data = orjson.loads(line)
        response = data.get("response") or {}
        return cls(
            custom_id=str(data["custom_id"]),
            status_code=response.get("status_code"),
            body=response.get("body"),
            error=data.get("error"),
        )

    @property
    def succeeded(self) -> bool:
        return self.error is None and self.status_code == 200 and isinstance(self.body, dict)


class BatchJobs:
    """The batch API of one endpoint (OpenAI's ``/files`` and ``/batches``)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout_seconds: float | None = None,
        max_attempts: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_seconds = timeout_seconds
        self.max_attempts = max_attempts

    async def _call(self, request: HttpRequest, calls: CallLog, call_type: str) -> Any:
        return await self.endpoint.call(
            request,
            calls=calls,
            call_type=call_type,
            timeout_seconds=self.timeout_seconds,
            max_attempts=self.max_attempts,
        )

    async def start(
        self,
        requests: Sequence[tuple[str, dict[str, Any]]],
        *,
        completion_window: str,
        metadata: Mapping[str, str],
        calls: CallLog,
    ) -> str:
        """Upload ``(custom_id, body)`` chat requests as a file and start a job on it;
        the job's id.

        Starting the job is shielded from cancellation: once the provider may have
        started it, its id comes back, so that it is recorded and never started again.
        """
        lines = [
            orjson.dumps(
                {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                 "body": body}
            )
            for custom_id, body in requests
        ]  # fmt: skip
        content = b"\n".join(lines) + b"\n"
        filename = f"{metadata.get('ledgerflow_batch', 'batch')}.jsonl"

        upload = HttpRequest(
            "POST",
            "/files",
            form={"purpose": "batch"},
            files={"file": (filename, content, "application/jsonl")},
            record={
                "method": "POST",
                "path": "/files",
                "purpose": "batch",
                "filename": filename,
                "requests": len(lines),
                "bytes": len(content),
                "sha256": hashlib.sha256(content).hexdigest(),
            },
        )
        uploaded = await self._call(upload, calls, "batch_upload")
        create = {
            "input_file_id": uploaded["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": completion_window,
            "metadata": dict(metadata),
        }
        with anyio.CancelScope(shield=True):
            job = await self._call(
                HttpRequest("POST", "/batches", json=create), calls, "batch_create"
            )
        return str(job["id"])

    async def find(self, batch_id: str, since: float, calls: CallLog) -> str | None:
        """The job started for ``batch_id`` (its ``ledgerflow_batch`` metadata) no
        earlier than ``since`` (epoch seconds), if there is one: pages through the jobs
        newest first and stops at the first page reaching back before ``since``."""
        after: str | None = None
        while True:
            path = "/batches?limit=100" + ("" if after is None else f"&after={after}")
            request = HttpRequest("GET", path)
            page = await self._call(request, calls, "batch_find")
            jobs = page.get("data") or []
            # Providers' clocks differ from ours: look a little further back.
            earliest = since - _CLOCK_SKEW_SECONDS
            for job in jobs:
                ours = (job.get("metadata") or {}).get("ledgerflow_batch") == batch_id
                if ours and (job.get("created_at") or 0) >= earliest:
                    return str(job["id"])
            oldest = min((job.get("created_at") or 0 for job in jobs), default=0)
            after = page.get("last_id")
            if not page.get("has_more") or after is None or oldest < earliest:
                return None

    async def state(self, job_id: str, calls: CallLog) -> JobState:
        """The job as it stands now."""
        request = HttpRequest("GET", f"/batches/{job_id}")
        return JobState.from_json(await self._call(request, calls, "batch_poll"))

    async def cancel(self, job_id: str, calls: CallLog) -> None:
        """Ask the provider to cancel the job."""
        path = f"/batches/{job_id}/cancel"
        await self._call(
            HttpRequest("POST", path),
            calls,
            "batch_cancel",
        )

    async def lines(self, file_id: str | None, calls: CallLog) -> list[JobLine]:
        """The lines of an output or error file (none without a file)."""
        if file_id is None:
            return []
        path = f"/files/{file_id}/content"
        request = HttpRequest("GET", path, raw=True)
        content: bytes = await self._call(request, calls, "batch_download")
        return [JobLine.parse(line) for line in content.splitlines() if line.strip()]
