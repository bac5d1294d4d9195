"""The LLM endpoints' HTTP client against a real TCP server on 127.0.0.1.

The server here answers each request with scripted raw bytes, so every framing an
answer can have (length, chunks, read until close), every way it can break (cut short,
garbage, silence, a dropped idle connection) and TLS are exercised on real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.llm import Endpoint, EndpointSettings
from plugins.llm._http import (
    BadResponse,
    ConnectionClosed,
    FormField,
    HttpClient,
    multipart,
)
from plugins.llm._proxy import Proxy, ProxyError, environment_proxy
from plugins.protocols import CallList

#: Writes one answer; returns False to close the connection after it.
Reply = Callable[[asyncio.StreamWriter], Awaitable[bool]]


def answer(body: bytes = b'{"ok": true}', *, status: str = "200 OK", headers: str = "") -> Reply:
    """A complete answer framed by Content-Length."""

    async def write(writer: asyncio.StreamWriter) -> bool:
        head = f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n{headers}\r\n"
        writer.write(head.encode() + body)
        return "connection: close" not in headers.lower()

    return write


def raw(data: bytes, *, close: bool = True, pieces: list[int] | None = None) -> Reply:
    """Exactly ``data`` (in pieces of the given sizes, each flushed on its own)."""

    async def write(writer: asyncio.StreamWriter) -> bool:
        start = 0
        for size in pieces or []:
            writer.write(data[start : start + size])
            await writer.drain()
            await asyncio.sleep(0)
            start += size
        writer.write(data[start:])
        await writer.drain()
        return not close

    return write


def silence() -> Reply:
    async def write(writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(3600)
        return False

    return write


@dataclass
class ScriptedServer:
    replies: list[Reply]
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    connections: int = 0
    url: str = ""
    #: Set once a request has arrived, and once a connection has been closed.
    asked: asyncio.Event = field(default_factory=asyncio.Event)
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                self.asked.set()
                if not await self.replies.pop(0)(writer):
                    return
        finally:
            writer.close()
            await writer.wait_closed()
            self.hung_up.set()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer([])
    listener = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    scripted.url = f"http://127.0.0.1:{port}/v1"
    async with listener:
        yield scripted
        listener.close()


def client_for(url: str, **headers: str) -> HttpClient:
    return HttpClient(url, headers=headers, max_idle=4)


async def test_sends_target_headers_and_body_and_reuses_the_connection(
    server: ScriptedServer,
) -> None:
    server.replies = [answer(b"one"), answer(b"two", status="429 Too Many Requests")]
    client = client_for(server.url, authorization="Bearer k")
    first = await client.request(
        "POST", "/chat?x=1", b'{"a": 1}', content_type="application/json", limit_seconds=5
    )
    second = await client.request("GET", "/models", limit_seconds=5)
    await client.aclose()

    assert (first.status, first.body) == (200, b"one")
    assert (second.status, second.body) == (429, b"two")
    assert first.headers["content-length"] == "3"
    assert server.connections == 1
    head, body = server.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat?x=1 HTTP/1.1"
    sent = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    assert sent["host"] == server.url.split("/")[2]
    assert sent["authorization"] == "Bearer k"
    assert sent["content-type"] == "application/json"
    assert (sent["content-length"], body) == ("8", b'{"a": 1}')
    assert server.requests[1][0].startswith(b"GET /v1/models HTTP/1.1\r\n")
    assert b"content-length" not in server.requests[1][0]


async def test_chunked_and_read_until_close_bodies(server: ScriptedServer) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    until_close = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nthe rest"
    server.replies = [raw(chunked, close=False), raw(until_close), answer(b"after")]
    client = client_for(server.url)
    assert (await client.request("GET", "/a", limit_seconds=5)).body == b"hello world"
    assert (await client.request("GET", "/b", limit_seconds=5)).body == b"the rest"
    assert (await client.request("GET", "/c", limit_seconds=5)).body == b"after"
    await client.aclose()
    assert server.connections == 2  # the read-until-close answer used up its connection


async def test_connection_close_is_honoured(server: ScriptedServer) -> None:
    server.replies = [answer(headers="connection: close\r\n"), answer()]
    client = client_for(server.url)
    for _ in range(2):
        assert (await client.request("GET", "/", limit_seconds=5)).status == 200
    await client.aclose()
    assert server.connections == 2


async def test_an_idle_connection_the_server_dropped_is_not_used(server: ScriptedServer) -> None:
    server.replies = [raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", close=True), answer()]
    client = client_for(server.url)
    assert (await client.request("GET", "/", limit_seconds=5)).body == b"ok"
    await server.hung_up.wait()
    await asyncio.sleep(0.05)  # the hang-up reaches the client while its connection is idle
    assert (await client.request("GET", "/", limit_seconds=5)).status == 200
    await client.aclose()
    assert server.connections == 2


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [
        (raw(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\ncut"), ConnectionClosed, "closed"),
        (raw(b""), ConnectionClosed, "before answering"),
        (raw(b"SMTP ready\r\n\r\n"), BadResponse, "not valid HTTP"),
        (
            answer(b"not gzip", headers="content-encoding: gzip\r\n"),
            BadResponse,
            "cannot be decoded",
        ),
        (answer(b"x", headers="content-encoding: br\r\n"), BadResponse, "'br'"),
    ],
    ids=["truncated", "no-answer", "garbage", "bad-gzip", "unknown-encoding"],
)
async def test_broken_answers_raise_and_the_client_recovers(
    server: ScriptedServer, reply: Reply, error: type[Exception], message: str
) -> None:
    server.replies = [reply, answer(b"fine")]
    client = client_for(server.url)
    with pytest.raises(error, match=message):
        await client.request("GET", "/", limit_seconds=5)
    assert (await client.request("GET", "/", limit_seconds=5)).body == b"fine"
    await client.aclose()


async def test_gzip_and_deflate_bodies_are_decoded(server: ScriptedServer) -> None:
    server.replies = [
        answer(gzip.compress(b"zipped"), headers="content-encoding: gzip\r\n"),
        answer(zlib.compress(b"deflated"), headers="content-encoding: deflate\r\n"),
    ]
    client = client_for(server.url)
    assert (await client.request("GET", "/", limit_seconds=5)).body == b"zipped"
    assert (await client.request("GET", "/", limit_seconds=5)).body == b"deflated"
    await client.aclose()


async def test_a_silent_server_times_out_and_its_connection_is_dropped(
    server: ScriptedServer,
) -> None:
    server.replies = [silence(), answer(b"late but fine")]
    client = client_for(server.url)
    with pytest.raises(TimeoutError, match=r"0\.2 s"):
        await client.request("GET", "/", limit_seconds=0.2)
    assert (await client.request("GET", "/", limit_seconds=5)).body == b"late but fine"
    await client.aclose()
    assert server.connections == 2


async def test_a_cancelled_request_drops_its_connection(server: ScriptedServer) -> None:
    server.replies = [silence(), answer()]
    client = client_for(server.url)
    task = asyncio.ensure_future(client.request("GET", "/", limit_seconds=60))
    await server.asked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await client.request("GET", "/", limit_seconds=5)).status == 200
    await client.aclose()
    assert server.connections == 2


async def test_closing_fails_a_waiting_request_and_refuses_new_ones(
    server: ScriptedServer,
) -> None:
    server.replies = [silence()]
    client = client_for(server.url)
    task = asyncio.ensure_future(client.request("GET", "/", limit_seconds=60))
    await server.asked.wait()
    await client.aclose()
    with pytest.raises(ConnectionClosed):
        await task
    with pytest.raises(RuntimeError, match="closed"):
        await client.request("GET", "/", limit_seconds=5)


async def test_no_server_is_an_os_error() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    client = client_for(f"http://127.0.0.1:{port}")
    with pytest.raises(OSError):
        await client.request("GET", "/", limit_seconds=5)
    await client.aclose()


def test_bad_urls_and_header_injection_are_refused_without_the_value() -> None:
    with pytest.raises(ValueError, match="not an http"):
        HttpClient("ftp://example.com", headers={}, max_idle=1)
    with pytest.raises(ValueError, match="no query"):
        HttpClient("http://example.com/v1?key=1", headers={}, max_idle=1)
    with pytest.raises(ValueError, match="'authorization'") as refused:
        HttpClient("http://example.com", headers={"authorization": "sk-1\r\nx: y"}, max_idle=1)
    assert "sk-1" not in str(refused.value)
    with pytest.raises(ValueError, match="not a valid header name"):
        HttpClient("http://example.com", headers={"x-a: b\r\nx-c": "d"}, max_idle=1)
    with pytest.raises(ValueError, match="set by the HTTP client"):
        HttpClient("http://example.com", headers={"Content-Length": "3"}, max_idle=1)


async def test_tls(tmp_path: object) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    scripted = ScriptedServer([answer(b"secure"), answer(b"again")])
    listener = await asyncio.start_server(scripted.handle, "127.0.0.1", 0, ssl=server_context)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        client = HttpClient(
            f"https://127.0.0.1:{port}/v1", headers={}, max_idle=2, ssl_context=client_context
        )
        assert (await client.request("GET", "/", limit_seconds=5)).body == b"secure"
        assert (await client.request("GET", "/", limit_seconds=5)).body == b"again"
        await client.aclose()
        untrusting = HttpClient(f"https://127.0.0.1:{port}", headers={}, max_idle=1)
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusting.request("GET", "/", limit_seconds=5)
        await untrusting.aclose()
        listener.close()
    assert scripted.connections >= 1


def test_multipart_reads_back_as_the_fields_given() -> None:
    body, content_type = multipart(
        [
            FormField("purpose", b"batch"),
            FormField(
                "file", b'{"a": 1}\n', filename='my "jobs".jsonl', content_type="application/jsonl"
            ),
        ]
    )
    message = BytesParser(policy=HTTP).parsebytes(
        f"content-type: {content_type}\r\n\r\n".encode() + body
    )
    parts = list(message.iter_parts())
    assert [part.get_param("name", header="content-disposition") for part in parts] == [
        "purpose",
        "file",
    ]
    assert parts[0].get_payload(decode=True) == b"batch"
    assert parts[1].get_filename() == "my %22jobs%22.jsonl"
    assert parts[1].get_content_type() == "application/jsonl"
    assert parts[1].get_payload(decode=True) == b'{"a": 1}\n'


FRAMINGS = ["length", "chunked", "close"]


@settings(max_examples=40, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    framing=st.sampled_from(FRAMINGS),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=12),
)
def test_any_framing_in_any_pieces_reads_back_whole(
    bodies: list[bytes], framing: str, cuts: list[int]
) -> None:
    async def scenario() -> list[bytes]:
        def framed(body: bytes) -> bytes:
            if framing == "length":
                return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            if framing == "chunked":
                chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
                encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
                return (
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                    + encoded
                    + b"0\r\n\r\n"
                )
            return b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + body

        scripted = ScriptedServer(
            [raw(framed(body), close=framing == "close", pieces=cuts) for body in bodies]
        )
        listener = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener:
            client = client_for(f"http://127.0.0.1:{port}")
            got = [(await client.request("GET", "/", limit_seconds=5)).body for _ in bodies]
            await client.aclose()
            listener.close()
        return got

    assert asyncio.run(scenario()) == bodies


# -- proxies ------------------------------------------------------------------------------


@dataclass
class TunnelProxy:
    """A proxy that answers CONNECT with ``answer`` and, on a 200, pipes both ways."""

    answer: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"
    asked: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.asked.append(head)
        writer.write(self.answer)
        await writer.drain()
        if not self.answer.startswith(b"HTTP/1.1 200"):
            writer.close()
            return
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            finally:
                sink.close()

        await asyncio.gather(
            pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True
        )


def _authority() -> tuple[trustme.CA, ssl.SSLContext, ssl.SSLContext]:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    return authority, server_context, client_context


async def test_plain_requests_go_to_a_forward_proxy_in_absolute_form(
    server: ScriptedServer,
) -> None:
    server.replies = [answer(b"proxied")]
    proxy = Proxy.from_url(server.url.replace("http://", "http://user:s3cret@"))
    client = HttpClient("http://api.example:8080/v1", headers={}, max_idle=1, proxy=proxy)
    assert (await client.request("GET", "/models", limit_seconds=5)).body == b"proxied"
    await client.aclose()
    head = server.requests[0][0].decode()
    assert head.startswith("GET http://api.example:8080/v1/models HTTP/1.1\r\n")
    assert "host: api.example:8080\r\n" in head
    assert f"proxy-authorization: Basic {base64.b64encode(b'user:s3cret').decode()}" in head


async def test_tls_goes_through_a_connect_tunnel() -> None:
    _, server_context, client_context = _authority()
    scripted = ScriptedServer([answer(b"through the tunnel"), answer(b"again")])
    tunnel = TunnelProxy()
    endpoint = await asyncio.start_server(scripted.handle, "127.0.0.1", 0, ssl=server_context)
    relay = await asyncio.start_server(tunnel.handle, "127.0.0.1", 0)
    port = endpoint.sockets[0].getsockname()[1]
    relay_port = relay.sockets[0].getsockname()[1]
    async with endpoint, relay:
        client = HttpClient(
            f"https://127.0.0.1:{port}/v1",
            headers={},
            max_idle=1,
            ssl_context=client_context,
            proxy=Proxy.from_url(f"http://user:s3cret@127.0.0.1:{relay_port}"),
        )
        got = [(await client.request("GET", "/m", limit_seconds=5)).body for _ in range(2)]
        await client.aclose()
        endpoint.close()
        relay.close()
    assert got == [b"through the tunnel", b"again"]
    assert len(tunnel.asked) == 1  # one tunnel, kept alive for both requests
    assert tunnel.asked[0].startswith(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n".encode())
    assert b"proxy-authorization: Basic " in tunnel.asked[0]
    assert scripted.requests[0][0].startswith(b"GET /v1/m HTTP/1.1\r\n")


async def test_a_refused_tunnel_is_a_proxy_error_without_the_credentials() -> None:
    tunnel = TunnelProxy(answer=b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    relay = await asyncio.start_server(tunnel.handle, "127.0.0.1", 0)
    relay_port = relay.sockets[0].getsockname()[1]
    async with relay:
        client = HttpClient(
            "https://api.example/v1",
            headers={},
            max_idle=1,
            proxy=Proxy.from_url(f"http://user:s3cret@127.0.0.1:{relay_port}"),
        )
        with pytest.raises(ProxyError, match="407") as refused:
            await client.request("GET", "/m", limit_seconds=5)
        await client.aclose()
        relay.close()
    assert "s3cret" not in str(refused.value)


def test_the_environment_names_the_proxy_unless_no_proxy_names_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://user:p%40ss@proxy.corp:3128")
    monkeypatch.setenv("HTTP_PROXY", "proxy.corp")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,.internal")
    secure = environment_proxy("https://api.openai.com/v1")
    assert secure is not None
    assert (secure.host, secure.port) == ("proxy.corp", 3128)
    assert (
        secure.authorization
        == f"proxy-authorization: Basic {base64.b64encode(b'user:p@ss').decode()}\r\n"
    )
    assert "p%40ss" not in repr(secure)
    assert "dXNlcj" not in repr(secure)
    plain = environment_proxy("http://api.example/v1")
    assert plain is not None
    assert (plain.host, plain.port, plain.authorization) == ("proxy.corp", 80, "")
    assert environment_proxy("http://127.0.0.1:8765/v1") is None
    assert environment_proxy("https://llm.internal/v1") is None
    monkeypatch.delenv("HTTPS_PROXY")
    assert environment_proxy("https://api.openai.com/v1") is None
    monkeypatch.setenv("all_proxy", "http://fallback:8080")  # lower case, for any scheme
    fallback = environment_proxy("https://api.openai.com/v1")
    assert fallback is not None
    assert (fallback.host, fallback.port) == ("fallback", 8080)
    monkeypatch.setenv("https_proxy", "http://lower:3129")
    lower = environment_proxy("https://api.openai.com/v1")
    assert lower is not None
    assert (lower.host, lower.port) == ("lower", 3129)


def test_a_proxy_that_is_not_http_is_refused_without_its_credentials() -> None:
    with pytest.raises(ValueError, match="http:// URL") as refused:
        Proxy.from_url("socks5://user:s3cret@proxy.corp:1080")
    assert "s3cret" not in str(refused.value)


async def test_an_endpoint_goes_through_the_proxy_the_environment_names(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.replies = [answer(b'{"choices": []}')]
    monkeypatch.setenv("HTTP_PROXY", server.url.removesuffix("/v1"))
    endpoint = Endpoint("e", EndpointSettings(base_url="http://api.example/v1"), Path("."))
    await endpoint.open()
    calls = CallList()
    got = await endpoint.post("/chat/completions", {"model": "m"}, calls=calls, call_type="llm")
    await endpoint.aclose()
    assert got == {"choices": []}
    assert server.requests[0][0].startswith(b"POST http://api.example/v1/chat/completions ")
    assert [call.status for call in calls.calls] == ["success"]
