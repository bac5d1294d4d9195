"""The HTTP client of an endpoint: httpx, on aiohttp's transport, with capped answers.

Every request goes through an :class:`httpx.AsyncClient`.  The one ledgerflow makes
for an endpoint carries HTTP/1.1 on the ``httpx-aiohttp`` transport (the transport the
OpenAI SDK offers for high concurrency): httpx's own connection pool spends about 10 ms
of CPU per request at 64 requests in flight on this project's benchmark host, against
under 1 ms on aiohttp's (``benchmarks/llm_enrichment.py`` prints both).  httpx still
decides the rest: proxies from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` and
``NO_PROXY``, certificates (``SSL_CERT_FILE``, ``SSL_CERT_DIR``), content decoding.
A SOCKS proxy is reached on httpx's own transport (aiohttp speaks no SOCKS).
``NO_PROXY`` CIDR ranges (``10.0.0.0/8``), which httpx reads as single addresses, are
matched against the endpoint's host when it is an IP address, as curl does.

A Python caller may hand in a client or a transport of their own (a corporate proxy,
mTLS, a custom CA, ``httpx.MockTransport`` in tests): :func:`endpoint_client`.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "HttpClientChoice",
    "ResponseTooLarge",
    "TransportFailure",
    "endpoint_client",
    "read_capped",
    "transport_failure",
]

#: What a caller may hand in for an endpoint: a whole client, or a transport for the
#: client ledgerflow makes.
HttpClientChoice = httpx.AsyncClient | httpx.AsyncBaseTransport

_SOCKS_SCHEMES = frozenset({"socks5", "socks5h"})


class ResponseTooLarge(Exception):
    """The answer's body is longer than the endpoint accepts."""


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """What went wrong below HTTP, as the call ledger records it."""

    type: str
    message: str
    timed_out: bool


def transport_failure(exc: Exception) -> TransportFailure:
    """The failure behind ``exc``, an httpx transport error (or an ``OSError``).

    ``httpx-aiohttp`` re-raises aiohttp's errors as httpx's, and maps a few coarsely (a
    connection reset becomes ``ConnectTimeout``): the aiohttp error it came from, when
    there is one, is what is recorded, and only a real timeout counts as one.
    """
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) else None
    root = cause if isinstance(cause, Exception) else exc
    timed_out = isinstance(root, TimeoutError | httpx.TimeoutException)
    return TransportFailure(type(root).__name__, str(root) or type(root).__name__, timed_out)


class _NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing and sends nothing: a request never depends on
    an earlier answer's cookies, which the call ledger would not show."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        """Keep none of the answer's cookies."""

    def add_cookie_header(self, request: Any) -> None:
        """Send no cookie."""


class _EndpointClient(HttpxAiohttpClient):
    """httpx's client on aiohttp transports, but SOCKS proxies on httpx's own."""

    def _init_proxy_transport(  # type: ignore[override]
        self, proxy: httpx.Proxy, **options: Any
    ) -> httpx.AsyncBaseTransport:
        if proxy.url.scheme in _SOCKS_SCHEMES:
            return httpx.AsyncHTTPTransport(proxy=proxy, **options)
        return AiohttpTransport(proxy=proxy, **options)


class _Borrowed(httpx.AsyncBaseTransport):
    """A caller's transport, used but never closed: it outlives the runs that use it."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        """Leave the transport open: its owner closes it."""


def endpoint_client(
    base_url: str,
    *,
    connections: int,
    headers: Mapping[str, str],
    given: HttpClientChoice | None = None,
) -> tuple[httpx.AsyncClient, bool]:
    """The client an endpoint at ``base_url`` calls through, and whether the endpoint
    owns it (and closes it when done).

    With no ``given`` client: httpx on aiohttp, at most ``connections`` connections,
    kept alive for reuse, sending ``headers`` with every request, no cookies.  A given transport is
    wrapped in such a client (and is not closed with it); a given client is used as it
    is (its headers are its own: the caller adds ``headers`` to each request).
    """
    if isinstance(given, httpx.AsyncClient):
        return given, False
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    if given is not None:
        client = httpx.AsyncClient(
            transport=_Borrowed(given), limits=limits, headers=headers, cookies=_NoCookies()
        )
        return client, True
    client = _EndpointClient(
        limits=limits, headers=headers, cookies=_NoCookies(), mounts=_direct_by_cidr(base_url)
    )
    return client, True


def _direct_by_cidr(url: str) -> Mapping[str, httpx.AsyncBaseTransport | None]:
    """A route around the proxy for ``url`` when its host is an IP address inside a
    ``NO_PROXY`` CIDR range (``None`` routes to the client's own transport)."""
    host = httpx.URL(url).host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return {}
    no_proxy = urllib.request.getproxies_environment().get("no", "")
    for entry in (part.strip() for part in no_proxy.split(",")):
        if "/" not in entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            continue
        if address in network:
            shown = f"[{host}]" if address.version == 6 else host
            return {f"all://{shown}": None}
    return {}


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """The decoded body of a streamed ``response``, refused past ``limit`` bytes.

    A ``Content-Length`` over the limit is refused before a byte is read; otherwise the
    body is counted as it is decoded, so a small compressed body that inflates past the
    limit is refused too.  Raises :class:`ResponseTooLarge`.
    """
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ResponseTooLarge(f"the answer declares {int(declared):,} bytes (limit {limit:,})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(f"the answer is longer than {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
