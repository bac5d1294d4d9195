"""The mock LLM server, driven over real HTTP on 127.0.0.1 with ``httpx``."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import httpx_aiohttp
import pytest

from plugins.llm import (
    Fault,
    FixedLatency,
    LogNormalLatency,
    MockLlmServer,
    MockSettings,
    MockStats,
    UniformLatency,
    serve,
    settings_from_options,
)

TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["bug", "billing", "other"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "urgent": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
    },
    "required": ["label", "score", "priority", "urgent", "tags"],
    "additionalProperties": False,
}
PROMPTS = [f"Ticket {i}: {'printer ' * (i % 5)}broken" for i in range(12)]


@asynccontextmanager
async def running(
    settings: MockSettings | None = None, *, client_timeout: float = 5.0
) -> AsyncIterator[tuple[MockLlmServer, httpx.AsyncClient]]:
    """A server and a client pointed at its ``base_url``."""
    async with (
        MockLlmServer(settings) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=client_timeout) as client,
    ):
        yield server, client


def chat_body(
    prompt: str, response_format: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "mock-model",
        "messages": [
            {"role": "system", "content": "You label support tickets."},
            {"role": "user", "content": prompt},
        ],
        **extra,
    }
    if response_format is not None:
        body["response_format"] = response_format
    return body


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


def batch_prompt(prompts: list[str]) -> str:
    return json.dumps({"batch": [{"index": i, "prompt": p} for i, p in enumerate(prompts)]})


def batch_schema(row: dict[str, Any]) -> dict[str, Any]:
    item = {**row, "properties": {"index": {"type": "integer"}, **row["properties"]}}
    item["required"] = ["index", *row["required"]]
    return {"type": "object", "properties": {"answers": {"type": "array", "items": item}}}


async def content(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await client.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


def violations(
    value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$"
) -> list[str]:
    """Where ``value`` breaks ``schema`` (the subset of JSON Schema these tests use)."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/"):
            target = target[part]
        return violations(value, target, root, at)
    if "anyOf" in schema:
        options = [violations(value, option, root, at) for option in schema["anyOf"]]
        return [] if any(not found for found in options) else [f"{at}: matches no anyOf"]
    if "enum" in schema:
        return [] if value in schema["enum"] else [f"{at}: {value!r} not in enum"]
    check = _TYPE_CHECKS[schema.get("type", "object")]
    if not check(value):
        return [f"{at}: {value!r} is not {schema.get('type')}"]
    found = _bounds(value, schema, at)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        found += [f"{at}: missing {k}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            found += [f"{at}: extra {k}" for k in value if k not in properties]
        for key, sub in properties.items():
            if key in value:
                found += violations(value[key], sub, root, f"{at}.{key}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            found += violations(item, schema.get("items", {}), root, f"{at}[{i}]")
    return found


def _bounds(value: Any, schema: dict[str, Any], at: str) -> list[str]:
    size = len(value) if isinstance(value, str | list) else None
    tests = {
        "minimum": lambda v, b: v >= b,
        "maximum": lambda v, b: v <= b,
        "exclusiveMinimum": lambda v, b: v > b,
        "exclusiveMaximum": lambda v, b: v < b,
        "minItems": lambda v, b: size is not None and size >= b,
        "maxItems": lambda v, b: size is not None and size <= b,
        "minLength": lambda v, b: size is not None and size >= b,
        "maxLength": lambda v, b: size is not None and size <= b,
    }
    return [
        f"{at}: breaks {k}" for k, ok in tests.items() if k in schema and not ok(value, schema[k])
    ]


_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


# -- answers ----------------------------------------------------------------------------------


async def test_completion_has_the_openai_shape() -> None:
    async with running() as (_, client):
        response = await client.post("/chat/completions", json=chat_body("hello"))
    document = response.json()
    assert response.headers["content-type"] == "application/json"
    assert document["id"].startswith("chatcmpl-")
    assert document["model"] == "mock-model"
    [choice] = document["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    text = choice["message"]["content"]
    assert text.endswith(".")
    assert len(text.split()) >= 4
    usage = document["usage"]
    assert usage["completion_tokens"] == math.ceil(len(text) / 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_answers_depend_on_prompt_model_and_seed_only() -> None:
    async with (
        running(MockSettings(seed=1)) as (_, first),
        running(MockSettings(seed=1)) as (_, second),
    ):
        same = await content(first, chat_body("a ticket"))
        assert await content(second, chat_body("a ticket")) == same
        assert await content(first, chat_body("a ticket")) == same
        assert await content(first, chat_body("another ticket")) != same
        assert await content(first, chat_body("a ticket", model="other-model")) != same
    async with running(MockSettings(seed=2)) as (_, client):
        assert await content(client, chat_body("a ticket")) != same


async def test_a_json_object_request_gets_a_json_object() -> None:
    async with running() as (_, client):
        text = await content(client, chat_body("x", {"type": "json_object"}))
    assert isinstance(json.loads(text), dict)


SCHEMAS: list[dict[str, Any]] = [
    TICKET_SCHEMA,
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"$ref": "#/$defs/item"},
                "minItems": 2,
                "maxItems": 2,
            },
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]},
            "ratio": {"type": "number", "exclusiveMinimum": 0.5, "exclusiveMaximum": 0.5001},
            "count": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 5},
            "code": {"type": "string", "minLength": 30},
        },
        "required": ["items", "note", "ratio", "count", "code"],
        "$defs": {
            "item": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "when": {"type": "string"}},
                "required": ["name"],
            }
        },
    },
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 0},
]


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_json_schema_answers_validate(schema: dict[str, Any]) -> None:
    async with running() as (_, client):
        for prompt in PROMPTS:
            answer = json.loads(await content(client, chat_body(prompt, schema_format(schema))))
            assert violations(answer, schema, schema) == [], answer


