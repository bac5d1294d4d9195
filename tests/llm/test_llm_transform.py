"""The `llm` transform against the mock server: answers, order, retries, the call ledger."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from engine import ConfigError, Pipeline
from landscape import Landscape
from landscape import _schema as t
from plugins import PluginSetup
from plugins.llm import (
    AnswerError,
    Fault,
    FixedLatency,
    LlmTransform,
    MockLlmServer,
    MockSettings,
    UniformLatency,
)
from plugins.llm._endpoint import Endpoint
from plugins.llm._settings import EndpointSettings
from tests._read import read_jsonl

from .conftest import llm_node, pipeline, tickets

Run = Callable[..., Any]


async def calls_of(url: str, run_id: str) -> list[dict[str, Any]]:
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        query = select(t.calls).where(t.calls.c.run_id == run_id)
        return [dict(row) for row in (await conn.execute(query)).mappings()]


async def test_answers_are_merged_and_released_in_source_order_under_random_latency(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(seed=7, latency=UniformLatency(0.0, 0.03))
    async with MockLlmServer(settings) as server:
        result = await run_verified(pipeline(server.base_url, tickets(60), tmp_path))
        stats = server.statistics()
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [row["id"] for row in out] == list(range(60))
    assert all(row["label"] in {"billing", "login", "other"} for row in out)
    assert all(0 <= row["score"] <= 1 for row in out)
    assert stats.requests == 60
    assert stats.max_in_flight > 1
    calls = await calls_of(sqlite_url, result.run_id)
    assert len(calls) == 60
    assert all(c["status"] == "success" and c["attempt"] == 1 for c in calls)
    assert all(c["request_hash"] and c["response_hash"] for c in calls)
    assert result.calls.calls == 60


async def test_the_same_rows_get_the_same_answers(run_verified: Run, tmp_path: Path) -> None:
    answers = []
    for attempt in range(2):
        out = tmp_path / str(attempt)
        out.mkdir()
        async with MockLlmServer(MockSettings(seed=3)) as server:
            await run_verified(pipeline(server.base_url, tickets(10), out))
        answers.append(read_jsonl(out / "out.jsonl"))
    assert answers[0] == answers[1]


async def test_server_errors_are_retried_and_every_attempt_is_recorded(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(seed=11, faults={Fault.SERVER_ERROR: 0.3, Fault.UNAVAILABLE: 0.1})
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url, tickets(40), tmp_path, endpoint_options={"max_attempts": 10}
        )
        result = await run_verified(config)
    assert [row["id"] for row in read_jsonl(tmp_path / "out.jsonl")] == list(range(40))
    calls = await calls_of(sqlite_url, result.run_id)
    failed = [c for c in calls if c["status"] == "error"]
    assert failed
    assert {c["http_status"] for c in failed} <= {500, 503}
    assert len(calls) == 40 + len(failed)
    by_state: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        by_state.setdefault(call["state_id"], []).append(call)
    for attempts in by_state.values():
        attempts.sort(key=lambda c: c["attempt"])
        assert [c["attempt"] for c in attempts] == list(range(1, len(attempts) + 1))
        assert attempts[-1]["status"] == "success"
    assert result.calls.retries == len(failed)


async def test_a_row_whose_call_keeps_failing_goes_to_its_error_route(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(faults={Fault.SERVER_ERROR: 1.0})
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            tickets(3),
            tmp_path,
            endpoint_options={"max_attempts": 2, "circuit_breaker": {"failure_threshold": 100}},
        )
        result = await run_verified(config)
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert [row["id"] for row in errors] == [0, 1, 2]
    assert all("HTTP 500" in row["_error"] for row in errors)
    assert result.outcomes == {"quarantined": 3}
    assert len(await calls_of(sqlite_url, result.run_id)) == 6


async def test_an_open_breaker_fails_calls_fast_with_a_recorded_circuit_open(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(faults={Fault.SERVER_ERROR: 1.0})
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            tickets(10),
            tmp_path,
            transforms=[llm_node(concurrency=1)],
            endpoint_options={
                "max_attempts": 1,
                "circuit_breaker": {
                    "failure_threshold": 3,
                    "reset_seconds": 60,
                    "on_open": "fail",
                },
            },
        )
        result = await run_verified(config)
        stats = server.statistics()
    assert stats.requests == 3
    calls = await calls_of(sqlite_url, result.run_id)
    open_calls = [c for c in calls if c["error_json"] and "circuit_open" in c["error_json"]]
    assert len(open_calls) == 7
    assert all(c["status"] == "error" and c["http_status"] is None for c in open_calls)
    assert result.outcomes == {"quarantined": 10}


async def test_an_undefined_template_variable_is_the_rows_error(
    run_verified: Run, tmp_path: Path
) -> None:
    async with MockLlmServer(MockSettings()) as server:
        node = llm_node(options={"prompt": "{{ row.missing }}"})
        result = await run_verified(
            pipeline(server.base_url, tickets(2), tmp_path, transforms=[node])
        )
        assert server.statistics().requests == 0
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert len(errors) == 2
    assert "missing" in errors[0]["_error"]
    assert result.outcomes == {"quarantined": 2}


async def test_the_api_key_never_reaches_the_landscape_or_the_output(
    run_verified: Run, tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-test-" + os.urandom(12).hex()
    monkeypatch.setenv("LEDGERFLOW_TEST_KEY", key)
    settings = MockSettings(api_key=key, faults={Fault.SERVER_ERROR: 0.2}, seed=5)
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            tickets(20),
            tmp_path,
            endpoint_options={"api_key_env": "LEDGERFLOW_TEST_KEY", "max_attempts": 10},
        )
        result = await run_verified(config)
    assert result.outcomes == {"completed": 20}
    files = [path for path in tmp_path.rglob("*") if path.is_file()]  # noqa: ASYNC240
    assert any(path.name.startswith("audit.db") for path in files)
    for path in files:
        assert key.encode() not in path.read_bytes(), path


async def test_a_missing_api_key_fails_the_run_naming_the_variable_not_a_value(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LEDGERFLOW_ABSENT_KEY", raising=False)
    config = pipeline(
        "http://127.0.0.1:9/v1",
        tickets(1),
        tmp_path,
        endpoint_options={"api_key_env": "LEDGERFLOW_ABSENT_KEY"},
    )
    with pytest.raises(Exception, match="LEDGERFLOW_ABSENT_KEY is not set"):
        await Pipeline.from_dict(config, landscape_url=sqlite_url).run()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"endpoint": "nowhere"}, "unknown endpoint 'nowhere'"),
        ({"response_format": "text", "json_schema": None}, "needs output_field"),
        ({"json_schema": {"type": "no-such-type"}}, "not a valid JSON schema"),
        ({"prompt": "{{ row.text "}, "prompt"),
    ],
)
def test_bad_llm_options_are_refused_before_anything_runs(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    config = pipeline(
        "http://127.0.0.1:9/v1", tickets(1), tmp_path, transforms=[llm_node(options=options)]
    )
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(config)
    (issue,) = info.value.issues
    assert issue.path.startswith("transforms[0].options")
    assert message in issue.message


@pytest.mark.parametrize(
    ("base_url", "options", "path", "message"),
    [
        (None, {"headers": {"X-Title": "a\r\nX-Injected: 1"}}, "headers", "line break"),
        (None, {"headers": {"Bad Name": "x"}}, "headers", "not a valid header name"),
        (None, {"headers": {"Host": "elsewhere"}}, "headers", "set by the HTTP client"),
        ("ftp://127.0.0.1/v1", {}, "base_url", "http:// or https:// URL"),
        ("http:///v1", {}, "base_url", "with a host"),
        ("http://127.0.0.1/v1?key=1", {}, "base_url", "query"),
    ],
)
def test_unusable_endpoint_addresses_and_headers_are_refused_before_anything_runs(
    tmp_path: Path, base_url: str | None, options: dict[str, Any], path: str, message: str
) -> None:
    url = base_url or "http://127.0.0.1:9/v1"
    config = pipeline(url, tickets(1), tmp_path, endpoint_options=options)
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(config)
    (issue,) = info.value.issues
    assert issue.path.startswith(f"endpoints.local.{path}")
    assert message in issue.message
    assert "X-Injected" not in issue.message


async def test_a_slow_row_does_not_stop_new_rows_from_starting(
    run_verified: Run, tmp_path: Path
) -> None:
    async with MockLlmServer(MockSettings(latency=FixedLatency(0.05))) as server:
        node = llm_node(concurrency=8, max_pending=64)
        await run_verified(pipeline(server.base_url, tickets(32), tmp_path, transforms=[node]))
        assert server.statistics().max_in_flight == 8


def _answer(content: str) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def test_answers_already_found_valid_are_still_parsed_afresh_and_invalid_ones_refused(
    tmp_path: Path,
) -> None:
    endpoint = Endpoint("e", EndpointSettings(base_url="http://127.0.0.1:1/v1"), tmp_path)
    schema = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}}
    schema["required"] = ["label"]
    options = {"endpoint": "e", "model": "m", "prompt": "{{ row.x }}", "json_schema": schema}
    llm = LlmTransform.from_options(
        {**options, "response_format": "json_schema"},
        PluginSetup(node_name="n", base_dir=tmp_path, endpoints={"e": endpoint}),
    )
    first = llm.parse(_answer('{"label": "a"}'))
    second = llm.parse(_answer('{"label": "a"}'))
    assert first == second == {"label": "a"}
    assert first is not second  # each row gets its own value to merge
    with pytest.raises(AnswerError, match="does not match the schema"):
        llm.parse(_answer('{"label": "c"}'))
    for i in range(3000):  # distinct valid answers: what is remembered stays bounded
        llm.parse(_answer(f'{{"label": "b", "n": {i}}}'))
    assert 0 < len(llm._valid_answers) <= 1024
    with pytest.raises(AnswerError):
        llm.parse(_answer('{"label": "c"}'))
