"""How the mock LLM server draws each request's fate, and how it misbehaves on the wire.

A request's fate (its latency, the request fault that replaces its answer if any, and
the batch faults) is drawn from a BLAKE2b hash keyed by the seed, of the request body and
the number of times that same body arrived before.  Bodies are remembered by a 16-byte
digest; the memory is cleared after a million distinct bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from hashlib import blake2b
from typing import TYPE_CHECKING

from aiohttp import web

from ._mock_answers import BatchDisorder
from ._mock_settings import BATCH_FAULTS, REQUEST_FAULTS, Fault, FixedLatency

if TYPE_CHECKING:
    from ._mock_settings import MockSettings

__all__ = ["Dice", "Draws", "Fate", "close_after", "malformed", "reset", "send_truncated"]

_MAX_REMEMBERED = 1_000_000
_NO_DISORDER = BatchDisorder()


@dataclass(frozen=True, slots=True)
class Fate:
    """What happens to one request."""

    latency: float
    fault: Fault | None = None
    disorder: BatchDisorder = _NO_DISORDER


class Draws:
    """Numbers drawn from a BLAKE2b hash keyed by the seed, of a body and the number of
    times that same body was drawn for before (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        self._key = seed.to_bytes(16, "little", signed=True)
        self._seen: dict[bytes, int] = {}

    def uniforms(self, body: bytes) -> tuple[float, ...]:
        """Eight numbers strictly between 0 and 1."""
        digest = blake2b(body, key=self._key, digest_size=16).digest()
        seen = self._seen.get(digest, 0)
        if len(self._seen) >= _MAX_REMEMBERED:
            self._seen.clear()
        self._seen[digest] = seen + 1
        draw = blake2b(digest + seen.to_bytes(8, "little"), key=self._key).digest()
        return tuple(((word >> 11) + 0.5) / 2**53 for word in struct.unpack("<8Q", draw))


class Dice:
    """Draws request fates for one server's settings (see the module docstring)."""

    def __init__(self, settings: MockSettings) -> None:
        self._draws = Draws(settings.seed)
        self._latency = settings.latency
        self._thresholds: list[tuple[float, Fault]] = []
        total = 0.0
        for fault in REQUEST_FAULTS:
            if settings.rate(fault) > 0:
                total += settings.rate(fault)
                self._thresholds.append((total, fault))
        self._shuffle_rate = settings.rate(Fault.SHUFFLED_ANSWERS)
        self._wrong_count_rate = settings.rate(Fault.WRONG_ANSWER_COUNT)
        has_faults = any(settings.rate(fault) > 0 for fault in REQUEST_FAULTS + BATCH_FAULTS)
        self._constant: Fate | None = None
        if isinstance(settings.latency, FixedLatency) and not has_faults:
            self._constant = Fate(settings.latency.seconds)

    def roll(self, body: bytes) -> Fate:
        """The fate of a request with this ``body``, this time it arrives."""
        if self._constant is not None:
            return self._constant
        u = self._draws.uniforms(body)
        fault = next((fault for bound, fault in self._thresholds if u[0] < bound), None)
        disorder = _NO_DISORDER
        if u[1] < self._shuffle_rate or u[2] < self._wrong_count_rate:
            disorder = BatchDisorder(
                shuffle=u[1] < self._shuffle_rate,
                wrong_count=u[2] < self._wrong_count_rate,
                seed=int(u[5] * 2**53),
            )
        return Fate(self._latency.sample(u[3], u[4]), fault, disorder)


def malformed(body: bytes) -> bytes:
    """The first half of a JSON document: never valid JSON itself."""
    return body[: len(body) // 2]


async def send_truncated(request: web.BaseRequest, body: bytes) -> web.StreamResponse:
    """Promise all of ``body`` in ``Content-Length``, send half of it, close the connection."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.close()
    return response


def reset(request: web.BaseRequest) -> None:
    """Drop the connection with a TCP reset (``SO_LINGER`` 0), sending nothing."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def close_after(request: web.BaseRequest, seconds: float, closing: asyncio.Event) -> None:
    """Hang: answer nothing for ``seconds`` (or until the server closes), then close.

    A client that gives up first closes the connection, which cancels the request's
    handler and ends the wait at once.
    """
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closing.wait(), seconds)
    if request.transport is not None:
        request.transport.close()
