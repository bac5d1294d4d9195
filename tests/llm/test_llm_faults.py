"""The `llm` transform and its endpoint against every fault the mock server injects.

Each test talks to a real :class:`MockLlmServer` over 127.0.0.1 and reads the call
ledger back from the Landscape: every attempt is a ``calls`` row, retried attempts
included, and no row is lost or written twice whatever the endpoint does.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import select

from landscape import Landscape
from landscape import _schema as t
from plugins.llm import (
    BackoffSettings,
    BreakerSettings,
    CallFailed,
    CircuitOpen,
    Endpoint,
    EndpointSettings,
    Fault,
    FixedLatency,
    MockLlmServer,
    MockSettings,
)
from plugins.protocols import CallList, ExternalCall
from tests._read import read_jsonl

from .conftest import CLASSIFY_SCHEMA, llm_node, pipeline, tickets

Run = Callable[..., Any]

#: A breaker that never opens, for tests about retries alone.
NO_BREAKER = {"failure_threshold": 10_000}


def ids(path: Path) -> list[int]:
    return [row["id"] for row in read_jsonl(path)]


async def calls_by_row(url: str, run_id: str) -> dict[int, list[dict[str, Any]]]:
    """Each source row's calls, in the order they were made (call_index, attempt)."""
    query = (
        select(t.calls, t.rows.c.row_index)
        .join(t.node_states, t.node_states.c.state_id == t.calls.c.state_id)
        .join(t.tokens, t.tokens.c.token_id == t.node_states.c.token_id)
        .join(t.rows, t.rows.c.row_id == t.tokens.c.row_id)
        .where(t.calls.c.run_id == run_id)
    )
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        found = [dict(row) for row in (await conn.execute(query)).mappings()]
    by_row: dict[int, list[dict[str, Any]]] = {}
    for call in found:
        call["error"] = json.loads(call["error_json"]) if call["error_json"] else None
        by_row.setdefault(call["row_index"], []).append(call)
    for calls in by_row.values():
        calls.sort(key=lambda c: (c["call_index"], c["attempt"]))
    return by_row


