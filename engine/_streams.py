"""The bounded streams between nodes, used without a scheduler round-trip per row.

anyio's ``send``/``receive`` checkpoint on every call; a node handling a stream of
cheap rows would then switch tasks once per row per hop.  :class:`Inbox` and
:class:`Outbox` take the ``*_nowait`` path while a stream has items or room and only
await when they must, so rows move in natural bursts of up to the buffer size while
every buffer stays bounded.  End of input is the stream closing (anyio's
``EndOfStream``): a node's inbox ends when the last of its producers closed its clone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anyio import EndOfStream, WouldBlock

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from ._tokens import Token

__all__ = ["Inbox", "Outbox"]


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

    __slots__ = ("_streams",)

    def __init__(self, streams: Mapping[str, MemoryObjectSendStream[Token]]) -> None:
        self._streams = dict(streams)

    async def send(self, target: str, token: Token) -> None:
        """Hand ``token`` to node ``target``, waiting only while its buffer is full."""
        stream = self._streams[target]
        try:
            stream.send_nowait(token)
        except WouldBlock:
            await stream.send(token)

    def close(self) -> None:
        """Close every output: each consumer sees end of input once all its producers did."""
        for stream in self._streams.values():
            stream.close()
