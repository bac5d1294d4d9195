"""The group-commit writer: ordering, flush, back-pressure, integrity failures, payload dedup."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy import func, select, text

from landscape import _schema as t
from landscape._canonical import canonical_hash
from landscape._errors import AuditIntegrityError
from landscape._outcomes import Outcome
from landscape._recorder import Recorder
from landscape._store import Landscape
from landscape._writer import _CHUNK_VALUES, GroupCommitWriter


@asynccontextmanager
async def running(writer: GroupCommitWriter) -> AsyncIterator[anyio.abc.TaskGroup]:
    """``writer`` entered and its task running; closed (committing the rest) on exit."""
    async with writer, anyio.create_task_group() as tg:
        await tg.start(writer.run)
        yield tg
        writer.close()


async def _count(landscape: Landscape, table: t.Table) -> int:
    async with landscape.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def _token_ids(landscape: Landscape) -> list[str]:
    async with landscape.engine.connect() as conn:
        return sorted((await conn.execute(select(t.tokens.c.token_id))).scalars())


def _tokens(rec: Recorder, ids: range) -> None:
    for i in ids:
        rec.token(token_id=f"tok-{i:05d}", row_id=f"row-{i}")


async def test_commits_keep_submission_order(landscape: Landscape) -> None:
    writer = landscape.open_writer(commit_interval=0)

    async def observe(done: anyio.Event) -> None:
        while not done.is_set():
            ids = await _token_ids(landscape)
            assert ids == [f"tok-{i:05d}" for i in range(len(ids))], "a commit skipped ahead"
            await anyio.lowlevel.checkpoint()

    async with running(writer) as tg:
        done = anyio.Event()
        tg.start_soon(observe, done)
        rec = Recorder(writer, "run-1")
        for start in range(0, 2000, 50):
            _tokens(rec, range(start, start + 50))
            await anyio.sleep(0.002)
        await writer.flush()
        done.set()
    assert await _token_ids(landscape) == [f"tok-{i:05d}" for i in range(2000)]
    assert writer.statistics().commits >= 2
    assert writer.statistics().records_written == 2000


async def test_flush_returns_once_committed(landscape: Landscape) -> None:
    writer = landscape.open_writer(commit_interval=600)
    async with running(writer):
        _tokens(Recorder(writer, "run-1"), range(3))
        await anyio.wait_all_tasks_blocked()
        assert await _count(landscape, t.tokens) == 0
        with anyio.fail_after(10):
            await writer.flush()
        assert await _count(landscape, t.tokens) == 3
        assert writer.statistics().pending_records == 0


async def test_flush_without_records_returns_at_once(landscape: Landscape) -> None:
    writer = landscape.open_writer(commit_interval=600)
    async with running(writer):
        with anyio.fail_after(1):
            await writer.flush()


async def test_wait_writable_blocks_at_high_water_and_resumes(landscape: Landscape) -> None:
    writer = GroupCommitWriter(landscape.engine, commit_interval=600, high_water=10)
    async with writer, anyio.create_task_group() as tg:
        rec = Recorder(writer, "run-1")
        _tokens(rec, range(9))
        with anyio.fail_after(1):
            await writer.wait_writable()  # below the mark: returns without a writer task
        _tokens(rec, range(9, 10))
        resumed = anyio.Event()

        async def producer() -> None:
            await writer.wait_writable()
            resumed.set()

        tg.start_soon(producer)
        await anyio.wait_all_tasks_blocked()
        assert not resumed.is_set()
        await tg.start(writer.run)
        with anyio.fail_after(10):
            await resumed.wait()
        # Room is made when the batch is handed over, not once it is committed.
        await writer.flush()
        assert await _count(landscape, t.tokens) == 10
        writer.close()


def _outcomes(rec: Recorder, *outcomes: Outcome) -> None:
    for outcome in outcomes:
        rec.outcome(token_id="tok-1", outcome=outcome, sink_name="out")


async def _expect_integrity_failure(
    writer: GroupCommitWriter, record: Callable[[Recorder], None]
) -> None:
    """Run ``writer`` while ``record`` queues records; the database must refuse them."""
    caught: list[BaseException] = []
    try:
        async with running(writer):
            record(Recorder(writer, "run-1"))
            await writer.flush()
    except* AuditIntegrityError as group:
        caught.extend(group.exceptions)
    assert any("refused by the database" in str(exc) for exc in caught), caught


async def test_second_terminal_outcome_fails_the_writer(landscape: Landscape) -> None:
    writer = landscape.open_writer()
    await _expect_integrity_failure(
        writer, lambda rec: _outcomes(rec, Outcome.COMPLETED, Outcome.FAILED)
    )
    assert await _count(landscape, t.token_outcomes) == 0


async def test_second_terminal_outcome_in_a_later_commit_fails(landscape: Landscape) -> None:
    first = landscape.open_writer()
    async with running(first):
        _outcomes(Recorder(first, "run-1"), Outcome.BUFFERED, Outcome.COMPLETED)
    await _expect_integrity_failure(
        landscape.open_writer(), lambda rec: _outcomes(rec, Outcome.BUFFERED, Outcome.ROUTED)
    )
    assert await _count(landscape, t.token_outcomes) == 2


async def test_failed_writer_refuses_more_work(landscape: Landscape) -> None:
    writer = GroupCommitWriter(landscape.engine, high_water=2)
    await _expect_integrity_failure(
        writer, lambda rec: _outcomes(rec, Outcome.COMPLETED, Outcome.COMPLETED)
    )
    with anyio.fail_after(5), pytest.raises(AuditIntegrityError, match="has failed"):
        await writer.wait_writable()
    with pytest.raises(AuditIntegrityError, match="has failed"):
        Recorder(writer, "run-1").token(token_id="tok-2", row_id="row-2")


async def test_records_after_close_are_refused(landscape: Landscape) -> None:
    writer = landscape.open_writer()
    async with running(writer):
        pass
    with pytest.raises(AuditIntegrityError, match="after the writer was closed"):
        Recorder(writer, "run-1").token(token_id="tok-1", row_id="row-1")


async def test_payloads_are_stored_once(landscape: Landscape) -> None:
    writer = landscape.open_writer()
    async with running(writer):
        rec = Recorder(writer, "run-1")
        first = rec.store({"a": 1, "b": [1, 2]})
        again = rec.store({"b": [1, 2], "a": 1})
        assert again == first == canonical_hash({"a": 1, "b": [1, 2]})
        await writer.flush()
        rec.store({"a": 1, "b": [1, 2]})
    assert writer.statistics().records_written == 1
    other = landscape.open_writer()
    async with running(other):
        Recorder(other, "run-2").store({"a": 1, "b": [1, 2]})  # a new writer: the database dedups
    assert await _count(landscape, t.payloads) == 1
    assert await landscape.load_payload(first) == {"a": 1, "b": [1, 2]}


async def test_a_row_of_the_wrong_width_fails_the_writer(landscape: Landscape) -> None:
    """Rows are queued flat: one short row must fail the commit, not shift its
    successors' values into the wrong columns."""
    writer = landscape.open_writer()
    caught: list[BaseException] = []
    try:
        async with running(writer):
            writer.insert_row(t.tokens, ("tok-1", "run-1", "row-1", None))
            writer.insert_row(t.tokens, ("tok-2", "run-1", "row-2", None, 0.0))
            await writer.flush()
    except* AuditIntegrityError as group:
        caught.extend(group.exceptions)
    assert any("wrong width" in str(exc) for exc in caught), caught
    assert await _count(landscape, t.tokens) == 0