def flat(by_row: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [call for calls in by_row.values() for call in calls]


# -- every fault kind, through a pipeline ---------------------------------------------------


def _is_status(status: int) -> Callable[[dict[str, Any]], bool]:
    return lambda call: call["http_status"] == status and call["error"]["type"] == "HTTPStatusError"


def _is_transport_error(call: dict[str, Any]) -> bool:
    """A failure below HTTP: no status, and not mistaken for an HTTP or parse error."""
    return call["http_status"] is None and call["error"]["type"] not in {
        "HTTPStatusError",
        "MalformedResponse",
        "Timeout",
    }


#: How each fault's failed attempt must look in the call ledger.
FAULT_SIGNATURES: dict[Fault, Callable[[dict[str, Any]], bool]] = {
    Fault.RATE_LIMITED: _is_status(429),
    Fault.SERVER_ERROR: _is_status(500),
    Fault.UNAVAILABLE: _is_status(503),
    Fault.HANG: lambda call: call["http_status"] is None and call["error"]["type"] == "Timeout",
    Fault.MALFORMED_JSON: lambda call: (
        call["http_status"] == 200 and call["error"]["type"] == "MalformedResponse"
    ),
    Fault.TRUNCATED_BODY: _is_transport_error,
    Fault.CONNECTION_RESET: _is_transport_error,
}


@pytest.mark.parametrize("fault", list(FAULT_SIGNATURES), ids=str)
async def test_each_fault_is_retried_until_success_with_every_attempt_in_the_ledger(
    fault: Fault, run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows = 12
    settings = MockSettings(seed=4, faults={fault: 0.3}, hang_seconds=5.0, retry_after_seconds=0.05)
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            tickets(rows),
            tmp_path,
            transforms=[llm_node(concurrency=4)],
            endpoint_options={
                "max_attempts": 10,
                "timeout_seconds": 0.3 if fault is Fault.HANG else 5,
                "circuit_breaker": NO_BREAKER,
            },
        )
        result = await run_verified(config)
        stats = server.statistics()

    # every row exactly once, in source order, none diverted
    assert ids(tmp_path / "out.jsonl") == list(range(rows))
    assert read_jsonl(tmp_path / "errors.jsonl") == []
    assert result.outcomes == {"completed": rows}

    by_row = await calls_by_row(sqlite_url, result.run_id)
    assert sorted(by_row) == list(range(rows))
    signature = FAULT_SIGNATURES[fault]
    for row_index, calls in by_row.items():
        assert [c["attempt"] for c in calls] == list(range(1, len(calls) + 1)), row_index
        assert {c["call_index"] for c in calls} == {0}
        *failed, last = calls
        assert last["status"] == "success", row_index
        assert last["http_status"] == 200
        assert last["response_hash"] is not None
        for call in failed:
            assert call["status"] == "error", row_index
            assert signature(call), call
            assert call["request_hash"] == last["request_hash"]  # the same request, again
            assert call["response_hash"] is None
    failures = [c for c in flat(by_row) if c["status"] == "error"]
    assert failures, f"seed 4 injected no {fault} into {rows} rows"
    assert stats.faults_injected[fault] == len(failures)
    assert stats.requests == len(flat(by_row))
    assert result.calls.calls == len(flat(by_row))
    assert result.calls.retries == result.calls.errors == len(failures)
    if fault is Fault.HANG:
        assert all(c["latency_ms"] >= 300 for c in failures)  # given up at the timeout


async def test_retry_after_is_waited_before_the_next_attempt(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    retry_after = 0.3  # sent as "Retry-After: 1" and "retry-after-ms: 300"
    settings = MockSettings(
        seed=1, faults={Fault.RATE_LIMITED: 0.5}, retry_after_seconds=retry_after
    )
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            tickets(4),
            tmp_path,
            endpoint_options={"max_attempts": 10, "circuit_breaker": NO_BREAKER},
        )
        result = await run_verified(config)
    assert ids(tmp_path / "out.jsonl") == [0, 1, 2, 3]
    waits = []
    for calls in (await calls_by_row(sqlite_url, result.run_id)).values():
        for limited, after in itertools.pairwise(calls):
            assert limited["http_status"] == 429
            # an attempt's call row is written as it ends; the next one began `latency` earlier
            waits.append(after["created_at"] - after["latency_ms"] / 1000 - limited["created_at"])
    assert waits, "seed 1 injected no 429"
    # the backoff is capped at 0.05 s: only the server's Retry-After can explain a longer wait
    assert min(waits) >= retry_after - 0.05, waits


async def test_a_connection_reset_is_recorded_as_a_reset_not_as_a_timeout(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(faults={Fault.CONNECTION_RESET: 1.0})
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            tickets(1),
            tmp_path,
            endpoint_options={"max_attempts": 2, "circuit_breaker": NO_BREAKER},
        )
        result = await run_verified(config)
    assert ids(tmp_path / "errors.jsonl") == [0]
    calls = (await calls_by_row(sqlite_url, result.run_id))[0]
    assert [c["attempt"] for c in calls] == [1, 2]
    for call in calls:
        assert "reset" in call["error"]["message"].lower(), call["error"]
        assert "Timeout" not in call["error"]["type"], call["error"]


async def test_attempts_running_out_send_the_row_to_its_error_route_with_the_last_error(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(seed=1, faults={Fault.UNAVAILABLE: 1.0})
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            tickets(5),
            tmp_path,
            transforms=[llm_node(options={"max_attempts": 3})],  # the node's override wins
            endpoint_options={"max_attempts": 9, "circuit_breaker": NO_BREAKER},
        )
        result = await run_verified(config)
        assert server.statistics().requests == 15
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert [row["id"] for row in errors] == [0, 1, 2, 3, 4]
    assert all(row["_error"] == "HTTP 503" and row["_error_node"] for row in errors)
    assert ids(tmp_path / "out.jsonl") == []
    assert result.outcomes == {"quarantined": 5}
    by_row = await calls_by_row(sqlite_url, result.run_id)
    assert sorted(by_row) == [0, 1, 2, 3, 4]
    for calls in by_row.values():
        assert [(c["attempt"], c["status"], c["http_status"]) for c in calls] == [
            (1, "error", 503),
            (2, "error", 503),
            (3, "error", 503),
        ]


# -- 4xx other than 429 -----------------------------------------------------------------------


async def test_a_rejected_api_key_is_not_retried_and_does_not_open_the_breaker(
    run_verified: Run, tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEDGERFLOW_WRONG_KEY", "sk-wrong")
    rows = 6
    async with MockLlmServer(MockSettings(api_key="sk-right")) as server:
        config = pipeline(
            server.base_url,
            tickets(rows),
            tmp_path,
            transforms=[llm_node(concurrency=1)],
            endpoint_options={
                "api_key_env": "LEDGERFLOW_WRONG_KEY",
                "max_attempts": 5,
                "circuit_breaker": {"failure_threshold": 2, "reset_seconds": 60},
            },
        )
        result = await run_verified(config)
        stats = server.statistics()
    assert stats.requests == rows  # one each: no retry, and no breaker refusing calls
    assert dict(stats.responses_by_status) == {401: rows}
    assert ids(tmp_path / "errors.jsonl") == list(range(rows))
    assert all(row["_error"] == "HTTP 401" for row in read_jsonl(tmp_path / "errors.jsonl"))
    assert result.outcomes == {"quarantined": rows}
    by_row = await calls_by_row(sqlite_url, result.run_id)
    assert sorted(by_row) == list(range(rows))
    for calls in by_row.values():
        (call,) = calls
        assert (call["attempt"], call["status"], call["http_status"]) == (1, "error", 401)
    assert result.calls.retries == 0


# -- the circuit breaker ----------------------------------------------------------------------

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "Ticket 1: hello"}]}
FAIL_FAST = 0.01  # seconds; below the server's latency, so the attempt times out
PATIENT = 5.0


