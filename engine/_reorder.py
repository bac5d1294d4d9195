"""The release window of a concurrent node: bounded, releasing in arrival order.

A feeder :meth:`~ReleaseWindow.admit`\\ s each arriving item and gets its sequence
number; workers :meth:`~ReleaseWindow.complete` items in any order; the emitter takes
them from :meth:`~ReleaseWindow.release` strictly in sequence order (or in completion
order when ``ordered=False``) and calls :meth:`~ReleaseWindow.free` once it has passed
one on.  Items admitted but not yet freed — in flight plus waiting behind a slow head —
never exceed ``max_pending``, so a slow row costs a bounded amount of memory however
long the input is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio

__all__ = ["ReleaseWindow", "WindowStatistics"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WindowStatistics:
    """``pending`` = admitted and not freed; ``ready`` = completed, not yet released."""

    max_pending: int
    pending: int
    ready: int


class ReleaseWindow(Generic[T]):
    """Sequence numbers in, results out in order, at most ``max_pending`` outstanding."""

    def __init__(self, max_pending: int, *, ordered: bool = True) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._max_pending = max_pending
        self._ordered = ordered
        self._slots = anyio.Semaphore(max_pending)
        self._admitted = 0
        self._released = 0
        self._by_seq: dict[int, T] = {}
        self._completed: deque[T] = deque()
        self._changed = anyio.Event()
        self._closed = False

    async def admit(self) -> int:
        """Wait for room in the window; return the next sequence number."""
        if self._closed:
            raise RuntimeError("admit() after close()")
        try:  # no scheduler round-trip while there is room (see engine._streams)
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._slots.acquire()
        seq = self._admitted
        self._admitted += 1
        return seq

    def has_room(self) -> bool:
        """Whether :meth:`admit` would return without waiting."""
        return self._slots.value > 0

    def complete(self, seq: int, item: T) -> None:
        """Hand in the result for ``seq`` (each admitted sequence exactly once)."""
        if self._ordered:
            self._by_seq[seq] = item
            if seq == self._released:
                self._changed.set()
        else:
            self._completed.append(item)
            self._changed.set()

    def close(self) -> None:
        """No more admissions: :meth:`release` returns ``None`` once all are released."""
        self._closed = True
        self._changed.set()

    async def release(self) -> T | None:
        """The next result to pass on, or ``None`` when closed and fully released."""
        while True:
            item = self._take()
            if item is not None:
                return item
            if self._closed and self._released == self._admitted:
                return None
            await self._changed.wait()
            self._changed = anyio.Event()

    def free(self) -> None:
        """Give back the slot of a released item once it has been passed on."""
        self._slots.release()

    def statistics(self) -> WindowStatistics:
        pending = self._max_pending - self._slots.value
        return WindowStatistics(
            self._max_pending, pending, len(self._by_seq) + len(self._completed)
        )

    def _take(self) -> T | None:
        if self._ordered:
            if self._released not in self._by_seq:
                return None
            item = self._by_seq.pop(self._released)
        elif self._completed:
            item = self._completed.popleft()
        else:
            return None
        self._released += 1
        return item
