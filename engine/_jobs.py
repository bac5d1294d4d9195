"""Jobs of a concurrent node, handed from its feeder to whichever worker is idle.

A memory object stream would do, but a worker that finds it empty pays a scheduler
round-trip and a new waiter on every ``receive`` — at concurrency 256, with a job per
row, more CPU than the rest of a row's hand-offs together.  Here an idle worker waits on
one event and is handed the next job directly.  The queue itself needs no bound: the
feeder puts a job only after the node's release window admitted its rows, and the
window holds at most ``max_pending``.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

__all__ = ["Jobs"]

T = TypeVar("T")


class Jobs(Generic[T]):
    """One feeder :meth:`put`\\ s jobs, any number of workers :meth:`get` them."""

    __slots__ = ("_closed", "_idle", "_waiting")

    def __init__(self) -> None:
        self._waiting: deque[T] = deque()
        #: One event per worker waiting for a job, the longest-waiting first.
        self._idle: deque[anyio.Event] = deque()
        self._closed = False

    def put(self, job: T) -> None:
        """Hand ``job`` to a worker (never waits)."""
        if self._closed:
            raise RuntimeError("put() after close()")
        self._waiting.append(job)
        if self._idle:
            self._idle.popleft().set()

    def close(self) -> None:
        """No more jobs: :meth:`get` returns ``None`` once the waiting ones are taken."""
        self._closed = True
        while self._idle:
            self._idle.popleft().set()

    async def get(self) -> T | None:
        """The next job, waiting while there is none; ``None`` once closed and empty."""
        while True:
            if self._waiting:
                return self._waiting.popleft()
            if self._closed:
                return None
            wake = anyio.Event()
            self._idle.append(wake)
            try:
                await wake.wait()
            except BaseException:  # cancelled: a later job must not wake this worker
                if not wake.is_set():
                    self._idle.remove(wake)
                elif self._waiting and self._idle:
                    # Woken for a job it will not take: the next idle worker takes it.
                    self._idle.popleft().set()
                raise