def breaker_endpoint(base_url: str, *, threshold: int, reset: float) -> Endpoint:
    settings = EndpointSettings(
        base_url=base_url,
        max_attempts=1,
        backoff=BackoffSettings(initial_seconds=0.01, max_seconds=0.05),
        circuit_breaker=BreakerSettings(
            failure_threshold=threshold, reset_seconds=reset, on_open="fail"
        ),
    )
    return Endpoint("local", settings, Path("."))


async def post(endpoint: Endpoint, calls: CallList, limit: float) -> dict[str, Any]:
    """One chat call whose attempt gives up after ``limit`` seconds."""
    return await endpoint.post(
        "/chat/completions", CHAT, calls=calls, call_type="llm", timeout_seconds=limit
    )


async def fail_once(endpoint: Endpoint, calls: CallList) -> None:
    with pytest.raises(CallFailed) as info:
        await post(endpoint, calls, FAIL_FAST)
    assert info.value.error["type"] == "Timeout"


def assert_refused(call: ExternalCall) -> None:
    assert call.status == "error"
    assert call.error is not None
    assert call.error["circuit_open"] is True
    assert call.http_status is None
    assert call.response is None
    assert call.attempt == 1


@pytest.fixture
async def slow_server() -> AsyncIterator[MockLlmServer]:
    """A healthy server that answers after 50 ms: calls with a 10 ms timeout fail."""
    async with MockLlmServer(MockSettings(latency=FixedLatency(0.05))) as server:
        yield server


