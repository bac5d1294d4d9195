"""The mock LLM server's Batch API: a files store and batch jobs shaped like OpenAI's.

A client uploads a JSONL file of requests (``POST /v1/files``, purpose ``batch``), creates
a job over it (``POST /v1/batches``), retrieves the job until it has ended, and downloads
its output and error files (``GET /v1/files/{id}/content``).  Nothing runs in the
background: a job moves on only when it is read (retrieved, cancelled, or counted for
``/stats``), by comparing the time since its creation (``time.monotonic()``) with
``batch_delay_seconds``::

    validating ──► failed                   the input file is not a valid batch file
        │
        ▼
    in_progress ─► completed | expired      once the delay is up (the first
        │                                   ``batch_expire_jobs`` jobs created expire)
        ▼
    cancelling ──► cancelled                on the first read after the cancel

The answer to ``POST /v1/batches`` always says ``validating``; the first read validates.
A completing job answers each request as ``/v1/chat/completions`` would answer its
``body`` (the server's own answering function), unless the request fails — with
probability ``batch_failure_rate``, drawn from a keyed hash of the seed, the request's
line and how often that line was drawn before, so a job's failures do not depend on the
order of its lines and a later job with the same line draws afresh.  Lines of the files
it writes::

    output  {"id": "batch_req_…", "custom_id": …, "error": null,
             "response": {"status_code": 200, "request_id": "req_…", "body": <completion>}}
    error   the same with status_code 500 (a failed request) or 400 (a bad body) and an
            OpenAI error document as its body; an expired job's requests are all here as
            {"id", "custom_id", "response": null,
             "error": {"code": "batch_expired", "message": …}}

A job whose output or error file would be empty has ``null`` for its id.  Files and jobs
stay in memory for the life of the server.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import orjson
from aiohttp import BodyPartReader

from ._mock_faults import Draws

if TYPE_CHECKING:
    from aiohttp import web

    from ._mock_settings import MockSettings
    from ._mock_stats import StatsCounter

__all__ = ["CHAT_ENDPOINT", "Answer", "BatchError", "BatchStore", "Upload", "read_upload"]

#: The one endpoint batch jobs may target.
CHAT_ENDPOINT = "/v1/chat/completions"
#: Answers a chat completion request body: the status and the response document.
Answer: TypeAlias = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]

_COMPLETION_WINDOW = "24h"
_WINDOW_SECONDS = 24 * 3600
_MAX_FILE_BYTES = 100 * 1024 * 1024
_MAX_METADATA_PAIRS = 16
_STAMPS = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_REQUEST_FAILED = {
    "error": {
        "message": "The server had an error processing this request.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}
_EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


class BatchError(Exception):
    """A Batch API request refused with ``status``; the message is the client's to read."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Status(StrEnum):
    """Where a batch job is in its lifecycle (OpenAI's names)."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Upload:
    """The fields of a file upload."""

    purpose: str
    filename: str
    content: bytes


@dataclass(frozen=True, slots=True)
class _File:
    id: str
    purpose: str
    filename: str
    content: bytes
    created_at: int

    def document(self) -> dict[str, Any]:
        """The OpenAI file object describing this file."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
        }


@dataclass(frozen=True, slots=True)
class _Request:
    """A valid line of an input file; ``line`` is its text, which failures are drawn from."""

    custom_id: str
    body: dict[str, Any]
    line: bytes


class _Invalid(NamedTuple):
    """Why a line of an input file is not a valid request."""

    code: str
    message: str


@dataclass(slots=True)
class _Job:
    """A batch job; ``requests`` are held from validation until the job ends."""

    id: str
    input_file_id: str
    metadata: dict[str, str] | None
    #: Epoch seconds of creation, and the ``time.monotonic()`` at which the job ends.
    created: float
    due: float
    expires: bool
    status: Status = Status.VALIDATING
    requests: list[_Request] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    #: The ``*_at`` timestamps reached so far (epoch seconds).
    stamps: dict[str, int] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The OpenAI batch object describing this job now."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": CHAT_ENDPOINT,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": _COMPLETION_WINDOW,
            "status": self.status.value,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created),
            **{stamp: self.stamps.get(stamp) for stamp in _STAMPS},
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


