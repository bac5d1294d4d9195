"""Run ownership: one owner per run, taken over only from the dead, fenced on every commit."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import pytest
from sqlalchemy import func, insert, select, update

from landscape import Fence, Landscape, OwnershipLost, Recorder, RunOwned, RunStatus
from landscape import _schema as t
from landscape._leases import db_now
from landscape._writer import GroupCommitWriter


@asynccontextmanager
async def running(writer: GroupCommitWriter) -> AsyncIterator[None]:
    async with writer, anyio.create_task_group() as tg:
        await tg.start(writer.run)
        yield
        writer.close()


@contextmanager
def only_ownership_lost() -> Iterator[None]:
    """The block raises :class:`OwnershipLost` (the writer task and its producers each
    may, in a group) and nothing else."""
    with pytest.raises(BaseExceptionGroup) as caught:
        yield
    lost, rest = caught.value.split(OwnershipLost)
    assert lost is not None
    assert rest is None, rest


async def record_run(landscape: Landscape, run_id: str, fence: Fence) -> None:
    """The ``runs`` row of a run started by ``fence``'s owner (status ``running``)."""
    writer = landscape.open_writer(commit_interval=0, fence=fence)
    async with running(writer):
        Recorder(writer, run_id).begin_run(
            config_hash="h", settings={}, engine_version="test", pipeline_name="p"
        )


async def lease_elsewhere(landscape: Landscape, run_id: str, *, heartbeat_age: float) -> None:
    """A lease of ``run_id`` held by a process on another machine, whose last heartbeat
    was ``heartbeat_age`` seconds ago (a 10 s lease)."""
    async with landscape.engine.begin() as conn:
        now = await db_now(conn)
        await conn.execute(
            insert(t.run_leases).values(
                run_id=run_id,
                partition_index=0,
                owner_id="w-elsewhere",
                host="another-machine",
                pid=4242,
                process_key="boot/pid:[1]/99",
                acquired_at=now - 60,
                heartbeat_at=now - heartbeat_age,
                lease_seconds=10.0,
                released_at=None,
                epoch=1,
            )
        )


async def token_count(landscape: Landscape) -> int:
    async with landscape.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(t.tokens))).scalar_one())


async def test_a_run_has_one_owner_and_a_takeover_of_a_live_one_names_it(
    landscape: Landscape,
) -> None:
    async with landscape.own_run("r1", new=True) as first:
        with pytest.raises(RunOwned, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            async with landscape.own_run("r1", new=False):
                pass
    # The first execution ended without releasing: this process knows it is over.
    async with landscape.own_run("r1", new=False) as second:
        assert second.owner_id != first.owner_id


async def test_an_owner_on_another_machine_is_alive_until_its_lease_runs_out(
    landscape: Landscape,
) -> None:
    await lease_elsewhere(landscape, "fresh", heartbeat_age=1.0)
    with pytest.raises(RunOwned, match=r"pid 4242 on another-machine .*heartbeat 1\.\d s ago"):
        async with landscape.own_run("fresh", new=False):
            pass
    await lease_elsewhere(landscape, "stale", heartbeat_age=11.0)
    async with landscape.own_run("stale", new=False) as fence:
        async with landscape.engine.connect() as conn:
            epoch = (
                await conn.execute(
                    select(t.run_leases.c.epoch).where(t.run_leases.c.run_id == "stale")
                )
            ).scalar_one()
        assert epoch == 2
        assert fence.run_id == "stale"


async def test_of_resumes_racing_for_a_dead_owners_run_exactly_one_wins(
    landscape: Landscape,
) -> None:
    await lease_elsewhere(landscape, "contested", heartbeat_age=30.0)
    won: list[str] = []
    refused: list[RunOwned] = []
    others_refused = anyio.Event()

    async def resume() -> None:
        try:
            async with landscape.own_run("contested", new=False) as fence:
                won.append(fence.owner_id)
                await others_refused.wait()  # the winner holds the run meanwhile
        except RunOwned as exc:
            refused.append(exc)
            if len(refused) == 4:
                others_refused.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(resume)
    assert len(won) == 1
    assert len(refused) == 4
    assert all(exc.holder.owner_id == won[0] for exc in refused)


async def test_a_writer_that_lost_its_run_commits_nothing_more(landscape: Landscape) -> None:
    async with landscape.own_run("r2", new=True) as fence:
        writer = landscape.open_writer(commit_interval=0, fence=fence)
        recorder = Recorder(writer, "r2")
        with only_ownership_lost():
            async with running(writer):
                for i in range(3):
                    recorder.token(token_id=f"before-{i}", row_id="row")
                await recorder.flush()
                async with landscape.engine.begin() as conn:  # another process takes it over
                    await conn.execute(update(t.run_leases).values(owner_id="w-other", epoch=2))
                for i in range(3):
                    recorder.token(token_id=f"after-{i}", row_id="row")
                await recorder.flush()
    assert await token_count(landscape) == 3


async def test_ensure_lease_beats_when_unconfirmed_and_fails_once_lost(
    landscape: Landscape,
) -> None:
    async with landscape.own_run("r3", new=True) as claimed:
        # A lease so short that no confirmation is trusted for long: each call beats.
        fence = Fence("r3", claimed.owner_id, lease_seconds=0.03, heartbeat_seconds=0.015)
        writer = landscape.open_writer(commit_interval=0, fence=fence)
        with only_ownership_lost():
            async with running(writer):
                for beat in range(1, 4):
                    await writer.ensure_lease()
                    assert writer.statistics().commits >= beat
                async with landscape.engine.begin() as conn:
                    await conn.execute(update(t.run_leases).values(owner_id="w-other"))
                with pytest.raises(OwnershipLost):
                    await writer.ensure_lease()


async def test_an_idle_owner_keeps_its_run_alive_and_a_dead_one_shows_crashed(
    landscape: Landscape,
) -> None:
    async with landscape.own_run("idle", new=True) as claimed:
        fence = Fence("idle", claimed.owner_id, lease_seconds=0.3, heartbeat_seconds=0.1)
        await record_run(landscape, "idle", fence)
        writer = landscape.open_writer(commit_interval=0, fence=fence)
        async with running(writer):
            # Nothing to commit for four lease lengths: the heartbeats keep it alive.
            await anyio.sleep(1.2)
            summary = await landscape.get_run("idle")
            assert summary is not None
            assert summary.status == RunStatus.RUNNING
            Recorder(writer, "idle").release_run(fence)
    released = await landscape.get_run("idle")
    assert released is not None
    assert released.owner is not None
    assert released.owner.released_at is not None
    # A run whose owner on another machine stopped beating is crashed.
    await lease_elsewhere(landscape, "gone", heartbeat_age=11.0)
    async with landscape.engine.begin() as conn:
        await conn.execute(
            insert(t.runs).values(
                run_id="gone",
                status="running",
                started_at=0.0,
                config_hash="h",
                settings_json="{}",
                engine_version="test",
            )
        )
    crashed = await landscape.get_run("gone")
    assert crashed is not None
    assert crashed.status == RunStatus.CRASHED
    assert [r.status for r in await landscape.list_runs() if r.run_id == "gone"] == ["crashed"]