async def test_the_breaker_opens_half_opens_for_one_probe_and_closes_on_its_success(
    slow_server: MockLlmServer,
) -> None:
    reset = 0.5  # long enough that nothing here outlasts it by accident
    endpoint = breaker_endpoint(slow_server.base_url, threshold=2, reset=reset)
    calls = CallList()
    await endpoint.open()
    try:
        await fail_once(endpoint, calls)
        assert endpoint.breaker.state == "closed"
        await fail_once(endpoint, calls)
        assert endpoint.breaker.state == "open"
        assert slow_server.statistics().requests == 2

        # open: refused at once, recorded, the server never asked
        with pytest.raises(CircuitOpen):
            await post(endpoint, calls, PATIENT)
        assert_refused(calls.calls[-1])
        assert slow_server.statistics().requests == 2

        # half-open: a failing probe opens it again for another reset period
        await anyio.sleep(reset + 0.05)
        assert endpoint.breaker.state == "half_open"
        await fail_once(endpoint, calls)
        assert endpoint.breaker.state == "open"
        with pytest.raises(CircuitOpen):
            await post(endpoint, calls, PATIENT)
        assert slow_server.statistics().requests == 3

        # half-open again: exactly one probe goes out; the others are refused meanwhile
        await anyio.sleep(reset + 0.05)
        assert endpoint.breaker.state == "half_open"
        answers: list[dict[str, Any]] = []

        async def probe() -> None:
            answers.append(await post(endpoint, calls, PATIENT))

        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
            await slow_server.wait_in_flight(1)
            with pytest.raises(CircuitOpen):
                await post(endpoint, calls, PATIENT)
            assert_refused(calls.calls[-1])
        (answer,) = answers
        assert answer["choices"]
        assert endpoint.breaker.state == "closed"
        assert slow_server.statistics().requests == 4

        # closed: calls flow again
        await post(endpoint, calls, PATIENT)
        assert slow_server.statistics().requests == 5
    finally:
        await endpoint.aclose()
    statuses = [(c.status, bool(c.error and c.error.get("circuit_open"))) for c in calls.calls]
    assert statuses == [
        ("error", False),
        ("error", False),
        ("error", True),
        ("error", False),
        ("error", True),
        ("error", True),
        ("success", False),
        ("success", False),
    ]


async def test_a_cancelled_probe_does_not_keep_the_breaker_open(
    slow_server: MockLlmServer,
) -> None:
    reset = 0.2
    endpoint = breaker_endpoint(slow_server.base_url, threshold=1, reset=reset)
    calls = CallList()
    await endpoint.open()
    try:
        await fail_once(endpoint, calls)
        assert endpoint.breaker.state == "open"
        await anyio.sleep(reset + 0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, endpoint, calls, PATIENT)
            await slow_server.wait_in_flight(1)
            tg.cancel_scope.cancel()  # the probe never learns how the endpoint is
        await anyio.sleep(reset + 0.05)
        answer = await post(endpoint, calls, PATIENT)  # a new probe, not circuit_open
        assert answer["choices"]
        assert endpoint.breaker.state == "closed"
    finally:
        await endpoint.aclose()


async def test_calls_queued_behind_max_in_flight_fail_fast_once_the_breaker_opens(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows = 8
    settings = MockSettings(faults={Fault.SERVER_ERROR: 1.0}, latency=FixedLatency(0.02))
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            tickets(rows),
            tmp_path,
            transforms=[llm_node(concurrency=rows)],
            endpoint_options={
                "max_in_flight": 1,
                "max_attempts": 1,
                "circuit_breaker": {
                    "failure_threshold": 2,
                    "reset_seconds": 60,
                    "on_open": "fail",
                },
            },
        )
        result = await run_verified(config)
        stats = server.statistics()
    assert ids(tmp_path / "errors.jsonl") == list(range(rows))
    assert result.outcomes == {"quarantined": rows}
    calls = flat(await calls_by_row(sqlite_url, result.run_id))
    assert len(calls) == rows
    refused = [c for c in calls if c["error"].get("circuit_open")]
    assert stats.requests == 2, "requests reached the server after the breaker opened"
    assert len(refused) == rows - 2


async def test_a_row_arriving_after_the_reset_time_is_a_probe_that_reaches_the_server(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    reset = 1.0  # rows 2 and 4 come well within it; row 3 after it

    async def rows() -> AsyncIterator[dict[str, Any]]:
        first, second = tickets(6)[:3], tickets(6)[3:]
        for row in first:
            yield row
        # the breaker opens with the second failure: the pause counts from there
        while server.statistics().requests < 2:  # noqa: ASYNC110 - the server is elsewhere
            await anyio.sleep(0.01)
        await anyio.sleep(reset + 0.2)  # the breaker is half-open after this pause
        for row in second:
            yield row

    settings = MockSettings(faults={Fault.SERVER_ERROR: 1.0})
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            rows(),
            tmp_path,
            transforms=[llm_node(concurrency=1)],
            endpoint_options={
                "max_attempts": 1,
                "circuit_breaker": {
                    "failure_threshold": 2,
                    "reset_seconds": reset,
                    "on_open": "fail",
                },
            },
        )
        result = await run_verified(config)
        assert server.statistics().requests == 3
    by_row = await calls_by_row(sqlite_url, result.run_id)
    refused = {i for i, (call,) in by_row.items() if call["error"].get("circuit_open")}
    reached = {i for i, (call,) in by_row.items() if call["http_status"] == 500}
    assert reached == {0, 1, 3}  # two failures open it; row 3 is the half-open probe
    assert refused == {2, 4, 5}
    assert ids(tmp_path / "errors.jsonl") == list(range(6))