class BatchStore:
    """The files and batch jobs of one mock server (see the module docstring).

    ``answer`` answers a request inside a job as the online chat route would.  The store
    keeps ``stats`` up to date: uploads, jobs created, jobs by status, requests answered.
    """

    def __init__(self, settings: MockSettings, stats: StatsCounter, answer: Answer) -> None:
        self._delay = settings.batch_delay_seconds
        self._expire_jobs = settings.batch_expire_jobs
        self._failures = _FailureDraw(settings.seed, settings.batch_failure_rate)
        self._stats = stats
        self._answer = answer
        self._files: dict[str, _File] = {}
        self._jobs: dict[str, _Job] = {}

    def upload(self, upload: Upload) -> dict[str, Any]:
        """Store an uploaded batch input file; its file object.  400 unless purpose ``batch``."""
        if upload.purpose != "batch":
            raise BatchError(400, "The mock server accepts only files with purpose 'batch'.")
        stored = self._add_file("batch", upload.filename, upload.content)
        self._stats.files_uploaded += 1
        return stored.document()

    def content(self, file_id: str) -> bytes:
        """The bytes of an uploaded or server-written file; 404 for an unknown id."""
        return self._file(file_id).content

    def create(self, body: bytes) -> dict[str, Any]:
        """Create a job from a ``POST /v1/batches`` body; its batch object (``validating``).

        400 for a malformed body, an endpoint other than chat completions, a window other
        than 24h, or an input file that is not a batch file; 404 for an unknown file.
        """
        input_file_id, metadata = _job_request(body)
        if self._file(input_file_id).purpose != "batch":
            raise BatchError(400, f"File {input_file_id} does not have purpose 'batch'.")
        now = time.time()
        job = _Job(
            id=_new_id("batch_"),
            input_file_id=input_file_id,
            metadata=metadata,
            created=now,
            due=time.monotonic() + self._delay,
            expires=len(self._jobs) < self._expire_jobs,
            stamps={"expires_at": int(now) + _WINDOW_SECONDS},
        )
        self._jobs[job.id] = job
        self._stats.batches_created += 1
        return job.document()

    def page(self, query: Mapping[str, str]) -> dict[str, Any]:
        """A page of jobs, newest first: ``limit`` (1 to 100, default 20) of them after
        the job ``after`` (a cursor from an earlier page); 400 for a bad limit or cursor."""
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            raise BatchError(400, "limit must be an integer.") from None
        if not 1 <= limit <= 100:
            raise BatchError(400, "limit must be between 1 and 100.")
        newest_first = list(reversed(self._jobs.values()))
        after = query.get("after")
        if after is not None:
            ids = [job.id for job in newest_first]
            if after not in ids:
                raise BatchError(400, f"No batch found with id '{after}'.")
            newest_first = newest_first[ids.index(after) + 1 :]
        page = newest_first[:limit]
        for job in page:
            self._advance(job)
        return {
            "object": "list",
            "data": [job.document() for job in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(newest_first) > limit,
        }

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        """The batch object of a job as it is now; 404 for an unknown id."""
        job = self._job(batch_id)
        self._advance(job)
        return job.document()

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancel a running job (``cancelling`` until it is next read); an ended one stays as is."""
        job = self._job(batch_id)
        self._advance(job)
        if job.status is Status.IN_PROGRESS:
            job.stamps["cancelling_at"] = int(time.time())
            self._move(job, Status.CANCELLING)
        return job.document()

    def job_counts(self) -> dict[str, int]:
        """The jobs held by status, each moved on to where it is now."""
        counts: Counter[str] = Counter()
        for job in self._jobs.values():
            self._advance(job)
            counts[job.status.value] += 1
        return dict(counts)

    def _file(self, file_id: str) -> _File:
        found = self._files.get(file_id)
        if found is None:
            raise BatchError(404, f"No such File object: {file_id}")
        return found

    def _job(self, batch_id: str) -> _Job:
        found = self._jobs.get(batch_id)
        if found is None:
            raise BatchError(404, f"No batch found with id '{batch_id}'.")
        return found

    def _add_file(self, purpose: str, filename: str, content: bytes) -> _File:
        stored = _File(_new_id("file-"), purpose, filename, content, int(time.time()))
        self._files[stored.id] = stored
        return stored

    def _advance(self, job: _Job) -> None:
        """Validate a new job, end a due one, finish a cancel."""
        if job.status is Status.VALIDATING:
            self._validate(job)
        if job.status is Status.CANCELLING:
            job.stamps["cancelled_at"] = job.stamps["cancelling_at"]
            job.requests = []
            self._move(job, Status.CANCELLED)
        elif job.status is Status.IN_PROGRESS and time.monotonic() >= job.due:
            if job.expires:
                self._expire(job)
            else:
                self._complete(job)

    def _validate(self, job: _Job) -> None:
        requests, errors = _parse_input(self._files[job.input_file_id].content)
        if errors:
            job.errors = errors
            job.stamps["failed_at"] = int(job.created)
            self._move(job, Status.FAILED)
            return
        job.requests, job.total = requests, len(requests)
        job.stamps["in_progress_at"] = int(job.created)
        self._move(job, Status.IN_PROGRESS)

    def _complete(self, job: _Job) -> None:
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for request in job.requests:
            status, body = self._run(request)
            line = _result_line(request.custom_id, _response(status, body), None)
            (output if status == 200 else errors).append(line)
        self._stats.batch_requests_answered += len(output)
        job.stamps["finalizing_at"] = job.stamps["completed_at"] = self._end_stamp(job)
        self._finish(job, output, errors, Status.COMPLETED)

    def _run(self, request: _Request) -> tuple[int, dict[str, Any]]:
        """The status and body a request inside a job gets."""
        if self._failures.fails(request.line):
            return 500, _REQUEST_FAILED
        return self._answer(request.body)

    def _expire(self, job: _Job) -> None:
        errors = [_result_line(r.custom_id, None, _EXPIRED) for r in job.requests]
        job.stamps["expired_at"] = self._end_stamp(job)
        self._finish(job, [], errors, Status.EXPIRED)

    def _finish(
        self,
        job: _Job,
        output: list[dict[str, Any]],
        errors: list[dict[str, Any]],
        status: Status,
    ) -> None:
        """End ``job`` with ``status``, writing its non-empty result files."""
        job.output_file_id = self._result_file(job, "output", output)
        job.error_file_id = self._result_file(job, "error", errors)
        job.completed, job.failed = len(output), len(errors)
        job.requests = []
        self._move(job, status)

    def _result_file(self, job: _Job, kind: str, lines: list[dict[str, Any]]) -> str | None:
        """The id of a new file holding ``lines`` as JSONL, or ``None`` when there are none."""
        if not lines:
            return None
        content = b"".join(orjson.dumps(line) + b"\n" for line in lines)
        return self._add_file("batch_output", f"{job.id}_{kind}.jsonl", content).id

    def _end_stamp(self, job: _Job) -> int:
        return int(job.created + self._delay)

    def _move(self, job: _Job, status: Status) -> None:
        job.status = status


class _FailureDraw:
    """Whether a request inside a job fails (see the module docstring)."""

    def __init__(self, seed: int, rate: float) -> None:
        self._draws = Draws(seed)
        self._rate = rate

    def fails(self, line: bytes) -> bool:
        """Draw for ``line``, this time it is run: ``True`` with probability ``rate``."""
        if self._rate == 0.0:
            return False
        return self._draws.uniforms(b"batch\0" + line)[0] < self._rate


async def read_upload(request: web.BaseRequest) -> Upload:
    """The ``purpose`` and ``file`` fields of a multipart upload; 400 when malformed."""
    if request.content_type != "multipart/form-data":
        raise BatchError(400, "Upload the file as multipart/form-data.")
    fields: dict[str, bytes] = {}
    filename = "upload.jsonl"
    try:
        async for part in await request.multipart():
            if isinstance(part, BodyPartReader) and part.name in ("purpose", "file"):
                fields[part.name] = await _read_part(part)
                if part.name == "file":
                    filename = part.filename or filename
    except (ValueError, RuntimeError) as exc:
        raise BatchError(400, "The multipart body is malformed.") from exc
    if "file" not in fields or "purpose" not in fields:
        raise BatchError(400, "Both 'purpose' and 'file' are required.", "missing_parameter")
    purpose = fields["purpose"].decode("utf-8", errors="replace")
    return Upload(purpose=purpose, filename=filename, content=fields["file"])


async def _read_part(part: BodyPartReader) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk():
        data += chunk
        if len(data) > _MAX_FILE_BYTES:
            raise BatchError(400, f"A file may hold at most {_MAX_FILE_BYTES} bytes.")
    return bytes(data)


def _job_request(body: bytes) -> tuple[str, dict[str, str] | None]:
    """The input file id and metadata of a ``POST /v1/batches`` body; 400 when malformed."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BatchError(400, "The body is not valid JSON.") from None
    if not isinstance(request, dict):
        raise BatchError(400, "The body must be a JSON object.")
    input_file_id = request.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise BatchError(400, "input_file_id must be a file id.", "missing_required_parameter")
    if request.get("endpoint") != CHAT_ENDPOINT:
        raise BatchError(400, f"endpoint must be {CHAT_ENDPOINT} (the only one mocked).")
    if request.get("completion_window") != _COMPLETION_WINDOW:
        raise BatchError(400, f"completion_window must be {_COMPLETION_WINDOW!r}.")
    return input_file_id, _metadata(request.get("metadata"))


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    valid = isinstance(value, dict) and len(value) <= _MAX_METADATA_PAIRS
    if not valid or not all(isinstance(v, str) for v in value.values()):
        message = f"metadata must be an object of at most {_MAX_METADATA_PAIRS} strings."
        raise BatchError(400, message)
    return dict(value)


def _parse_input(content: bytes) -> tuple[list[_Request], list[dict[str, Any]]]:
    """The requests of an input file, or the errors (one per bad line) that fail its job.

    Blank lines are skipped; lines are numbered from 1 as they stand in the file.
    """
    requests: list[_Request] = []
    errors: list[dict[str, Any]] = []
    custom_ids: set[str] = set()
    for number, line in enumerate(content.split(b"\n"), start=1):
        if not line.strip():
            continue
        parsed = _parse_line(line.strip())
        if isinstance(parsed, _Request) and parsed.custom_id in custom_ids:
            parsed = _Invalid("duplicate_custom_id", f"custom_id {parsed.custom_id!r} repeats.")
        if isinstance(parsed, _Invalid):
            errors.append({**parsed._asdict(), "param": None, "line": number})
            continue
        custom_ids.add(parsed.custom_id)
        requests.append(parsed)
    if not requests and not errors:
        message = "The file holds no requests."
        errors.append({"code": "empty_file", "message": message, "param": None, "line": None})
    return requests, errors


def _parse_line(line: bytes) -> _Request | _Invalid:
    """The request on one line of an input file, or what is wrong with it."""
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError:
        return _Invalid("invalid_json_line", "This line is not valid JSON.")
    if not isinstance(document, dict):
        return _Invalid("invalid_json_line", "This line is not a JSON object.")
    custom_id = document.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _Invalid("invalid_custom_id", "custom_id must be a non-empty string.")
    if document.get("method") != "POST":
        return _Invalid("invalid_method", "method must be POST.")
    if document.get("url") != CHAT_ENDPOINT:
        return _Invalid("invalid_url", f"url must be {CHAT_ENDPOINT}, the batch's endpoint.")
    body = document.get("body")
    if not isinstance(body, dict):
        return _Invalid("invalid_body", "body must be a JSON object.")
    return _Request(custom_id, body, line)


def _response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": _new_id("req_"), "body": body}


def _result_line(
    custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None
) -> dict[str, Any]:
    """A line of an output or error file."""
    return {
        "id": _new_id("batch_req_"),
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def _new_id(prefix: str) -> str:
    """A fresh id: unique across servers, so an id from another server is never found here."""
    return prefix + uuid.uuid4().hex[:24]