async def test_columns_null_in_a_whole_commit_are_stored_null(landscape: Landscape) -> None:
    """A column NULL in every row of a commit is left out of its insert; the rows must
    read back the same as when the column is bound, in the same commit or another."""
    writer = landscape.open_writer()
    async with running(writer):
        rec = Recorder(writer, "run-1")
        rec.outcome(token_id="tok-1", outcome=Outcome.COMPLETED, sink_name="out")
        await writer.flush()
        rec.outcome(token_id="tok-2", outcome=Outcome.FAILED, context={"why": "x"})
        rec.outcome(token_id="tok-3", outcome=Outcome.DISCARDED)
    async with landscape.engine.connect() as conn:
        stored = (
            await conn.execute(
                select(
                    t.token_outcomes.c.token_id,
                    t.token_outcomes.c.sink_name,
                    t.token_outcomes.c.batch_id,
                    t.token_outcomes.c.context_json,
                ).order_by(t.token_outcomes.c.token_id)
            )
        ).all()
    assert [tuple(row) for row in stored] == [
        ("tok-1", "out", None, None),
        ("tok-2", None, None, '{"why":"x"}'),
        ("tok-3", None, None, None),
    ]


async def test_a_batch_insert_binds_only_columns_that_hold_a_value(landscape: Landscape) -> None:
    """The NULL-column saving itself: a nullable column empty in every row of a batch is
    not bound, one that holds a value in any row is, and a non-nullable one always is."""
    writer = landscape.open_writer()
    columns = [c.name for c in t.token_outcomes.columns]
    row = dict.fromkeys(columns)
    row.update(outcome_id="o-1", run_id="run-1", token_id="tok-1", outcome="completed")
    row.update(is_terminal=True, recorded_at=0.0)
    other = {**row, "outcome_id": "o-2", "sink_name": "out"}
    values = [row[c] for c in columns] + [other[c] for c in columns]
    sql, width, bound, _ = writer._insert_statement(t.token_outcomes, values)
    bound_names = [columns[i] for i in bound]
    assert width == len(columns)
    assert "sink_name" in bound_names
    assert "batch_id" not in bound_names
    assert "context_json" not in bound_names
    assert "batch_id" not in sql
    assert "sink_name" in sql


