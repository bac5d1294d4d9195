"""The time source of coalesce and aggregation timeouts.

Nodes never read the wall clock for their timeouts: they ask the run's :class:`Clock`
for ``now()`` and for a cancel scope that fires at a deadline, and wait for their next
input inside it.  :class:`SystemClock` uses the event loop's clock, so a timeout fires
on time even while no row arrives.  :class:`ManualClock` only moves when a test calls
:meth:`ManualClock.advance`, which makes timeout tests exact and instant.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Protocol

import anyio

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """Where a run's timeouts get their time from."""

    def now(self) -> float:
        """The current time in seconds (only differences are meaningful)."""
        ...

    def deadline_scope(self, deadline: float) -> AbstractContextManager[anyio.CancelScope]:
        """A cancel scope, entered, that is cancelled once ``now() >= deadline``.

        ``with clock.deadline_scope(d): await something()`` waits for something *or* the
        deadline, whichever comes first; ``math.inf`` never fires.
        """
        ...


class SystemClock:
    """The event loop's monotonic clock: deadlines are cancel-scope deadlines."""

    def now(self) -> float:
        return anyio.current_time()

    def deadline_scope(self, deadline: float) -> AbstractContextManager[anyio.CancelScope]:
        return anyio.CancelScope(deadline=deadline)


class ManualClock:
    """A clock that stands still until :meth:`advance` moves it (for tests).

    Scopes made by :meth:`deadline_scope` are cancelled by the :meth:`advance` that
    reaches their deadline, and forgotten once they are left.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._waiting: dict[anyio.CancelScope, float] = {}

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and fire every deadline now reached."""
        if not seconds >= 0:
            raise ValueError("a clock only moves forward")
        self._now += seconds
        for scope, deadline in list(self._waiting.items()):
            if deadline <= self._now:
                scope.cancel()

    @contextmanager
    def deadline_scope(self, deadline: float) -> Iterator[anyio.CancelScope]:
        with anyio.CancelScope() as scope:
            if deadline <= self._now:
                scope.cancel()
            self._waiting[scope] = deadline
            try:
                yield scope
            finally:
                del self._waiting[scope]