# -- structured output validation -------------------------------------------------------------


@pytest.mark.parametrize("parse_retries", [0, 1, 2])
async def test_an_unparseable_answer_is_asked_again_parse_retries_times_then_is_the_rows_error(
    parse_retries: int, run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows = 4
    async with MockLlmServer(MockSettings(seed=5)) as server:
        # three tokens cut the JSON answer short: never parseable
        node = llm_node(options={"max_tokens": 3, "parse_retries": parse_retries})
        result = await run_verified(
            pipeline(server.base_url, tickets(rows), tmp_path, transforms=[node])
        )
        assert server.statistics().requests == rows * (parse_retries + 1)
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert [row["id"] for row in errors] == list(range(rows))
    assert all("not JSON" in row["_error"] for row in errors)
    assert result.outcomes == {"quarantined": rows}
    by_row = await calls_by_row(sqlite_url, result.run_id)
    assert sorted(by_row) == list(range(rows))
    for calls in by_row.values():
        # each ask is a new logical call (call_index) whose one attempt succeeded over HTTP
        assert [(c["call_index"], c["attempt"], c["status"]) for c in calls] == [
            (index, 1, "success") for index in range(parse_retries + 1)
        ]
        assert all(c["response_hash"] for c in calls)
    assert result.calls.calls == rows * (parse_retries + 1)
    assert result.calls.retries == 0


async def test_a_json_answer_that_breaks_the_schema_is_the_rows_error(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    # the mock ignores `pattern`, so its labels are valid JSON that fails validation
    schema = {
        **CLASSIFY_SCHEMA,
        "properties": {
            **CLASSIFY_SCHEMA["properties"],
            "label": {"type": "string", "pattern": "^Z+$"},
        },
    }
    async with MockLlmServer(MockSettings(seed=5)) as server:
        node = llm_node(options={"json_schema": schema, "parse_retries": 1})
        result = await run_verified(
            pipeline(server.base_url, tickets(3), tmp_path, transforms=[node])
        )
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert [row["id"] for row in errors] == [0, 1, 2]
    assert all("does not match the schema at label" in row["_error"] for row in errors)
    assert all("label" not in row for row in errors)  # the bad answer is not merged
    by_row = await calls_by_row(sqlite_url, result.run_id)
    assert sorted(by_row) == [0, 1, 2]
    assert all([c["call_index"] for c in calls] == [0, 1] for calls in by_row.values())


async def test_a_malformed_response_body_uses_attempts_not_parse_retries(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    settings = MockSettings(faults={Fault.MALFORMED_JSON: 1.0})
    async with MockLlmServer(settings) as server:
        node = llm_node(options={"parse_retries": 3})
        config = pipeline(
            server.base_url,
            tickets(2),
            tmp_path,
            transforms=[node],
            endpoint_options={"max_attempts": 2, "circuit_breaker": NO_BREAKER},
        )
        result = await run_verified(config)
        assert server.statistics().requests == 4
    assert ids(tmp_path / "errors.jsonl") == [0, 1]
    by_row = await calls_by_row(sqlite_url, result.run_id)
    assert sorted(by_row) == [0, 1]
    for calls in by_row.values():
        assert [(c["call_index"], c["attempt"], c["http_status"]) for c in calls] == [
            (0, 1, 200),
            (0, 2, 200),
        ]
        assert all(c["error"]["type"] == "MalformedResponse" for c in calls)