async def test_string_formats_are_honoured() -> None:
    formats = ["date", "date-time", "email", "uuid", "uri"]
    schema = {"type": "object", "properties": {f: {"type": "string", "format": f} for f in formats}}
    async with running() as (_, client):
        answer = json.loads(await content(client, chat_body("x", schema_format(schema))))
    dt.date.fromisoformat(answer["date"])
    dt.datetime.fromisoformat(answer["date-time"])
    assert "@" in answer["email"]
    assert len(answer["uuid"]) == 36
    assert answer["uri"].startswith("https://")


async def test_an_unusable_schema_or_body_is_a_400() -> None:
    async with running() as (_, client):
        for body in (
            chat_body("x", schema_format({"type": "integer", "minimum": 5, "maximum": 1})),
            chat_body("x", {"type": "yaml"}),
            {"model": "m", "messages": []},
            {"model": "m", "messages": [{"role": "system", "content": "no user"}]},
            chat_body("x", stream=True),
        ):
            response = await client.post("/chat/completions", json=body)
            assert response.status_code == 400, body
            assert response.json()["error"]["message"]
        response = await client.post("/chat/completions", content=b"{not json")
        assert response.status_code == 400


async def test_max_tokens_cuts_the_answer_with_finish_reason_length() -> None:
    async with running() as (_, client):
        response = await client.post("/chat/completions", json=chat_body("x", max_tokens=2))
    [choice] = response.json()["choices"]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"]) == 8
    assert response.json()["usage"]["completion_tokens"] == 2


# -- batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("single_format", "batch_format"),
    [
        (schema_format(TICKET_SCHEMA), schema_format(batch_schema(TICKET_SCHEMA))),
        ({"type": "json_object"}, {"type": "json_object"}),
        (None, None),
    ],
    ids=["json_schema", "json_object", "text"],
)
async def test_batch_answers_equal_the_single_answers(
    single_format: dict[str, Any] | None, batch_format: dict[str, Any] | None
) -> None:
    async with running() as (server, client):
        text = await content(client, chat_body(batch_prompt(PROMPTS), batch_format))
        singles = [await content(client, chat_body(p, single_format)) for p in PROMPTS]
        stats = server.statistics()
    answers = json.loads(text)["answers"]
    assert [answer.pop("index") for answer in answers] == list(range(len(PROMPTS)))
    if single_format is None:
        assert [answer["answer"] for answer in answers] == singles
    else:
        assert answers == [json.loads(single) for single in singles]
    if batch_format is not None and batch_format["type"] == "json_schema":
        schema = batch_format["json_schema"]["schema"]
        assert violations(json.loads(text), schema, schema) == []
    assert (stats.batch_requests, stats.batch_rows) == (1, len(PROMPTS))


