"""What an endpoint lets through and in what order rows come out: ``max_in_flight``
shared by nodes, requests and tokens per minute, budgets, ordered and unordered release.

Pipelines run against the real mock server on 127.0.0.1.  The token buckets are also
driven alone on trio's virtual clock, where their arithmetic can be checked exactly.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import select
from trio.testing import MockClock

from engine import Pipeline
from landscape import Landscape
from landscape import _schema as t
from plugins.llm import (
    EndpointLimiter,
    Fault,
    FixedLatency,
    MockLlmServer,
    MockSettings,
    UniformLatency,
)
from plugins.llm._limits import CircuitBreaker, CircuitOpen, EndpointDown, TokenBucket
from tests._read import read_jsonl

from .conftest import llm_node, pipeline, tickets

Run = Callable[..., Any]


def ids(path: Path) -> list[int]:
    return [row["id"] for row in read_jsonl(path)]


async def fetch(url: str, query: Any) -> list[dict[str, Any]]:
    async with Landscape.connect(url) as landscape, landscape.engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(query)).mappings()]


async def calls_of(url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's calls, each with ``start``: when its request left (wall clock)."""
    calls = await fetch(url, select(t.calls).where(t.calls.c.run_id == run_id))
    for call in calls:
        # a call row is written as its attempt ends; the attempt began `latency` earlier
        call["start"] = call["created_at"] - call["latency_ms"] / 1000.0
    return sorted(calls, key=lambda c: c["start"])


async def states_of(url: str, run_id: str, node_id: str) -> list[dict[str, Any]]:
    """The node's states, each with the ``row_index`` of its token."""
    query = (
        select(t.node_states, t.rows.c.row_index)
        .join(t.tokens, t.tokens.c.token_id == t.node_states.c.token_id)
        .join(t.rows, t.rows.c.row_id == t.tokens.c.row_id)
        .where(t.node_states.c.run_id == run_id, t.node_states.c.node_id == node_id)
    )
    return await fetch(url, query)


