"""What an endpoint lets through: requests in flight, requests and tokens per minute,
and a circuit breaker that holds calls back (or fails them fast) while the endpoint is
down.

One :class:`EndpointLimiter` and one :class:`CircuitBreaker` exist per configured
endpoint and are shared by every node that calls it, so several LLM nodes together
stay inside the provider's limits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio

from plugins.protocols import StopRun

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "CircuitBreaker",
    "CircuitOpen",
    "EndpointDown",
    "EndpointLimiter",
    "Slot",
    "TokenBucket",
]


class TokenBucket:
    """A per-minute allowance refilled continuously (capacity: one minute's worth).

    :meth:`take` waits until the amount is available.  Takers are served in order, so
    a large request is not starved by small ones.  :meth:`refund` corrects an estimate
    once the real amount is known (a negative refund charges more).
    """

    def __init__(self, per_minute: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._level = self.capacity
        #: Set on first use: a pipeline is built before its event loop runs.
        self._stamp: float | None = None
        self._turn = anyio.Lock(fast_acquire=True)

    def _refill(self) -> None:
        now = anyio.current_time()
        if self._stamp is not None:
            self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: float) -> float:
        """Wait until ``amount`` (at most one minute's worth) is available and take it;
        returns what was taken."""
        amount = min(amount, self.capacity)  # a request larger than a minute still goes
        async with self._turn:
            self._refill()
            while self._level < amount:
                await anyio.sleep((amount - self._level) / self.rate)
                self._refill()
            self._level -= amount
        return amount

    def refund(self, amount: float) -> None:
        self._refill()
        self._level = min(self.capacity, self._level + amount)


class EndpointLimiter:
    """``max_in_flight`` concurrent requests, plus optional per-minute buckets."""

    def __init__(
        self,
        max_in_flight: int,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> None:
        self._slots = anyio.Semaphore(max_in_flight)
        self._requests = None if requests_per_minute is None else TokenBucket(requests_per_minute)
        self._tokens = None if tokens_per_minute is None else TokenBucket(tokens_per_minute)
        self.max_in_flight = max_in_flight

    @property
    def in_flight(self) -> int:
        return self.max_in_flight - self._slots.value

    def slot(self, estimated_tokens: int, admit: Callable[[], None] | None = None) -> Slot:
        """Hold one request slot for an ``async with`` block, which gets the object that
        takes the real token usage (see :meth:`acquire`)."""
        return Slot(self, estimated_tokens, admit)

    async def acquire(
        self, estimated_tokens: int, admit: Callable[[], None] | None = None
    ) -> UsageCorrection:
        """Take one request slot and the rate allowance of one request; :meth:`release`
        gives the slot back.

        ``admit`` runs once the slot is held and before any rate allowance is taken:
        if it raises (an open circuit breaker), the slot is released and the request
        used up no allowance.
        """
        try:
            # A free slot is taken without a scheduler round-trip or a cancellation
            # check (anyio's acquire makes both); the call that holds it awaits the
            # network at once anyway.
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._slots.acquire()
        try:
            if admit is not None:
                admit()
            if self._requests is not None:
                await self._requests.take(1)
            taken = 0.0
            if self._tokens is not None:
                taken = await self._tokens.take(estimated_tokens)
        except BaseException:
            self._slots.release()
            raise
        return UsageCorrection(self._tokens, taken)

    def release(self) -> None:
        self._slots.release()


class Slot:
    """One request's hold on an :class:`EndpointLimiter` (a class rather than a
    generator-based context manager: it is entered once per call on the hot path)."""

    __slots__ = ("_admit", "_estimated_tokens", "_limiter")

    def __init__(
        self, limiter: EndpointLimiter, estimated_tokens: int, admit: Callable[[], None] | None
    ) -> None:
        self._limiter = limiter
        self._estimated_tokens = estimated_tokens
        self._admit = admit

    async def __aenter__(self) -> UsageCorrection:
        return await self._limiter.acquire(self._estimated_tokens, self._admit)

    async def __aexit__(self, *exc_info: object) -> None:
        self._limiter.release()


class UsageCorrection:
    """Corrects the tokens-per-minute charge of one request by the usage it reported."""

    __slots__ = ("_bucket", "_taken")

    def __init__(self, bucket: TokenBucket | None, taken: float) -> None:
        self._bucket = bucket
        self._taken = taken

    def actual(self, tokens: int) -> None:
        """Charge ``tokens`` instead of what was taken up front (a refund or a debit)."""
        if self._bucket is not None:
            self._bucket.refund(self._taken - tokens)


class CircuitOpen(Exception):
    """The endpoint's breaker is open: the call was not attempted."""

    def __init__(self, endpoint: str, retry_in: float) -> None:
        super().__init__(
            f"circuit_open: endpoint '{endpoint}' failed repeatedly; retry in {retry_in:.1f} s"
        )
        self.retry_in = retry_in


class EndpointDown(StopRun):
    """The endpoint's breaker stayed open longer than ``max_outage_seconds``: the run
    stops gracefully, and the call's row is left for a resume."""

    def __init__(self, endpoint: str, down_for: float, limit: float) -> None:
        super().__init__(
            f"endpoint '{endpoint}' down: its circuit breaker has been open for "
            f"{down_for:.1f} s, longer than max_outage_seconds ({limit:g})"
        )
        self.endpoint = endpoint


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures, for ``reset_seconds``.

    After the reset time one probe is let through (half-open): its success closes the
    breaker, its failure opens it again.  While it is open, :meth:`before_call` refuses
    every call with :class:`CircuitOpen`; callers that ``wait`` (``on_open: wait``)
    first :meth:`wait_until_callable`, which returns once a call may go out and raises
    :class:`EndpointDown` once the outage — from the breaker opening until it closes
    again — has lasted longer than ``max_outage_seconds``.  The waits are driven by the
    reset time and by the breaker's changes (it opens, a probe ends), never by polling.
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int,
        reset_seconds: float,
        *,
        wait: bool = False,
        max_outage_seconds: float = math.inf,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        #: Whether callers wait while it is open (else they fail fast).
        self.wait = wait
        self.max_outage_seconds = max_outage_seconds
        self._failures = 0
        self._opened_at = -math.inf
        self._probing = False
        #: When the current outage began: the breaker opened after being closed.
        self._down_since: float | None = None
        #: Set (and forgotten) on the next change; made when someone waits for one.
        self._changed: anyio.Event | None = None

    @property
    def state(self) -> str:
        if self._failures < self.failure_threshold:
            return "closed"
        # The same comparison as wait_until_callable's: open until the reset time.
        if anyio.current_time() < self._opened_at + self.reset_seconds or self._probing:
            return "open"
        return "half_open"

    def before_call(self) -> None:
        """Raise :class:`CircuitOpen` unless a call may go out now."""
        state = self.state
        if state == "closed":
            return
        if state == "half_open":
            self._probing = True
            return
        retry_in = max(0.0, self._opened_at + self.reset_seconds - anyio.current_time())
        raise CircuitOpen(self.name, retry_in)

    async def wait_until_callable(self) -> None:
        """Wait until a call may go out (closed, or half-open with no probe out).

        Raises :class:`EndpointDown` once the outage has lasted ``max_outage_seconds``
        (at once if it already has).  Each wait ends at the reset time, the outage
        limit, or the breaker's next change, whichever comes first.
        """
        while (state := self.state) != "closed" and state != "half_open":
            now = anyio.current_time()
            assert self._down_since is not None, "an open breaker has an outage"
            limit = self._down_since + self.max_outage_seconds
            if now >= limit:
                raise EndpointDown(self.name, now - self._down_since, self.max_outage_seconds)
            reset_at = self._opened_at + self.reset_seconds
            # Open past the reset time means a probe is out: only its end changes anything.
            wake_at = min(limit, reset_at if now < reset_at else math.inf)
            if self._changed is None:
                self._changed = anyio.Event()
            with anyio.CancelScope(deadline=wake_at):
                await self._changed.wait()

    def succeeded(self) -> None:
        was_closed = self._failures < self.failure_threshold
        self._failures = 0
        self._probing = False
        self._down_since = None
        if not was_closed:
            self._notify()

    def abandoned(self) -> None:
        """A call let through ended without an answer either way (it was cancelled)."""
        if self._probing:
            self._probing = False
            self._notify()

    def failed(self) -> None:
        self._failures += 1
        probed = self._probing
        self._probing = False
        if self._failures >= self.failure_threshold:
            now = anyio.current_time()
            if self._down_since is None:
                self._down_since = now
            self._opened_at = now
            if probed or self._failures == self.failure_threshold:
                self._notify()

    def _notify(self) -> None:
        """Wake whoever waits for a change (their waits look at the state again)."""
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
