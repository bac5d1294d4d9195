"""The endpoints' HTTP layer (httpx) against servers that misbehave, byte by byte.

Each test stands for a failure of the hand-written client httpx replaced: answers
shifted by interim ``1xx`` responses or by bytes after an answer, unbounded headers and
bodies, header injection through settings, ``NO_PROXY`` ranges and SOCKS proxies.  The
rows' answers are checked against their own prompts: an answer on the wrong row is the
worst failure an audit product can have.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from engine import ConfigError, Pipeline
from tests._read import read_jsonl

from ._raw_server import Connection, chat_answer, raw_server, response
from .conftest import llm_node, pipeline, tickets
from .test_llm_faults import calls_by_row, flat

Run = Callable[..., Any]

TEXT_ANSWER = {"response_format": "text", "output_field": "answer", "json_schema": None}


def echo(prompt: str) -> str:
    return f"echo: {prompt}"


def config(base_url: str, out: Path, rows: int, **endpoint_options: Any) -> dict[str, Any]:
    return pipeline(
        base_url,
        tickets(rows),
        out,
        transforms=[llm_node(options=TEXT_ANSWER)],
        endpoint_options=endpoint_options,
    )


def assert_own_answers(out: Path, rows: int) -> None:
    """Every row reached the output with the answer to its own prompt."""
    written = read_jsonl(out / "out.jsonl")
    assert sorted(row["id"] for row in written) == list(range(rows))
    for row in written:
        assert row["answer"] == echo(f"Ticket {row['id']}: {row['text']}"), row


async def echo_each_request(
    connection: Connection, before: bytes = b"", after: bytes = b""
) -> None:
    """Answer every request on the connection with its own prompt, framed by ``before``
    and ``after`` (what a misbehaving server adds)."""
    while (request := await connection.request()) is not None:
        await connection.send(before + response(chat_answer(echo(request.prompt))) + after)


# -- answers stay on their rows -------------------------------------------------------


async def test_interim_1xx_answers_are_skipped_and_every_row_keeps_its_own_answer(
    run_verified: Run, tmp_path: Path
) -> None:
    early_hints = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
    keep_going = b"HTTP/1.1 100 Continue\r\n\r\n"

    async def handler(connection: Connection) -> None:
        await echo_each_request(connection, before=early_hints + keep_going)

    async with raw_server(handler) as server:
        result = await run_verified(config(server.base_url, tmp_path, 200))
    assert result.outcomes.get("completed") == 200
    assert_own_answers(tmp_path, 200)
    assert not (tmp_path / "errors.jsonl").exists() or read_jsonl(tmp_path / "errors.jsonl") == []


async def test_bytes_after_an_answer_never_become_the_next_answer(
    run_verified: Run, tmp_path: Path
) -> None:
    stray = response(chat_answer("a stray answer"))

    async def handler(connection: Connection) -> None:
        await echo_each_request(connection, after=stray)

    async with raw_server(handler) as server:
        await run_verified(config(server.base_url, tmp_path, 100, max_in_flight=4))
    written = read_jsonl(tmp_path / "out.jsonl")
    assert all(row["answer"] != "a stray answer" for row in written)
    assert_own_answers(tmp_path, 100)


# -- size caps ------------------------------------------------------------------------


def _endless_chunks(chunk: bytes) -> Callable[[Connection], Any]:
    async def handler(connection: Connection) -> None:
        await connection.request()
        await connection.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        while True:
            await connection.send(frame)

    return handler


def _gzip_bomb(inflated: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(inflated >> 20)) + packer.flush()


def _answer_with(head: bytes, body: bytes = b"{}") -> Callable[[Connection], Any]:
    async def handler(connection: Connection) -> None:
        await connection.request()
        await connection.send(head + b"content-length: %d\r\n\r\n" % len(body) + body)

    return handler


HOSTILE_ANSWERS: dict[str, Callable[[], Callable[[Connection], Any]]] = {
    "200,000 headers": lambda: _answer_with(b"HTTP/1.1 200 OK\r\n" + b"x-h: v\r\n" * 200_000),
    "a 64 MB header": lambda: _answer_with(
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (64 << 20) + b"\r\n"
    ),
    "an endless body": lambda: _endless_chunks(b"x" * (1 << 20)),
    "a declared 1 GiB body": lambda: _answer_with(
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % (1 << 30)
    ),
    "a gzip body inflating to 256 MiB": lambda: _answer_with(
        b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\n", _gzip_bomb(256 << 20)
    ),
}


@pytest.mark.parametrize("answer", list(HOSTILE_ANSWERS))
async def test_an_oversized_answer_is_that_calls_error_and_the_run_goes_on(
    answer: str, run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    handler = HOSTILE_ANSWERS[answer]()
    async with raw_server(handler) as server:
        result = await run_verified(
            config(server.base_url, tmp_path, 1, max_attempts=1, max_response_bytes=8 << 20)
        )
    assert [row["id"] for row in read_jsonl(tmp_path / "errors.jsonl")] == [0]
    assert not (tmp_path / "out.jsonl").exists() or read_jsonl(tmp_path / "out.jsonl") == []
    [call] = flat(await calls_by_row(sqlite_url, result.run_id))
    assert call["status"] == "error"
    assert call["error"]["type"] != "Timeout", call["error"]


async def test_a_body_over_the_cap_is_refused_while_it_streams(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    async with raw_server(_endless_chunks(b"x" * 65536)) as server:
        result = await run_verified(
            config(server.base_url, tmp_path, 1, max_attempts=1, max_response_bytes=1 << 20)
        )
    [call] = flat(await calls_by_row(sqlite_url, result.run_id))
    assert call["error"]["type"] == "ResponseTooLarge"
    assert "1,048,576 bytes" in call["error"]["message"]


# -- settings cannot inject headers ---------------------------------------------------


@pytest.mark.parametrize("key", ["deployment", "api_version"])
def test_a_line_break_in_an_azure_url_part_is_refused_before_the_run(
    key: str, tmp_path: Path
) -> None:
    azure = {
        "provider": "azure_openai",
        "endpoint": "https://example.openai.azure.com",
        "deployment": "gpt",
        "api_version": "2024-10-21",
        key: "x\r\nx-injected: 1",
    }
    cfg = pipeline("http://127.0.0.1:9/v1", tickets(1), tmp_path)
    cfg["endpoints"] = {"local": azure}
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_dict(cfg, base_dir=tmp_path)
    assert f"endpoints.local.{key}" in str(raised.value)


# -- proxies --------------------------------------------------------------------------


#: The request lines a forward proxy was sent, across its connections.
PROXIED: list[bytes] = []


async def _answer_as_proxy(connection: Connection) -> None:
    while (request := await connection.request()) is not None:
        PROXIED.append(request.head.split(b"\r\n", 1)[0])
        await connection.send(response(chat_answer("via the proxy")))


async def test_a_no_proxy_cidr_range_reaches_its_hosts_directly(
    run_verified: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with raw_server(_answer_as_proxy) as proxy, raw_server(echo_each_request) as server:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("no_proxy", "10.0.0.0/8, 127.0.0.0/8")
        await run_verified(config(server.base_url, tmp_path, 5))
    assert proxy.connections == 0
    assert_own_answers(tmp_path, 5)


async def test_without_no_proxy_the_environments_proxy_carries_the_requests(
    run_verified: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with raw_server(_answer_as_proxy) as proxy, raw_server(echo_each_request) as server:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("no_proxy", "10.0.0.0/8")
        await run_verified(config(server.base_url, tmp_path, 5))
    assert server.connections == 0
    assert {row["answer"] for row in read_jsonl(tmp_path / "out.jsonl")} == {"via the proxy"}
    target = f"POST {server.base_url}/chat/completions HTTP/1.1".encode()
    assert PROXIED[-5:] == [target] * 5


async def _socks5(connection: Connection, seen: list[tuple[str, int]]) -> None:
    """A SOCKS5 proxy without authentication that relays one CONNECT."""
    reader = connection.reader
    _version, methods = await reader.receive_exactly(2)
    await reader.receive_exactly(methods)
    await connection.send(b"\x05\x00")
    _version, command, _reserved, kind = await reader.receive_exactly(4)
    assert command == 1, "CONNECT"
    if kind == 1:
        host = ".".join(str(b) for b in await reader.receive_exactly(4))
    elif kind == 3:
        host = (await reader.receive_exactly((await reader.receive_exactly(1))[0])).decode()
    else:
        raise AssertionError(f"address type {kind}")
    port = int.from_bytes(await reader.receive_exactly(2), "big")
    seen.append((host, port))
    async with await anyio.connect_tcp(host, port) as target:
        await connection.send(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")

        async def upstream() -> None:
            async for data in reader:
                await target.send(data)
            await target.send_eof()

        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream)
            async for data in target:
                await connection.send(data)
            tg.cancel_scope.cancel()


async def test_a_socks_proxy_carries_the_requests(
    run_verified: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int]] = []

    async def socks(connection: Connection) -> None:
        await _socks5(connection, seen)

    async with raw_server(socks) as proxy, raw_server(echo_each_request) as server:
        monkeypatch.setenv("all_proxy", f"socks5://127.0.0.1:{proxy.port}")
        await run_verified(config(server.base_url, tmp_path, 5))
    assert seen
    assert {port for _host, port in seen} == {server.port}
    assert_own_answers(tmp_path, 5)


# -- a caller's own client or transport -----------------------------------------------


class _Transport(httpx.MockTransport):
    """A mock transport that answers each prompt with its echo and counts its closes."""

    def __init__(self, seen: list[httpx.Request]) -> None:
        def answer(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            prompt = json.loads(request.content)["messages"][-1]["content"]
            return httpx.Response(200, content=chat_answer(echo(prompt)))

        super().__init__(answer)
        self.closed = 0

    async def aclose(self) -> None:
        self.closed += 1


async def test_a_callers_transport_carries_the_calls_and_is_left_open(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    seen: list[httpx.Request] = []
    transport = _Transport(seen)
    cfg = config("http://llm.invalid/v1", tmp_path, 8)
    result = await run_verified(cfg, http_clients={"local": transport})
    assert transport.closed == 0  # the caller's to close
    assert_own_answers(tmp_path, 8)
    assert len(seen) == 8
    assert {str(r.url) for r in seen} == {"http://llm.invalid/v1/chat/completions"}
    calls = flat(await calls_by_row(sqlite_url, result.run_id))
    assert [c["status"] for c in calls] == ["success"] * 8


async def test_a_callers_client_is_used_for_every_run_and_never_closed(
    run_verified: Run, tmp_path: Path
) -> None:
    seen: list[httpx.Request] = []
    async with httpx.AsyncClient(transport=_Transport(seen)) as client:
        for run in range(2):
            out = tmp_path / str(run)
            out.mkdir()
            await run_verified(
                config("http://llm.invalid/v1", out, 3), http_clients={"local": client}
            )
            assert not client.is_closed
            assert_own_answers(out, 3)
    assert len(seen) == 6


def test_a_client_for_an_unknown_endpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_dict(
            config("http://llm.invalid/v1", tmp_path, 1),
            http_clients={"elsewhere": httpx.MockTransport(lambda r: httpx.Response(500))},
        )
    assert "elsewhere" in str(raised.value)


async def test_a_cookie_set_by_the_server_is_never_sent_back(
    run_verified: Run, tmp_path: Path
) -> None:
    heads: list[bytes] = []

    async def handler(connection: Connection) -> None:
        while (request := await connection.request()) is not None:
            heads.append(request.head.lower())
            answer = chat_answer(echo(request.prompt))
            await connection.send(response(answer, headers=b"set-cookie: session=abc; Path=/\r\n"))

    async with raw_server(handler) as server:
        await run_verified(config(server.base_url, tmp_path, 6, max_in_flight=1))
    assert len(heads) == 6
    assert not any(b"\r\ncookie:" in head for head in heads)
    assert_own_answers(tmp_path, 6)