async def test_shuffled_batch_answers_keep_their_index() -> None:
    settings = MockSettings(faults={Fault.SHUFFLED_ANSWERS: 1.0})
    async with running(settings) as (server, client):
        body = chat_body(batch_prompt(PROMPTS), schema_format(batch_schema(TICKET_SCHEMA)))
        shuffled = json.loads(await content(client, body))["answers"]
        singles = [
            await content(client, chat_body(p, schema_format(TICKET_SCHEMA))) for p in PROMPTS
        ]
        stats = server.statistics()
    indexes = [answer.pop("index") for answer in shuffled]
    assert indexes != sorted(indexes)
    assert sorted(indexes) == list(range(len(PROMPTS)))
    assert all(shuffled[n] == json.loads(singles[i]) for n, i in enumerate(indexes))
    assert stats.faults_injected == {Fault.SHUFFLED_ANSWERS: 1}  # single prompts unaffected


@pytest.mark.parametrize("size", [1, 3])
async def test_a_batch_can_get_a_wrong_number_of_answers(size: int) -> None:
    settings = MockSettings(faults={Fault.WRONG_ANSWER_COUNT: 1.0})
    async with running(settings) as (server, client):
        text = await content(client, chat_body(batch_prompt(PROMPTS[:size])))
    assert len(json.loads(text)["answers"]) not in (0, size)
    assert server.statistics().faults_injected == {Fault.WRONG_ANSWER_COUNT: 1}


# -- embeddings -------------------------------------------------------------------------------


async def test_embeddings_are_deterministic_unit_vectors() -> None:
    async with running(MockSettings(embedding_dimensions=8)) as (_, client):
        many = (await client.post("/embeddings", json={"model": "e", "input": ["a", "b"]})).json()
        one = (await client.post("/embeddings", json={"model": "e", "input": "a"})).json()
        wide = {"model": "e", "input": "a", "dimensions": 40, "encoding_format": "base64"}
        packed = (await client.post("/embeddings", json=wide)).json()
    vectors = [item["embedding"] for item in many["data"]]
    assert [item["index"] for item in many["data"]] == [0, 1]
    assert [len(v) for v in vectors] == [8, 8]
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0) for v in vectors)
    assert one["data"][0]["embedding"] == vectors[0] != vectors[1]
    assert many["usage"]["prompt_tokens"] == 2
    floats = struct.unpack("<40f", base64.b64decode(packed["data"][0]["embedding"]))
    assert math.isclose(math.fsum(x * x for x in floats), 1.0, rel_tol=1e-5)


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status"),
    [(Fault.RATE_LIMITED, 429), (Fault.SERVER_ERROR, 500), (Fault.UNAVAILABLE, 503)],
)
async def test_error_faults_answer_with_their_status(fault: Fault, status: int) -> None:
    settings = MockSettings(faults={fault: 1.0}, retry_after_seconds=1.5)
    async with running(settings) as (server, client):
        response = await client.post("/chat/completions", json=chat_body("x"))
    assert response.status_code == status
    assert response.json()["error"]["message"]
    if status == 429:
        assert response.headers["Retry-After"] == "2"
        assert response.headers["retry-after-ms"] == "1500"
    assert server.statistics().faults_injected == {fault: 1}
    assert server.statistics().responses_by_status == {status: 1}


async def test_malformed_json_is_a_complete_200_that_does_not_parse() -> None:
    async with running(MockSettings(faults={Fault.MALFORMED_JSON: 1.0})) as (_, client):
        response = await client.post("/chat/completions", json=chat_body("x"))
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_a_hanging_request_times_the_client_out_and_ends_when_it_leaves() -> None:
    hang = MockSettings(faults={Fault.HANG: 1.0})
    async with running(hang, client_timeout=0.2) as (server, client):
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/chat/completions", json=chat_body("x"))
        assert time.monotonic() - started < 1
        with anyio.fail_after(2):
            await server.wait_in_flight(0)
        assert server.statistics().responses_by_status == {}


async def test_closing_the_server_ends_a_hanging_request() -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        async with (
            anyio.create_task_group() as tg,
            MockLlmServer(MockSettings(faults={Fault.HANG: 1.0})) as server,
        ):
            failures: list[BaseException] = []

            async def call() -> None:
                with pytest.raises(httpx.TransportError) as caught:
                    await client.post(server.base_url + "/chat/completions", json=chat_body("x"))
                failures.append(caught.value)

            tg.start_soon(call)
            with anyio.fail_after(2):
                await server.wait_in_flight(1)
        assert len(failures) == 1


