"""The bounded streams between nodes, used without a scheduler round-trip per row.

anyio's ``send``/``receive`` checkpoint on every call; a node handling a stream of
cheap rows would then switch tasks once per row per hop.  :class:`Inbox` and
:class:`Outbox` take the ``*_nowait`` path while a stream has items or room and only
await when they must, so rows move in natural bursts of up to the buffer size while
every buffer stays bounded.  End of input is the stream closing (anyio's
``EndOfStream``): a node's inbox ends when the last of its producers closed its clone.

A burst is bounded in time as well: once a node's task has held the event loop for its
time slice (``runtime.time_slice_ms``) since it last let other tasks run, its next send
waits as if the buffer were full (anyio's ``send``, a checkpoint), so the loop's other
tasks — an embedding service's request handlers — get their turn every slice.
"""

from __future__ import annotations

import asyncio
import math
from time import perf_counter
from typing import TYPE_CHECKING, Final
from weakref import WeakKeyDictionary

import anyio.lowlevel
from anyio import EndOfStream, WouldBlock

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from ._tokens import Token

__all__ = ["Inbox", "Outbox"]


class _Turns:
    """One event loop's turns, counted while nodes send.

    The first send of a turn queues :meth:`advance`, which runs once the loop has run
    what was queued before it: a task that sent in one turn and then waited for anything
    at all resumes in a later turn (the loop's ready queue is first in, first out), so a
    node's step is the sends it makes within one turn.
    """

    __slots__ = ("_loop", "_pending", "count")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.count = 0
        self._loop = loop
        self._pending = False

    def mark(self) -> None:
        """Count the turn under way (once): the next one begins when this one ends."""
        if not self._pending and self._loop is not None:
            self._loop.call_soon(self.advance)
            self._pending = True

    def advance(self) -> None:
        self.count += 1
        self._pending = False


_TURNS: WeakKeyDictionary[asyncio.AbstractEventLoop, _Turns] = WeakKeyDictionary()
#: Where no asyncio loop runs (trio): its count never moves, so no slice ever ends.
_UNCOUNTED: Final = _Turns(None)


def _turns() -> _Turns:
    """The running loop's turn counter."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return _UNCOUNTED
    turns = _TURNS.get(loop)
    if turns is None:
        turns = _TURNS[loop] = _Turns(loop)
    return turns


class Inbox:
    """A node's input: the receive end of its one bounded stream."""

    __slots__ = ("_stream",)

    def __init__(self, stream: MemoryObjectReceiveStream[Token]) -> None:
        self._stream = stream

    async def receive(self) -> Token | None:
        """The next token — at once when one is buffered or a producer waits — or
        ``None`` once every producer has closed."""
        try:
            return self._stream.receive_nowait()
        except WouldBlock:
            pass
        except EndOfStream:
            return None
        try:
            return await self._stream.receive()
        except EndOfStream:
            return None

    def receive_nowait(self) -> Token | None:
        """The next token if one is buffered, else ``None`` (never waits).

        Raises :class:`anyio.EndOfStream` when every producer has closed.
        """
        try:
            return self._stream.receive_nowait()
        except WouldBlock:
            return None

    def queue_depth(self) -> int:
        return self._stream.statistics().current_buffer_used

    def close(self) -> None:
        self._stream.close()


class Outbox:
    """A node's outputs: one cloned send end per consumer node it routes to."""

    __slots__ = ("_step_began", "_streams", "_time_slice", "_turn", "_turns")

    def __init__(
        self, streams: Mapping[str, MemoryObjectSendStream[Token]], *, time_slice: float
    ) -> None:
        """``time_slice``: seconds of work after which the node lets other tasks run at
        its next send (0: never, until a buffer is full)."""
        self._streams = dict(streams)
        self._time_slice = time_slice if time_slice > 0 else math.inf
        #: The loop's turn counter (taken at the first send), the turn of the current
        #: step's first send, and when it was made.
        self._turns: _Turns | None = None
        self._turn = -1
        self._step_began = 0.0

    async def send(self, target: str, token: Token) -> None:
        """Hand ``token`` to node ``target``, waiting only while its buffer is full or
        once the node has used up its time slice."""
        stream = self._streams[target]
        if self._within_slice():
            try:
                stream.send_nowait(token)
            except WouldBlock:
                pass
            else:
                return
        # anyio's send lets the loop's other tasks run first (a checkpoint).
        await stream.send(token)

    async def yield_if_due(self) -> None:
        """Let the loop's other tasks run if this node has used up its time slice.

        For a node's long stretches of work between sends.  Not a cancellation point:
        a stretch that must finish once begun (recording a write's outcomes) may call it.
        """
        if not self._within_slice():
            await anyio.lowlevel.cancel_shielded_checkpoint()

    def _within_slice(self) -> bool:
        turns = self._turns
        if turns is None:
            turns = self._turns = _turns() if self._time_slice < math.inf else _UNCOUNTED
        if self._turn == turns.count:
            return turns is _UNCOUNTED or perf_counter() - self._step_began < self._time_slice
        turns.mark()
        self._turn = turns.count
        self._step_began = perf_counter()
        return True

    def close(self) -> None:
        """Close every output: each consumer sees end of input once all its producers did."""
        for stream in self._streams.values():
            stream.close()
