"""The streams between nodes: sends wait only for room, or once a node's time slice is up."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from engine._streams import Outbox
from engine._tokens import Token


def _token(i: int) -> Token:
    return Token(f"tok-{i}", f"row-{i}", i, {"i": i}, f"hash-{i}")


async def _set(event: anyio.Event) -> None:
    event.set()


async def _sends_letting_others_run(count: int, time_slice: float) -> list[bool]:
    """Send ``count`` tokens, each after a wait (room for all of them); for each send,
    whether a task started just before it got to run during it."""
    send, receive = anyio.create_memory_object_stream[Token](count)
    outbox = Outbox({"next": send}, time_slice=time_slice)
    ran: list[bool] = []
    async with receive, anyio.create_task_group() as tg:
        for i in range(count):
            other = anyio.Event()
            tg.start_soon(_set, other)  # runs at this task's next yield
            await outbox.send("next", _token(i))
            ran.append(other.is_set())
            await other.wait()  # it runs now at the latest: the next send begins a step
        outbox.close()
    return ran


@pytest.mark.parametrize("time_slice", [3600.0, 0.0], ids=["an hour", "no slices"])
async def test_sends_within_the_time_slice_do_not_yield(time_slice: float) -> None:
    send, receive = anyio.create_memory_object_stream[Token](8)
    outbox = Outbox({"next": send}, time_slice=time_slice)
    async with receive, anyio.create_task_group() as tg:
        other = anyio.Event()
        tg.start_soon(_set, other)
        for i in range(8):
            await outbox.send("next", _token(i))
        assert not other.is_set()
        outbox.close()
        assert [receive.receive_nowait().row_index for _ in range(8)] == list(range(8))


async def test_a_send_past_the_time_slice_lets_other_tasks_run_first() -> None:
    send, receive = anyio.create_memory_object_stream[Token](8)
    outbox = Outbox({"next": send}, time_slice=1e-9)
    async with receive, anyio.create_task_group() as tg:
        other = anyio.Event()
        tg.start_soon(_set, other)
        await outbox.send("next", _token(0))  # the step's first send: it never waits
        assert not other.is_set()
        await outbox.send("next", _token(1))  # the slice (a nanosecond) is used up
        assert other.is_set()
        outbox.close()
        assert [receive.receive_nowait().row_index for _ in range(2)] == [0, 1]


async def test_the_first_send_after_any_wait_begins_a_new_step() -> None:
    """A node that waited for anything at all (a plugin's I/O) sends on at once: its
    time slice is counted from its first send after the wait."""
    assert await _sends_letting_others_run(4, time_slice=1e-9) == [False, False, False, False]


async def test_a_long_stretch_between_sends_yields_once_its_slice_is_used_up() -> None:
    """``yield_if_due`` lets other tasks run past the slice, and is no cancellation
    point: a stretch that must finish (recording a write's outcomes) is not cut short."""
    send, receive = anyio.create_memory_object_stream[Token](1)
    outbox = Outbox({"next": send}, time_slice=1e-9)
    async with receive, anyio.create_task_group() as tg:
        other = anyio.Event()
        tg.start_soon(_set, other)
        await outbox.yield_if_due()  # the step's first look at the clock: within it
        assert not other.is_set()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await outbox.yield_if_due()  # past it: others run, the cancellation waits
            assert other.is_set()
        assert scope.cancelled_caught is False
        outbox.close()