TRANSPORTS = {
    "httpx": lambda: None,
    "aiohttp": httpx_aiohttp.AiohttpTransport,
}
BROKEN_CONNECTION = {
    # What each transport raises; httpx_aiohttp reports a reset as a ConnectTimeout.
    ("httpx", Fault.TRUNCATED_BODY): httpx.RemoteProtocolError,
    ("httpx", Fault.CONNECTION_RESET): httpx.ReadError,
    ("aiohttp", Fault.TRUNCATED_BODY): httpx.ReadError,
    ("aiohttp", Fault.CONNECTION_RESET): httpx.TransportError,
}


@pytest.mark.parametrize(("transport", "fault"), sorted(BROKEN_CONNECTION))
async def test_broken_connections_raise_transport_errors(transport: str, fault: Fault) -> None:
    async with MockLlmServer(MockSettings(faults={fault: 1.0})) as server:
        async with httpx.AsyncClient(transport=TRANSPORTS[transport](), timeout=5) as client:
            for _ in range(3):  # the connection pool recovers each time
                with pytest.raises(BROKEN_CONNECTION[transport, fault]):
                    await client.post(server.base_url + "/chat/completions", json=chat_body("x"))
        assert server.statistics().faults_injected == {fault: 3}


async def test_faults_hit_the_same_requests_whatever_the_arrival_order() -> None:
    settings = MockSettings(seed=3, faults={Fault.SERVER_ERROR: 0.3})

    async def failing(prompts: list[str], concurrently: bool) -> set[str]:
        failed: set[str] = set()
        async with running(settings) as (_, client):

            async def call(prompt: str) -> None:
                response = await client.post("/chat/completions", json=chat_body(prompt))
                if response.status_code == 500:
                    failed.add(prompt)

            async with anyio.create_task_group() as tg:
                for prompt in prompts:
                    if concurrently:
                        tg.start_soon(call, prompt)
                    else:
                        await call(prompt)
        return failed

    prompts = [f"row {i}" for i in range(100)]
    in_order = await failing(prompts, concurrently=False)
    assert 10 <= len(in_order) <= 50
    assert await failing(prompts[::-1], concurrently=True) == in_order


async def test_a_retried_request_draws_its_fate_afresh() -> None:
    async with running(MockSettings(faults={Fault.UNAVAILABLE: 0.5})) as (_, client):
        statuses = {
            (await client.post("/chat/completions", json=chat_body("same"))).status_code
            for _ in range(30)
        }
    assert statuses == {200, 503}


# -- latency ----------------------------------------------------------------------------------


async def test_fixed_latency_delays_each_answer() -> None:
    async with running(MockSettings(latency=FixedLatency(0.05))) as (_, client):
        started = time.monotonic()
        await client.post("/chat/completions", json=chat_body("x"))
    assert time.monotonic() - started >= 0.05


def test_latency_distributions_map_uniforms_to_seconds() -> None:
    assert UniformLatency(0.1, 0.3).sample(0.5, 0.9) == pytest.approx(0.2)
    lognormal = LogNormalLatency(median=0.2, sigma=0.8)
    assert lognormal.sample(0.3, 0.25) == pytest.approx(0.2)  # a standard normal of 0
    assert lognormal.sample(0.01, 0.0) > 0.2 * math.exp(0.8 * 3)
    assert FixedLatency(0.4).sample(0.01, 0.99) == 0.4


def test_settings_refuse_impossible_values() -> None:
    with pytest.raises(ValueError, match="add up to more than 1"):
        MockSettings(faults={Fault.SERVER_ERROR: 0.6, Fault.HANG: 0.6})
    with pytest.raises(ValueError, match="between 0 and 1"):
        MockSettings(faults={"shuffled_answers": 1.5})  # type: ignore[dict-item]  # strings work too
    with pytest.raises(ValueError, match="seconds"):
        FixedLatency(-1)
    with pytest.raises(ValueError, match="below low"):
        UniformLatency(0.3, 0.1)


