"""What the mock LLM server has seen: live counters and the frozen record ``/stats`` reports.

Only API requests (chat completions, embeddings, files and batches) are counted, never
``/stats`` itself.  A request is *in flight* from the moment its headers are parsed until
its response is sent or its connection is gone, so hanging requests count for as long as
they hang.  The requests inside a batch job are not requests to the server (nor
responses by status); their chat answers count in the prompt counters like any other.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._mock_settings import Fault

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["MockStats", "StatsCounter"]


@dataclass(frozen=True, slots=True)
class MockStats:
    """A snapshot of a mock server's counters (see :meth:`to_json` for ``/stats``)."""

    requests: int
    requests_by_path: Mapping[str, int]
    #: Statuses of the responses sent; hangs and resets send none.
    responses_by_status: Mapping[int, int]
    in_flight: int
    #: The most requests in flight at once since start (or since the last reset).
    max_in_flight: int
    faults_injected: Mapping[Fault, int]
    #: Chat requests whose prompt was a batch, and the rows they held together.
    batch_requests: int
    batch_rows: int
    #: The batch jobs the server holds, by their current status.  Like ``in_flight`` this
    #: describes the server now, so a reset leaves it alone.
    batch_jobs: Mapping[str, int]
    #: Distinct chat prompts (their messages) answered 200, and 200 answers to a prompt
    #: answered before (what a resumed run that re-asks would show).
    prompts_answered: int = 0
    repeated_answers: int = 0
    #: Batch jobs created and files uploaded (not the output files the server writes).
    batches_created: int = 0
    files_uploaded: int = 0
    #: Requests inside batch jobs answered 200 (the lines of their output files).
    batch_requests_answered: int = 0

    def to_json(self) -> dict[str, Any]:
        """The JSON document of ``GET /stats`` (statuses become string keys)."""
        return {
            "requests": self.requests,
            "requests_by_path": dict(self.requests_by_path),
            "responses_by_status": {str(k): v for k, v in self.responses_by_status.items()},
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "faults_injected": {str(k): v for k, v in self.faults_injected.items()},
            "batch_requests": self.batch_requests,
            "batch_rows": self.batch_rows,
            "batch_jobs": dict(self.batch_jobs),
            "prompts_answered": self.prompts_answered,
            "repeated_answers": self.repeated_answers,
            "batches_created": self.batches_created,
            "files_uploaded": self.files_uploaded,
            "batch_requests_answered": self.batch_requests_answered,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MockStats:
        """The record :meth:`to_json` made (for a client reading ``/stats`` over HTTP)."""
        return cls(
            requests=data["requests"],
            requests_by_path=MappingProxyType(dict(data["requests_by_path"])),
            responses_by_status=MappingProxyType(
                {int(k): v for k, v in data["responses_by_status"].items()}
            ),
            in_flight=data["in_flight"],
            max_in_flight=data["max_in_flight"],
            faults_injected=MappingProxyType(
                {Fault(k): v for k, v in data["faults_injected"].items()}
            ),
            batch_requests=data["batch_requests"],
            batch_rows=data["batch_rows"],
            batch_jobs=MappingProxyType(dict(data["batch_jobs"])),
            prompts_answered=data.get("prompts_answered", 0),
            repeated_answers=data.get("repeated_answers", 0),
            batches_created=data.get("batches_created", 0),
            files_uploaded=data.get("files_uploaded", 0),
            batch_requests_answered=data.get("batch_requests_answered", 0),
        )


class StatsCounter:
    """The live counters behind :class:`MockStats` (one event loop, so no locking)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.reset()

    def reset(self) -> None:
        """Zero every counter; requests in flight stay counted."""
        self.requests = 0
        self.by_path: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.max_in_flight = self.in_flight
        self.faults: Counter[Fault] = Counter()
        self.batch_requests = 0
        self.batch_rows = 0
        self.batches_created = 0
        self.files_uploaded = 0
        self.batch_requests_answered = 0
        # A digest per distinct prompt: a test server's memory, grown by what it is asked.
        self.answered: set[bytes] = set()
        self.repeated_answers = 0

    def begin(self, path: str) -> None:
        """A request to ``path`` has arrived and is now in flight."""
        self.requests += 1
        self.by_path[path] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self._waiters:
            self._wake()

    def answered_prompt(self, digest: bytes) -> None:
        """A chat prompt with this digest was answered 200."""
        if digest in self.answered:
            self.repeated_answers += 1
        else:
            self.answered.add(digest)

    def end(self) -> None:
        """A request is answered or abandoned."""
        self.in_flight -= 1
        if self._waiters:
            self._wake()

    async def wait_in_flight(self, count: int) -> None:
        """Return once exactly ``count`` requests are in flight (at once if they are now)."""
        if self.in_flight == count:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((count, waiter))
        try:
            await waiter
        finally:
            self._waiters.remove((count, waiter))

    def _wake(self) -> None:
        for count, waiter in self._waiters:
            if count == self.in_flight and not waiter.done():
                waiter.set_result(None)

    def snapshot(self, batch_jobs: Mapping[str, int]) -> MockStats:
        """The counters as they are now, with the batch jobs held by status."""
        return MockStats(
            requests=self.requests,
            requests_by_path=MappingProxyType(dict(self.by_path)),
            responses_by_status=MappingProxyType(dict(self.by_status)),
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            faults_injected=MappingProxyType(dict(self.faults)),
            batch_requests=self.batch_requests,
            batch_rows=self.batch_rows,
            batch_jobs=MappingProxyType(dict(batch_jobs)),
            prompts_answered=len(self.answered),
            repeated_answers=self.repeated_answers,
            batches_created=self.batches_created,
            files_uploaded=self.files_uploaded,
            batch_requests_answered=self.batch_requests_answered,
        )