async def test_a_batch_of_many_chunks_commits_whole_and_in_order(sqlite_url: str) -> None:
    """The SQLite process is sent a batch a chunk at a time (each frame a turn of the
    event loop); its rows must all land, in the order they were queued (``rowid``), in
    one transaction."""
    count = 3 * _CHUNK_VALUES // len(t.tokens.columns) + 7  # several chunks and a tail
    async with Landscape.connect(sqlite_url) as landscape:
        writer = landscape.open_writer()
        async with running(writer):
            _tokens(Recorder(writer, "run-1"), range(count))
            await writer.flush()
        assert writer.statistics().commits == 1
        async with landscape.engine.connect() as conn:
            query = select(t.tokens.c.token_id).order_by(text("rowid"))
            stored = (await conn.execute(query)).scalars().all()
    assert stored == [f"tok-{i:05d}" for i in range(count)]


async def test_a_batch_refused_in_a_late_chunk_commits_none_of_it(landscape: Landscape) -> None:
    """The database refuses a row in the batch's last chunk: the chunks sent before it
    belong to the same transaction and must not be committed either."""
    count = 2 * _CHUNK_VALUES // len(t.tokens.columns)

    def tokens_then_a_second_terminal_outcome(rec: Recorder) -> None:
        _tokens(rec, range(count))
        _outcomes(rec, Outcome.COMPLETED, Outcome.FAILED)

    await _expect_integrity_failure(landscape.open_writer(), tokens_then_a_second_terminal_outcome)
    assert await _count(landscape, t.tokens) == 0
    assert await _count(landscape, t.token_outcomes) == 0


async def test_a_closing_writer_beats_no_more_after_the_release(landscape: Landscape) -> None:
    """The last batch releases the lease; a heartbeat that fell due while the writer
    closed must not commit its guard after it (the guard would find no lease held, and
    the finished run would fail as taken over)."""
    async with landscape.own_run("r1", new=True) as claimed:
        writer = landscape.open_writer(commit_interval=0, fence=claimed)
        async with writer, anyio.create_task_group() as tg:
            await tg.start(writer.run)
            recorder = Recorder(writer, "r1")
            recorder.begin_run(config_hash="h", settings={}, engine_version="t", pipeline_name="p")
            recorder.release_run(claimed)
            await writer.aclose()
            await writer._commit_queued(beat=True)  # the run loop's idle heartbeat, late
    summary = await landscape.get_run("r1")
    assert summary is not None
    assert summary.owner is not None
    assert summary.owner.released_at is not None


async def test_records_queued_together_commit_in_one_transaction(landscape: Landscape) -> None:
    """A block that lets other tasks run while it queues (a sink recording a write's
    position and outcomes) is never cut in two by a commit: a crash between the two
    commits would leave a position covering rows not on record as written."""
    writer = landscape.open_writer(commit_interval=0)
    async with running(writer) as tg:
        rec = Recorder(writer, "run-1")
        _tokens(rec, range(5))
        await writer.flush()
        flushed = anyio.Event()

        async def flush_meanwhile() -> None:
            await writer.flush()
            flushed.set()

        with rec.together():
            _tokens(rec, range(5, 10))
            tg.start_soon(flush_meanwhile)
            for _ in range(20):  # the writer task and the flusher get many turns
                await anyio.sleep(0.005)
            assert not flushed.is_set()
            assert await _count(landscape, t.tokens) == 5
            _tokens(rec, range(10, 15))
        with anyio.fail_after(10):
            await flushed.wait()
        assert await _token_ids(landscape) == [f"tok-{i:05d}" for i in range(15)]