def test_cli_options_make_fixed_latency_and_spread_errors() -> None:
    settings = settings_from_options(latency_ms=250, error_rate=0.3, seed=9)
    assert settings.latency == FixedLatency(0.25)
    assert settings.seed == 9
    assert dict(settings.faults) == pytest.approx(
        {Fault.RATE_LIMITED: 0.1, Fault.SERVER_ERROR: 0.1, Fault.UNAVAILABLE: 0.1}
    )


# -- statistics -------------------------------------------------------------------------------


async def test_stats_count_requests_and_the_most_in_flight() -> None:
    async with running(MockSettings(latency=FixedLatency(0.5))) as (server, client):

        async def post(path: str, body: dict[str, Any]) -> None:
            assert (await client.post(path, json=body)).status_code == 200

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(post, "/chat/completions", chat_body(f"p{i}"))
            tg.start_soon(post, "/embeddings", {"model": "e", "input": "x"})
            with anyio.fail_after(0.5):
                await server.wait_in_flight(17)
        over_http = (await client.get(server.origin + "/stats")).json()
        stats = server.statistics()
        assert stats.requests == 17
        assert dict(stats.requests_by_path) == {"/v1/chat/completions": 16, "/v1/embeddings": 1}
        assert stats.max_in_flight == 17
        assert stats.in_flight == 0
        assert stats.responses_by_status == {200: 17}
        assert over_http == stats.to_json()
        assert MockStats.from_json(over_http) == stats
        reset = (await client.post(server.origin + "/stats/reset")).json()
        assert reset["requests"] == reset["max_in_flight"] == 0
        assert server.statistics().requests_by_path == {}


# -- routes and credentials -------------------------------------------------------------------


async def test_a_configured_key_is_required_in_either_header() -> None:
    async with running(MockSettings(api_key="sk-secret")) as (_, client):
        missing = await client.post("/chat/completions", json=chat_body("x"))
        wrong = await client.post(
            "/chat/completions", json=chat_body("x"), headers={"Authorization": "Bearer sk-no"}
        )
        bearer = await client.post(
            "/chat/completions", json=chat_body("x"), headers={"Authorization": "Bearer sk-secret"}
        )
        azure = await client.post(
            "/chat/completions", json=chat_body("x"), headers={"api-key": "sk-secret"}
        )
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert "sk-" not in missing.text + wrong.text
    assert (bearer.status_code, azure.status_code) == (200, 200)
    assert "sk-secret" not in repr(MockSettings(api_key="sk-secret"))


async def test_azure_deployment_paths_answer_like_the_openai_ones() -> None:
    async with running() as (server, client):
        azure = server.origin + "/openai/deployments/gpt-dep"
        version = {"api-version": "2024-06-01"}
        body = chat_body("x")
        del body["model"]
        response = await client.post(azure + "/chat/completions", params=version, json=body)
        embedded = await client.post(azure + "/embeddings", params=version, json={"input": "x"})
        unversioned = await client.post(azure + "/chat/completions", json=body)
        openai = await content(client, chat_body("x", model="gpt-dep"))
    assert response.status_code == 200
    assert response.json()["model"] == "gpt-dep"
    assert response.json()["choices"][0]["message"]["content"] == openai
    assert len(embedded.json()["data"][0]["embedding"]) == 8
    assert unversioned.status_code == 400


async def test_unknown_routes_and_methods_are_refused() -> None:
    async with running() as (server, client):
        wrong_method = await client.get("/chat/completions")
        unknown = await client.post("/completions", json={})
        no_deployment = await client.post(server.origin + "/openai/deployments//embeddings")
        assert server.statistics().requests == 0
    assert (wrong_method.status_code, unknown.status_code, no_deployment.status_code) == (
        405,
        404,
        404,
    )


# -- lifecycle --------------------------------------------------------------------------------


async def test_a_server_runs_once_and_has_no_url_outside_its_context() -> None:
    server = MockLlmServer()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.base_url
    async with server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    with pytest.raises(RuntimeError, match="closed"):
        await server.__aenter__()


async def test_serve_prints_its_url_and_runs_until_cancelled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with anyio.create_task_group() as tg:
        url = await tg.start(serve, MockSettings(), "127.0.0.1", 0)
        async with httpx.AsyncClient() as client:
            response = await client.post(url + "/chat/completions", json=chat_body("x"))
        tg.cancel_scope.cancel()
    assert response.status_code == 200
    assert capsys.readouterr().out == url + "\n"
