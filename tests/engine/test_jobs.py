"""The hand-off of a concurrent node's jobs from its feeder to idle workers."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from engine._jobs import Jobs


async def test_every_job_reaches_exactly_one_worker_and_close_ends_them_all() -> None:
    jobs: Jobs[int] = Jobs()
    taken: list[tuple[int, int]] = []
    ended: list[int] = []

    async def worker(number: int) -> None:
        while (job := await jobs.get()) is not None:
            taken.append((number, job))
            await anyio.lowlevel.checkpoint()
        ended.append(number)

    async with anyio.create_task_group() as tg:
        for number in range(4):
            tg.start_soon(worker, number)
        await anyio.wait_all_tasks_blocked()
        for job in range(100):
            jobs.put(job)
            if job % 7 == 0:
                await anyio.lowlevel.checkpoint()
        jobs.close()
    assert sorted(job for _, job in taken) == list(range(100))
    assert len({number for number, _ in taken}) == 4  # idle workers share the work
    assert sorted(ended) == [0, 1, 2, 3]


async def test_jobs_queued_before_close_are_still_taken() -> None:
    jobs: Jobs[str] = Jobs()
    jobs.put("a")
    jobs.put("b")
    jobs.close()
    assert [await jobs.get(), await jobs.get(), await jobs.get()] == ["a", "b", None]
    with pytest.raises(RuntimeError, match="after close"):
        jobs.put("c")


async def test_a_cancelled_worker_is_not_handed_the_next_job() -> None:
    jobs: Jobs[str] = Jobs()
    got: list[str | None] = []

    async def waits_then_cancelled(scope: anyio.CancelScope) -> None:
        with scope:
            await jobs.get()

    async def keeps_working() -> None:
        got.append(await jobs.get())

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waits_then_cancelled, scope)  # waits first: first in line
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(keeps_working)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        jobs.put("job")
    assert got == ["job"]


async def test_a_job_handed_to_a_worker_cancelled_meanwhile_goes_to_the_next_idle_one() -> None:
    jobs: Jobs[str] = Jobs()
    got: list[str | None] = []

    async def waits_then_cancelled(scope: anyio.CancelScope) -> None:
        with scope:
            await jobs.get()

    async def keeps_working() -> None:
        got.append(await jobs.get())

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(waits_then_cancelled, scope)  # waits first: first in line
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(keeps_working)
        await anyio.wait_all_tasks_blocked()
        # The cancellation is on its way but not yet seen when the job wakes the worker.
        scope.cancel()
        jobs.put("job")
        await anyio.wait_all_tasks_blocked()
        assert got == ["job"]  # before close(), which would wake every worker anyway
        jobs.close()
