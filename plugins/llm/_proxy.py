"""Reaching an endpoint through an HTTP proxy: which proxy the environment names, and
the ``CONNECT`` tunnel that carries TLS through it.

The environment is read as curl and httpx read it: ``HTTPS_PROXY`` for ``https``
endpoints, ``HTTP_PROXY`` for ``http`` ones, ``ALL_PROXY`` for both, and ``NO_PROXY``
naming the hosts that are reached directly.  A proxy is an ``http://`` URL, with
credentials if it asks for them; they travel only in the ``Proxy-Authorization``
header and appear in no message.
"""

from __future__ import annotations

import asyncio
import base64
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

__all__ = ["Proxy", "ProxyError", "environment_proxy", "open_tunnel"]

P = TypeVar("P", bound=asyncio.Protocol)

#: The longest answer to CONNECT read before giving up on the proxy.
_MAX_TUNNEL_ANSWER = 64 * 1024


class ProxyError(OSError):
    """The proxy would not, or could not, connect us to the endpoint."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy; ``authorization`` is its ``Proxy-Authorization`` header line (with
    its line end), empty when it takes no credentials."""

    host: str
    port: int
    authorization: str = field(default="", repr=False)

    @classmethod
    def from_url(cls, url: str) -> Proxy:
        """The proxy of ``http://[user:password@]host[:port]`` (the scheme may be left out).

        Raises :class:`ValueError`, naming the URL without its credentials.
        """
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            shown = f"{parts.scheme}://{parts.hostname or ''}"
            raise ValueError(f"a proxy must be an http:// URL with a host, not {shown}")
        authorization = ""
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            token = base64.b64encode(credentials.encode()).decode("ascii")
            authorization = f"proxy-authorization: Basic {token}\r\n"
        return cls(parts.hostname, parts.port or 80, authorization)


def environment_proxy(url: str) -> Proxy | None:
    """The proxy the environment names for ``url``, or ``None`` when it names none or
    ``NO_PROXY`` names the host."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    chosen = proxies.get(parts.scheme) or proxies.get("all")
    if not chosen or not parts.hostname:
        return None
    if urllib.request.proxy_bypass(parts.hostname):
        return None
    return Proxy.from_url(chosen)


async def open_tunnel(
    loop: asyncio.AbstractEventLoop,
    proxy: Proxy,
    host: str,
    port: int,
    protocol_factory: Callable[[], P],
    ssl_context: ssl.SSLContext,
) -> P:
    """A TLS connection to ``host:port`` through a ``CONNECT`` tunnel of ``proxy``,
    handed to a protocol made by ``protocol_factory`` (its ``connection_made`` called).

    Raises :class:`ProxyError` when the proxy refuses or drops the tunnel.
    """
    transport, tunnel = await loop.create_connection(_Tunnel, proxy.host, proxy.port)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        await tunnel.establish(authority, proxy.authorization, loop)
        protocol = protocol_factory()
        tls = await loop.start_tls(transport, protocol, ssl_context, server_hostname=host)
    except BaseException:
        transport.close()
        raise
    if tls is None:
        raise ProxyError("the proxy closed the tunnel during the TLS handshake")
    protocol.connection_made(tls)
    return protocol


class _Tunnel(asyncio.Protocol):
    """A connection to a proxy until it answers ``CONNECT``."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[None] | None = None
        self._received = bytearray()

    async def establish(
        self, authority: str, authorization: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        assert self._transport is not None
        self._answer = loop.create_future()
        request = f"CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n{authorization}\r\n"
        self._transport.write(request.encode("latin-1"))
        await self._answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._received += data
        end = self._received.find(b"\r\n\r\n")
        if end < 0:
            if len(self._received) > _MAX_TUNNEL_ANSWER:
                self._settle(ProxyError("the proxy's answer to CONNECT has no end"))
            return
        status_line = bytes(self._received[: self._received.find(b"\r\n")])
        version, _, rest = status_line.partition(b" ")
        if version.startswith(b"HTTP/1.") and rest[:1] == b"2":
            self._settle(None)
        else:
            shown = status_line[:200].decode("latin-1")
            self._settle(ProxyError(f"the proxy refused the tunnel: {shown}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(ProxyError("the proxy closed the connection before opening a tunnel"))

    def _settle(self, failure: ProxyError | None) -> None:
        answer, self._answer = self._answer, None
        if answer is None or answer.done():
            return
        if failure is None:
            answer.set_result(None)
        else:
            answer.set_exception(failure)
