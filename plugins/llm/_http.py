"""A lean HTTP/1.1 client for one API origin.

An LLM node at high concurrency is bound by its client's CPU per request, and
aiohttp's client spends about 140 µs on each one; this client spends about 60
(``benchmarks/llm_enrichment.py`` prints the comparison).  It does what an API client
needs and nothing more: keep-alive connections to one origin, over TCP or TLS; request
bodies as bytes; responses parsed by llhttp (through ``httptools``), framed by
``Content-Length``, chunked, or read until the server closes; ``gzip`` and ``deflate``
bodies decoded; one deadline per request that covers connecting, sending and the whole
answer; an HTTP proxy if one is given (``_proxy.py``: plain requests in absolute form,
TLS through a ``CONNECT`` tunnel).  No redirects, no cookies.

A connection carries one request at a time.  Bounding concurrency is the caller's job
(the endpoint's ``max_in_flight`` slot); the client keeps at most ``max_idle`` idle
connections for reuse.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import httptools

from ._headers import header_line, header_value
from ._proxy import Proxy, open_tunnel

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "BadResponse",
    "ConnectionClosed",
    "FormField",
    "HttpClient",
    "HttpProtocolError",
    "HttpResponse",
    "multipart",
]


class HttpProtocolError(Exception):
    """The exchange broke at the HTTP level (the answer is missing or unreadable)."""


class ConnectionClosed(HttpProtocolError):
    """The server closed the connection before its answer was complete."""


class BadResponse(HttpProtocolError):
    """The server's answer is not valid HTTP/1.1, or its body cannot be decoded."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete answer.  Header names are lower-cased; a repeated header keeps its
    last value."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class FormField:
    """One part of a ``multipart/form-data`` body: a value, or a file when it has a
    ``filename``."""

    name: str
    value: bytes
    filename: str | None = None
    content_type: str | None = None


def multipart(fields: Sequence[FormField]) -> tuple[bytes, str]:
    """The ``multipart/form-data`` body of ``fields`` and its content type."""
    boundary = secrets.token_hex(16)
    parts: list[bytes] = []
    for field in fields:
        disposition = f'form-data; name="{_quoted(field.name)}"'
        if field.filename is not None:
            disposition += f'; filename="{_quoted(field.filename)}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if field.content_type is not None:
            head += f"Content-Type: {header_value('content-type', field.content_type)}\r\n"
        parts += (head.encode(), b"\r\n", field.value, b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _quoted(text: str) -> str:
    """``text`` inside a quoted header parameter (the browsers' escaping of a form)."""
    return text.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class _Connection(asyncio.Protocol):
    """One keep-alive connection: sends a request, collects its answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        #: The server may take another request on it once this answer is complete.
        self.reusable = False
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[HttpResponse] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False

    def send(self, request: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[HttpResponse]:
        """Write ``request``; its answer comes in the future returned."""
        assert self.transport is not None
        self._answer = answer = loop.create_future()
        self._headers, self._body, self._headers_done = {}, [], False
        self.reusable = False
        self.transport.write(request)
        return answer

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def transport_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def time_out(self, seconds: float) -> None:
        self._fail(TimeoutError(f"no complete answer within {seconds} s"))
        self.close()

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"the answer is not valid HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and self._reads_until_close():
            self.on_message_complete()
            return
        reason = f" ({exc})" if exc is not None else ""
        self._fail(ConnectionClosed(f"the server closed the connection before answering{reason}"))

    # -- httptools callbacks -----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        answer, self._answer = self._answer, None
        self._headers_done = False
        if answer is None or answer.done():  # nothing asked for it (or it timed out)
            return
        self.reusable = not self.closed and self._parser.should_keep_alive()
        headers = self._headers
        try:
            body = _decoded(b"".join(self._body), headers.get("content-encoding"))
        except (zlib.error, BadResponse) as exc:
            answer.set_exception(BadResponse(f"the answer's body cannot be decoded: {exc}"))
            return
        answer.set_result(HttpResponse(self._parser.get_status_code(), headers, body))

    # ----------------------------------------------------------------------------------

    def _reads_until_close(self) -> bool:
        """The answer has neither a length nor chunks: its body ends where the
        connection does."""
        return "content-length" not in self._headers and "transfer-encoding" not in self._headers

    def _fail(self, exc: BaseException) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(exc)


def _decoded(body: bytes, encoding: str | None) -> bytes:
    if encoding is None or encoding == "identity" or not body:
        return body
    if encoding == "gzip":
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise BadResponse(f"unsupported content-encoding {encoding!r}")


class HttpClient:
    """Requests to the origin of ``base_url`` over a pool of keep-alive connections.

    Every request's target is ``base_url``'s path followed by the target given.
    ``headers`` go with every request.  With a ``proxy``, connections go through it.
    :meth:`aclose` closes every connection, busy or idle (a request still waiting fails
    with :class:`ConnectionClosed`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        max_idle: int,
        ssl_context: ssl.SSLContext | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"a base URL takes no query or fragment: {base_url!r}")
        tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if tls else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if tls else None
        self._prefix = parts.path.rstrip("/")
        host = parts.netloc.rpartition("@")[2]
        lines = [f"host: {host}\r\n"]
        lines += (header_line(name, value) for name, value in headers.items())
        self._proxy = proxy
        if proxy is not None and not tls:  # a forward proxy takes the whole URL, and its key
            self._prefix = f"http://{host}{self._prefix}"
            lines.append(proxy.authorization)
        self._head = "".join(lines).encode("latin-1")
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        #: Every open connection, idle or busy (no more than the requests at once).
        self._open: set[_Connection] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        *,
        content_type: str | None = None,
        limit_seconds: float,
    ) -> HttpResponse:
        """Send one request and return its complete answer, whatever its status.

        Raises :class:`TimeoutError` past ``limit_seconds``, :class:`OSError` when no
        connection can be made, and :class:`HttpProtocolError` when the answer is cut
        short or unreadable.  The connection is reused only after a complete answer.
        """
        if self._closed:
            raise RuntimeError("the HTTP client is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_seconds
        connection = self._idle_connection()
        if connection is None:
            with anyio.fail_after(limit_seconds):
                connection = await self._connect(loop)
        head = f"{method} {self._prefix}{target} HTTP/1.1\r\n"
        if body is not None:
            if content_type is not None:
                head += f"content-type: {content_type}\r\n"
            head += f"content-length: {len(body)}\r\n"
        message = b"%s%s\r\n%s" % (head.encode("latin-1"), self._head, body or b"")
        answer = connection.send(message, loop)
        timer = loop.call_at(deadline, connection.time_out, limit_seconds)
        try:
            response = await answer
        except BaseException:  # timed out, cut short or cancelled: the stream is unusable
            self._discard(connection)
            raise
        finally:
            timer.cancel()
        if connection.reusable and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            self._discard(connection)
        return response

    async def aclose(self) -> None:
        self._closed = True
        self._idle.clear()
        for connection in list(self._open):
            self._discard(connection)

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # the most recent: least likely timed out
            if not connection.closed and not connection.transport_closing():
                return connection
            self._open.discard(connection)
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        proxy = self._proxy
        if proxy is None:
            _, connection = await loop.create_connection(
                _Connection,
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        elif self._ssl is None:
            _, connection = await loop.create_connection(_Connection, proxy.host, proxy.port)
        else:
            connection = await open_tunnel(
                loop, proxy, self._host, self._port, _Connection, self._ssl
            )
        self._open.add(connection)
        return connection

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)
