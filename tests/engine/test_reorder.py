"""The release window: order, completeness and bounded memory under random latencies."""

from __future__ import annotations

import functools

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine._reorder import ReleaseWindow


async def _latency(steps: int) -> None:
    """Virtual latency: ``steps`` scheduler round-trips (deterministic, no wall clock)."""
    for _ in range(steps):
        await anyio.lowlevel.checkpoint()


async def _pump(
    latencies: list[int], concurrency: int, max_pending: int, *, ordered: bool
) -> tuple[list[int], int]:
    """Push ``len(latencies)`` items through a window; return release order and peak pending."""
    window: ReleaseWindow[int] = ReleaseWindow(max_pending, ordered=ordered)
    released: list[int] = []
    peak = 0
    limiter = anyio.CapacityLimiter(concurrency)

    async def work(seq: int, latency: int) -> None:
        async with limiter:
            await _latency(latency)
        window.complete(seq, seq)

    async def emit() -> None:
        nonlocal peak
        while (item := await window.release()) is not None:
            peak = max(peak, window.statistics().pending)
            released.append(item)
            await _latency(1)
            window.free()

    async with anyio.create_task_group() as tg:
        tg.start_soon(emit)
        for latency in latencies:
            seq = await window.admit()
            peak = max(peak, window.statistics().pending)
            tg.start_soon(work, seq, latency)
        window.close()
    return released, peak


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    latencies=st.lists(st.integers(0, 30), max_size=120),
    concurrency=st.integers(1, 16),
    extra=st.integers(0, 16),
    ordered=st.booleans(),
)
def test_every_item_is_released_once_in_order_and_pending_stays_bounded(
    latencies: list[int], concurrency: int, extra: int, ordered: bool
) -> None:
    max_pending = concurrency + extra
    pump = functools.partial(_pump, ordered=ordered)
    released, peak = anyio.run(pump, latencies, concurrency, max_pending)
    assert sorted(released) == list(range(len(latencies)))
    if ordered:
        assert released == list(range(len(latencies)))
    assert peak <= max_pending


async def test_a_slow_head_does_not_stop_later_items_from_completing() -> None:
    window: ReleaseWindow[int] = ReleaseWindow(8)
    head_done = anyio.Event()
    completed: list[int] = []

    async def work(seq: int) -> None:
        if seq == 0:
            await head_done.wait()
        completed.append(seq)
        window.complete(seq, seq)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(work, await window.admit())
        await anyio.wait_all_tasks_blocked()
        assert completed == list(range(1, 8))  # all but the head finished meanwhile
        assert window.statistics().pending == 8
        head_done.set()
        window.close()
        released = [item async for item in _drain(window)]
    assert released == list(range(8))


async def _drain(window: ReleaseWindow[int]):  # type: ignore[no-untyped-def]
    while (item := await window.release()) is not None:
        yield item
        window.free()


async def test_admission_waits_while_the_window_is_full() -> None:
    window: ReleaseWindow[int] = ReleaseWindow(2)
    await window.admit()
    await window.admit()
    with anyio.move_on_after(0.05) as scope:
        await window.admit()
    assert scope.cancelled_caught
    window.complete(0, 0)
    assert await window.release() == 0
    window.free()
    assert await window.admit() == 2


def test_window_needs_room_for_one_item() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReleaseWindow(0)


def test_unordered_window_releases_in_completion_order() -> None:
    async def scenario() -> list[int]:
        window: ReleaseWindow[int] = ReleaseWindow(4, ordered=False)
        for _ in range(3):
            await window.admit()
        for seq in (2, 0, 1):
            window.complete(seq, seq)
        window.close()
        return [item async for item in _drain(window)]

    assert anyio.run(scenario) == [2, 0, 1]
