"""A TCP server on 127.0.0.1 that speaks whatever bytes a test gives it.

The mock LLM server is well-behaved HTTP; these servers are not: interim ``1xx``
answers, bytes after the answer, endless headers and bodies, a SOCKS proxy.  Each
connection is handed to the test's handler, with helpers to read one request.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import orjson
from anyio.streams.buffered import BufferedByteReceiveStream

Handler = Callable[["Connection"], Awaitable[None]]

_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")


@dataclass
class Request:
    head: bytes
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def prompt(self) -> str:
        """The last message's content of a chat completion request."""
        return str(self.json["messages"][-1]["content"])


@dataclass
class Connection:
    stream: anyio.abc.ByteStream
    reader: BufferedByteReceiveStream

    async def request(self) -> Request | None:
        """The next request on this connection (``None`` once the client closed it)."""
        try:
            head = await self.reader.receive_until(b"\r\n\r\n", 1 << 20)
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
            return None
        match = _LENGTH.search(head)
        length = int(match.group(1)) if match else 0
        body = await self.reader.receive_exactly(length) if length else b""
        return Request(head, body)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)


@dataclass
class RawServer:
    """Where the server listens, and what it saw."""

    port: int
    connections: int = 0
    requests: list[Request] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    """Serve ``handler`` on every connection to a free port of 127.0.0.1."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    server = RawServer(port)

    async def serve(stream: anyio.abc.SocketStream) -> None:
        server.connections += 1
        async with stream:
            try:
                await handler(Connection(stream, BufferedByteReceiveStream(stream)))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
                return  # the client hung up: what a misbehaving server often earns

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def chat_answer(content: str) -> bytes:
    """The JSON body of a chat completion whose answer is ``content``."""
    return orjson.dumps(
        {
            "id": "chatcmpl-raw",
            "object": "chat.completion",
            "model": "mock-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }
    )


def response(body: bytes, *, status: str = "200 OK", headers: bytes = b"") -> bytes:
    """A complete HTTP/1.1 answer framed by ``Content-Length``."""
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status.encode(),
        len(body),
        headers,
        body,
    )