def run_on_virtual_clock(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on trio with a clock that jumps ahead whenever every task waits."""
    anyio.run(main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})


# -- max_in_flight across nodes ---------------------------------------------------------------


async def test_two_llm_nodes_on_one_endpoint_never_exceed_its_max_in_flight_together(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows = 40
    first = llm_node("first", concurrency=8, on_success="again")
    second = llm_node(
        "second",
        input="again",
        concurrency=8,
        options={"prompt": "Check ticket {{ row.id }} labelled {{ row.label }}"},
    )
    async with MockLlmServer(MockSettings(latency=FixedLatency(0.02))) as server:
        config = pipeline(
            server.base_url,
            tickets(rows),
            tmp_path,
            transforms=[first, second],
            endpoint_options={"max_in_flight": 4},
        )
        result = await run_verified(config)
        stats = server.statistics()
    assert stats.requests == 2 * rows
    assert stats.max_in_flight == 4  # 16 workers wanted more; the endpoint held them to 4
    assert ids(tmp_path / "out.jsonl") == list(range(rows))
    # the nodes did call at the same time, so the limit held for both together
    first_states = await states_of(sqlite_url, result.run_id, "first")
    second_states = await states_of(sqlite_url, result.run_id, "second")
    assert any(
        a["started_at"] < b["completed_at"] and b["started_at"] < a["completed_at"]
        for a in first_states
        for b in second_states
    )


# -- requests and tokens per minute -----------------------------------------------------------


def assert_window_holds(
    starts: list[float], amounts: list[float], per_minute: float, slack: float
) -> None:
    """For every window between two starts: what started in it <= the bucket's capacity
    (one minute's worth) + what it refills over the window + ``slack``."""
    rate = per_minute / 60.0
    for i, begin in enumerate(starts):
        total = 0.0
        for end, amount in zip(starts[i:], amounts[i:], strict=True):
            total += amount
            allowed = per_minute + rate * (end - begin) + slack
            assert total <= allowed, f"{total} > {allowed} within {end - begin:.3f} s"


async def test_requests_per_minute_hold_over_the_run(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    per_minute, extra = 120, 4  # a full bucket lets 120 go at once; 4 more at 2 per second
    rows = per_minute + extra
    async with MockLlmServer(MockSettings()) as server:
        config = pipeline(
            server.base_url,
            tickets(rows),
            tmp_path,
            endpoint_options={"requests_per_minute": per_minute},
        )
        result = await run_verified(config)
    assert ids(tmp_path / "out.jsonl") == list(range(rows))
    starts = [call["start"] for call in await calls_of(sqlite_url, result.run_id)]
    assert len(starts) == rows
    assert_window_holds(starts, [1.0] * rows, per_minute, slack=1.0)
    # and so the requests past the first minute's allowance were spread out
    rate = per_minute / 60
    assert starts[-1] - starts[0] >= (extra - 1) / rate


async def test_tokens_per_minute_hold_over_the_run_counted_by_reported_usage(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    per_minute, rows = 2400, 166  # about 15 tokens a call: ~90 tokens past the bucket
    node = llm_node(concurrency=1, options={"max_tokens": 10})  # estimates close to usage
    async with MockLlmServer(MockSettings()) as server:
        config = pipeline(
            server.base_url,
            tickets(rows),
            tmp_path,
            transforms=[node],
            endpoint_options={"tokens_per_minute": per_minute},
        )
        result = await run_verified(config)
    assert ids(tmp_path / "out.jsonl") == list(range(rows))
    calls = await calls_of(sqlite_url, result.run_id)
    used = [c["prompt_tokens"] + c["completion_tokens"] for c in calls]
    assert sum(used) > per_minute + 2 * max(used), "the run never met the limit"
    assert result.calls.tokens == sum(used)
    estimate = max(used) + 10
    starts = [c["start"] for c in calls]
    assert_window_holds(starts, used, per_minute, slack=2 * estimate)
    # and the tokens past the first minute's allowance were spread out (about a second
    # here; without the limit the calls all start within a fraction of that)
    overflow = sum(used) - per_minute - 2 * estimate
    assert overflow > 0
    assert max(starts) - min(starts) >= overflow / (per_minute / 60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_rate_limited_pipeline_can_be_built_before_the_event_loop_runs(
    tmp_path: Path, sqlite_url: str
) -> None:
    # the documented use: Pipeline.from_yaml(...), then asyncio.run(pipeline.run())
    port = free_port()
    config = pipeline(
        f"http://127.0.0.1:{port}/v1",
        tickets(3),
        tmp_path,
        endpoint_options={"requests_per_minute": 600, "tokens_per_minute": 100_000},
    )
    built = Pipeline.from_dict(config, base_dir=tmp_path, landscape_url=sqlite_url)

    async def main() -> Any:
        async with MockLlmServer(MockSettings(), port=port):
            return await built.run()

    result = asyncio.run(main())
    assert result.outcomes == {"completed": 3}
    assert ids(tmp_path / "out.jsonl") == [0, 1, 2]


def test_a_full_bucket_lets_a_minutes_worth_through_then_refills_at_the_rate() -> None:
    async def main() -> None:
        bucket = TokenBucket(60)  # one a second
        start = anyio.current_time()
        times = []
        for _ in range(64):
            await bucket.take(1)
            times.append(anyio.current_time() - start)
        assert times[:60] == [0.0] * 60
        assert times[60:] == pytest.approx([1.0, 2.0, 3.0, 4.0])

    run_on_virtual_clock(main)


def test_a_large_take_is_not_starved_by_small_ones_behind_it() -> None:
    async def main() -> None:
        bucket = TokenBucket(60)
        await bucket.take(60)
        start = anyio.current_time()
        finished: list[tuple[str, float]] = []

        async def take(name: str, amount: float) -> None:
            await bucket.take(amount)
            finished.append((name, anyio.current_time() - start))

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "large", 30)
            await anyio.wait_all_tasks_blocked()
            for n in range(3):  # queued one after another, behind the large one
                tg.start_soon(take, f"small{n}", 1)
                await anyio.wait_all_tasks_blocked()
        assert finished == [
            ("large", pytest.approx(30.0)),
            ("small0", pytest.approx(31.0)),
            ("small1", pytest.approx(32.0)),
            ("small2", pytest.approx(33.0)),
        ]

    run_on_virtual_clock(main)


def test_reported_usage_gives_back_what_the_estimate_overcharged() -> None:
    async def main() -> None:
        limiter = EndpointLimiter(4, tokens_per_minute=600)  # 10 tokens a second
        start = anyio.current_time()
        async with limiter.slot(600) as usage:
            usage.actual(60)  # 540 left
        async with limiter.slot(600):
            pass
        assert anyio.current_time() - start == pytest.approx(6.0)  # 60 tokens to refill

    run_on_virtual_clock(main)


def test_usage_above_the_estimate_is_charged_and_delays_the_next_request() -> None:
    async def main() -> None:
        limiter = EndpointLimiter(4, tokens_per_minute=600)
        start = anyio.current_time()
        async with limiter.slot(100) as usage:
            usage.actual(700)  # 600 - 700: 100 tokens in debt
        async with limiter.slot(100):
            pass
        assert anyio.current_time() - start == pytest.approx(20.0)

    run_on_virtual_clock(main)


def test_usage_is_charged_in_full_when_the_estimate_exceeds_a_minutes_allowance() -> None:
    async def main() -> None:
        limiter = EndpointLimiter(4, tokens_per_minute=600)
        start = anyio.current_time()
        async with limiter.slot(1200) as usage:  # too large for the bucket: it still goes
            usage.actual(100)  # but it used 100 tokens: 500 are left
        async with limiter.slot(600):
            pass
        assert anyio.current_time() - start == pytest.approx(10.0)

    run_on_virtual_clock(main)


def test_requests_per_minute_apply_to_every_attempt_through_the_limiter() -> None:
    async def main() -> None:
        limiter = EndpointLimiter(1, requests_per_minute=6)  # one every ten seconds
        start = anyio.current_time()
        times = []
        for _ in range(8):
            async with limiter.slot(0):
                times.append(anyio.current_time() - start)
        assert times == pytest.approx([0.0] * 6 + [10.0, 20.0])
        assert limiter.in_flight == 0

    run_on_virtual_clock(main)


# -- the circuit breaker, on the virtual clock -------------------------------------------------


async def call_through(breaker: CircuitBreaker) -> None:
    """What an endpoint's attempt does with ``on_open: wait``: wait until the breaker
    lets a call go, and ask it; refused (another took the probe), wait again."""
    while True:
        await breaker.wait_until_callable()
        try:
            breaker.before_call()
        except CircuitOpen:
            continue
        return


def test_an_open_breaker_holds_callers_until_its_probe_succeeds() -> None:
    async def main() -> None:
        breaker = CircuitBreaker("e", 2, reset_seconds=10.0, wait=True)
        start = anyio.current_time()
        breaker.failed()
        breaker.failed()  # open from 0 to 10
        went: list[tuple[str, float]] = []

        async def caller(name: str) -> None:
            await call_through(breaker)
            went.append((name, anyio.current_time() - start))
            if len(went) == 1:  # the probe: it takes 2 s and succeeds
                await anyio.sleep(2.0)
                breaker.succeeded()

        async with anyio.create_task_group() as tg:
            for name in ("a", "b", "c"):
                tg.start_soon(caller, name)
        assert [at for _, at in went] == [10.0, 12.0, 12.0]
        assert breaker.state == "closed"

    run_on_virtual_clock(main)


def test_a_failed_probe_holds_callers_for_another_reset_period() -> None:
    async def main() -> None:
        breaker = CircuitBreaker("e", 1, reset_seconds=10.0, wait=True)
        start = anyio.current_time()
        breaker.failed()  # open from 0 to 10
        went: list[float] = []

        async def caller() -> None:
            await call_through(breaker)
            went.append(anyio.current_time() - start)
            await anyio.sleep(1.0)
            if len(went) == 1:
                breaker.failed()  # the first probe fails at 11: open until 21
            else:
                breaker.succeeded()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(caller)
        assert went == [10.0, 21.0, 22.0]  # a second probe at 21, then the last caller

    run_on_virtual_clock(main)


def test_callers_stop_with_endpoint_down_once_the_outage_outlasts_its_limit() -> None:
    async def main() -> None:
        breaker = CircuitBreaker("e", 1, reset_seconds=10.0, wait=True, max_outage_seconds=25.0)
        start = anyio.current_time()
        breaker.failed()  # down from 0
        probes: list[float] = []
        stopped: list[tuple[float, str]] = []

        async def caller() -> None:
            while True:
                try:
                    await call_through(breaker)
                except EndpointDown as down:
                    stopped.append((anyio.current_time() - start, down.reason))
                    return
                probes.append(anyio.current_time() - start)
                await anyio.sleep(1.0)
                breaker.failed()  # the endpoint stays down

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(caller)
        assert probes == [10.0, 21.0]  # each failed probe reopens it for 10 s
        assert [at for at, _ in stopped] == [25.0, 25.0, 25.0]
        assert all("max_outage_seconds (25)" in reason for _, reason in stopped)
        with pytest.raises(EndpointDown):  # a later caller is refused at once
            await breaker.wait_until_callable()

    run_on_virtual_clock(main)


# -- budgets ----------------------------------------------------------------------------------

PRICES = {"mock-model": {"input_per_1k": 1.0, "output_per_1k": 2.0}}  # cost units per 1k
ANSWER_TOKENS = 20  # the node's max_tokens: the answer's part of every estimate


def estimate(request: dict[str, Any]) -> tuple[int, int]:
    """What the llm transform estimates of a request, as prompt and answer tokens."""
    prompt = sum(len(m["content"]) for m in request["messages"]) // 4 + 1
    return prompt, request["max_tokens"]


def spend(tokens: tuple[int, int]) -> dict[str, float]:
    """Tokens and cost of ``(prompt, completion)`` tokens at ``PRICES``."""
    prompt, completion = tokens
    return {"max_tokens": prompt + completion, "max_cost": (prompt + 2 * completion) / 1000}


async def calls_with_estimates(url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's calls, each with ``estimate`` and ``actual``: the spend the call
    reserved and the spend it recorded (as :func:`spend` gives them)."""
    calls = await calls_of(url, run_id)
    async with Landscape.connect(url) as landscape:
        requests = await landscape.load_payloads({c["request_hash"] for c in calls})
    for call in calls:
        call["estimate"] = spend(estimate(requests[call["request_hash"]]))
        call["actual"] = spend((call["prompt_tokens"], call["completion_tokens"]))
    return calls


@pytest.mark.parametrize(
    ("budget", "raised"),
    [({"max_tokens": 1500}, {"max_tokens": 10**7}), ({"max_cost": 1.5}, {"max_cost": 1e4})],
    ids=["max_tokens", "max_cost"],
)
async def test_calls_reserve_their_estimates_so_only_estimation_error_passes_the_budget(
    budget: dict[str, float],
    raised: dict[str, float],
    run_verified: Run,
    tmp_path: Path,
    sqlite_url: str,
) -> None:
    (limit_name, limit), rows = next(iter(budget.items())), 200
    node = llm_node(concurrency=16, options={"max_tokens": ANSWER_TOKENS})
    async with MockLlmServer(MockSettings(latency=FixedLatency(0.02))) as server:
        config = pipeline(
            server.base_url,
            tickets(rows),
            tmp_path,
            transforms=[node],
            endpoint_options={"prices": PRICES},
            budget=budget,
            runtime={"max_buffer_size": 64},
        )
        result = await run_verified(config)
        assert result.status == "interrupted"
        assert result.stop_reason is not None
        assert result.stop_reason.startswith("budget")
        assert limit_name in result.stop_reason
        calls = await calls_with_estimates(sqlite_url, result.run_id)
        spent = sum(c["actual"][limit_name] for c in calls)
        worst_error = max(c["actual"][limit_name] - c["estimate"][limit_name] for c in calls)
        largest = max(c["estimate"][limit_name] for c in calls)
        # No call went whose reservation would cross the budget: 16 rows in flight and
        # 64 buffered pass it only by what the calls used beyond their estimates ...
        assert spent <= limit + max(worst_error, 0.0) + 1e-9, (spent, worst_error)
        # ... and it stopped only when the next call could not fit.
        assert spent > limit - largest, (spent, largest)
        assert result.calls.calls == len(calls) < rows
        # The rows whose calls were refused are no one's error: they wait for a resume.
        assert read_jsonl(tmp_path / "errors.jsonl") == []
        assert result.outcomes == {"completed": len(calls)}
        assert result.rows_processed > len(calls)

        config["budget"] = raised
        resumed = await Pipeline.from_dict(config, landscape_url=sqlite_url).resume(result.run_id)
    assert resumed.status == "completed"
    assert sorted(ids(tmp_path / "out.jsonl")) == list(range(rows))  # each row once
    assert resumed.outcomes == {"completed": rows}
    assert len(await calls_of(sqlite_url, result.run_id)) == rows  # none paid twice
    async with Landscape.connect(sqlite_url) as landscape:
        report = await landscape.verify(result.run_id)
    assert report.ok, [str(v) for v in report.violations]


async def test_a_call_whose_estimate_alone_exceeds_the_budget_is_never_sent(
    run_verified: Run, tmp_path: Path
) -> None:
    node = llm_node(concurrency=4, options={"max_tokens": 500})  # ~510 tokens a call
    async with MockLlmServer(MockSettings()) as server:
        config = pipeline(
            server.base_url,
            tickets(10),
            tmp_path,
            transforms=[node],
            budget={"max_tokens": 100},
        )
        result = await run_verified(config)
        assert server.statistics().requests == 0
    assert result.status == "interrupted"
    assert result.stop_reason is not None
    assert "max_tokens 100" in result.stop_reason
    assert result.calls.calls == 0
    assert result.outcomes == {}


# -- release order ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "faults", [{}, {Fault.SERVER_ERROR: 0.2, Fault.CONNECTION_RESET: 0.1}], ids=["clean", "faulty"]
)
async def test_ordered_release_keeps_source_order_under_random_latencies(
    faults: dict[Fault, float], run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows = 48
    settings = MockSettings(seed=9, latency=UniformLatency(0.0, 0.03), faults=faults)
    async with MockLlmServer(settings) as server:
        config = pipeline(
            server.base_url,
            tickets(rows),
            tmp_path,
            transforms=[llm_node(concurrency=16)],
            endpoint_options={"max_attempts": 10, "circuit_breaker": {"failure_threshold": 1000}},
        )
        result = await run_verified(config)
    assert ids(tmp_path / "out.jsonl") == list(range(rows))
    assert result.outcomes == {"completed": rows}
    states = await states_of(sqlite_url, result.run_id, "classify")
    finished = [s["row_index"] for s in sorted(states, key=lambda s: s["completed_at"])]
    assert sorted(finished) == list(range(rows))
    assert finished != list(range(rows)), "rows finished in order: nothing was reordered"


async def test_unordered_release_passes_rows_on_as_they_finish_each_exactly_once(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    rows = 48
    settings = MockSettings(seed=9, latency=UniformLatency(0.0, 0.03))
    async with MockLlmServer(settings) as server:
        node = llm_node(concurrency=16, ordered=False)
        result = await run_verified(
            pipeline(server.base_url, tickets(rows), tmp_path, transforms=[node])
        )
    written = ids(tmp_path / "out.jsonl")
    assert sorted(written) == list(range(rows))  # complete, no duplicates
    assert written != list(range(rows)), "completion order happened to be source order"
    states = {s["row_index"]: s for s in await states_of(sqlite_url, result.run_id, "classify")}
    finished_at = [states[i]["completed_at"] for i in written]
    assert finished_at == sorted(finished_at)  # written in the order they finished
