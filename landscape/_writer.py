"""The one task that writes the Landscape: queued records, group-committed.

Producers append rows with :meth:`GroupCommitWriter.insert` / :meth:`update` (never
blocking); the writer task takes everything queued so far and writes it in one
transaction, tables in :data:`INSERT_ORDER`.  A record appended after another is
committed in the same transaction or a later one, which is what the ordering rules of
the audit trail rely on.  The queue is bounded by its producers: they await
:meth:`wait_writable` before admitting new work.

A writer given a :class:`~landscape._leases.Fence` writes for the owner of a run: each
transaction begins with the fence's guard (the run's lease, still held by this owner,
gets its heartbeat), and fails with :class:`OwnershipLost` when the lease is someone
else's.  While there is nothing to commit the writer commits the guard alone every
``heartbeat_seconds``, so a live owner's lease never runs out.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Self

import anyio
from sqlalchemy import and_, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from ._committers import Committer, SqlAlchemyCommitter, Statement
from ._errors import AuditIntegrityError, LandscapeUnavailable
from ._leases import OwnershipLost, guard_statement
from ._schema import INSERT_ORDER, payloads

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from types import TracebackType

    from anyio.abc import TaskStatus
    from sqlalchemy import Table
    from sqlalchemy.ext.asyncio import AsyncEngine

    from ._leases import Fence

__all__ = ["GroupCommitWriter", "WriterStatistics"]

_SEEN_PAYLOADS = 32_768
# Values per chunk of a batch (see _Batch): a few hundred microseconds to encode and to free.
_CHUNK_VALUES = 4_096
# Payloads are longer than other values: a chunk of them holds fewer.
_CHUNK_PAYLOAD_VALUES = 1_024


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    """A snapshot of the writer's counters."""

    pending_records: int
    records_written: int
    commits: int


class _Batch:
    """Everything queued between two commits.

    Rows are queued flat, their values one after another in one list per table, not as a
    tuple each: a run queues a dozen records per row, and as tuples every one of them
    would live through a collection of the garbage collector's young generation (which
    then runs every few dozen rows, a cost the flat lists do not have).  A table's list
    is sealed into a chunk of its own every :data:`_CHUNK_VALUES` values: a commit then
    encodes, sends and frees its batch a chunk at a time, never all of it in one go on
    the event loop.
    """

    __slots__ = ("inserts", "payloads", "sealed", "size", "updates")

    def __init__(self) -> None:
        self.inserts: dict[Table, list[Any]] = {table: [] for table in INSERT_ORDER}
        #: ``hash, content`` pairs; duplicates are filtered by the writer's seen-set.
        self.payloads: list[str] = []
        #: Full chunks per table (``None``: payloads), in the order they were queued.
        self.sealed: dict[Table | None, list[list[Any]]] = {}
        self.updates: list[tuple[Table, dict[str, Any], dict[str, Any]]] = []
        self.size = 0

    def seal(self, table: Table) -> None:
        self.sealed.setdefault(table, []).append(self.inserts[table])
        self.inserts[table] = []

    def seal_payloads(self) -> None:
        self.sealed.setdefault(None, []).append(self.payloads)
        self.payloads = []

    def take(self, table: Table | None) -> list[list[Any]]:
        """Remove and return the queued values of ``table`` (``None``: payloads), chunk
        by chunk, newest last."""
        chunks = self.sealed.pop(table, [])
        if table is None:
            current, self.payloads = self.payloads, []
        else:
            current, self.inserts[table] = self.inserts[table], []
        if current:
            chunks.append(current)
        return chunks


class GroupCommitWriter:
    """Queues audit records and commits them in large transactions from one task."""

    def __init__(
        self,
        engine: AsyncEngine,
        committer: Committer | None = None,
        *,
        commit_interval: float = 0.05,
        high_water: int = 50_000,
        fence: Fence | None = None,
    ) -> None:
        self._dialect = engine.dialect
        self._committer: Committer = committer or SqlAlchemyCommitter(engine)
        self._commit_interval = commit_interval
        self._fence = fence
        #: The first statement of every transaction of a fenced writer.
        self._guard: Statement | None = None
        if fence is not None:
            sql, params = guard_statement(self._dialect, fence)
            self._guard = (sql, 0, (), params)
        self._heartbeat = math.inf if fence is None else fence.heartbeat_seconds
        #: When the latest confirmed commit was sent (``anyio.current_time()``), and until
        #: when it vouches for the lease.
        self._confirmed_sent = -math.inf
        self._trusted_until = -math.inf
        self._lease_confirmed = anyio.Event()
        self._beat_requested = False
        self._in_flight_sent = -math.inf
        # While the committer takes one batch the next one fills: 50,000 records keep a
        # run that outpaces its writer at flat memory (the same peak RSS at 10**5 and
        # 10**6 rows in throughput.py --rss).  A larger mark gives a lagging writer
        # larger, cheaper commits (a million-row run goes ~1.4x faster at 200,000) but
        # memory that grows with it.
        self._high_water = high_water
        self._batch = _Batch()
        # Payload hashes sent lately, in two generations: when the newer one is full it
        # becomes the older one (the previous older one is dropped), so between
        # _SEEN_PAYLOADS and twice that many of the latest are remembered at set speed.
        self._seen_payloads: set[str] = set()
        self._seen_before: set[str] = set()
        self._has_work = anyio.Event()
        self._work_signalled = False
        self._urgent = anyio.Event()
        self._committed = anyio.Event()
        #: Set each time the queue is handed to the committer (room for producers).
        self._drained = anyio.Event()
        #: Records taken from the queue so far: with the queue's size, the sequence
        #: number of the latest record (what a flush waits to see committed).
        self._handed_over = 0
        self._committed_seq = 0
        self._in_flight_seq = 0
        self._flushes_waiting = 0
        self._records_written = 0
        self._commits = 0
        self._closing = False
        self._failure: BaseException | None = None
        self._lock = anyio.Lock()
        #: Records queued inside :meth:`together` blocks not yet left: no batch is cut
        #: while one is open.
        self._holds = 0
        self._released = anyio.Event()
        self._payload_insert = self._payload_statement()
        self._update_sql: dict[tuple[Table, tuple[str, ...], tuple[str, ...]], Any] = {}
        #: Insert SQL per table and the column positions it binds (see _insert_statement).
        self._insert_sql: dict[tuple[Table, tuple[int, ...]], str] = {}
        self._nullable = {
            table: [i for i, c in enumerate(table.columns) if c.nullable] for table in INSERT_ORDER
        }

    async def __aenter__(self) -> Self:
        await self._committer.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit what is still queued (unless the writer failed), then release the committer."""
        with anyio.CancelScope(shield=True):
            try:
                if self._failure is None:
                    await self.aclose()
            finally:
                # The run's tasks keep the writer in reference cycles, which only a full
                # collection frees — rare in a long-lived process: what it holds in
                # proportion to the run (tens of thousands of hashes) goes now.
                self._seen_payloads, self._seen_before = set(), set()
                await self._committer.__aexit__(exc_type, exc, tb)

    # -- producers -------------------------------------------------------------------

    def insert(self, table: Table, values: Mapping[str, Any]) -> None:
        """Queue one row for ``table`` given by column name (absent columns are NULL)."""
        self.insert_row(table, tuple(values.get(column.name) for column in table.columns))

    def insert_row(self, table: Table, row: tuple[Any, ...]) -> None:
        """Queue one row for ``table`` as a tuple in the table's column order (the fast path)."""
        if self._closing:
            self._ensure_open()
        batch = self._batch
        values = batch.inserts[table]
        values.extend(row)
        if len(values) >= _CHUNK_VALUES:
            batch.seal(table)
        batch.size += 1  # _queued, inlined: a dozen records per row come this way
        if not self._work_signalled:
            self._signal_work()

    def payload(self, content_hash: str, content: str) -> None:
        """Queue a content-addressed payload; recently stored hashes are skipped.

        The database ignores a hash it already holds; remembering the most recent ones
        (a bounded number, the oldest forgotten first) saves sending them again.
        """
        seen = self._seen_payloads
        if content_hash in seen or content_hash in self._seen_before:
            return
        if self._closing:
            self._ensure_open()
        seen.add(content_hash)
        if len(seen) >= _SEEN_PAYLOADS:
            self._seen_before, self._seen_payloads = seen, set()
        batch = self._batch
        batch.payloads.extend((content_hash, content))
        if len(batch.payloads) >= _CHUNK_PAYLOAD_VALUES:
            batch.seal_payloads()
        batch.size += 1  # _queued, inlined
        if not self._work_signalled:
            self._signal_work()

    def update(self, table: Table, key: Mapping[str, Any], values: Mapping[str, Any]) -> None:
        """Queue an update of the row of ``table`` whose primary key is ``key``."""
        self._ensure_open()
        self._batch.updates.append((table, dict(key), dict(values)))
        self._queued()

    async def wait_writable(self) -> None:
        """Return once the queue is below its high-water mark (at once when it is)."""
        while self._failure is None and self._batch.size >= self._high_water:
            self._urgent.set()
            await self._drained.wait()
        if self._failure is not None:
            self._raise_failure()

    async def flush(self) -> None:
        """Return once everything queued before this call is committed."""
        target = self._handed_over + self._batch.size
        self._flushes_waiting += 1
        try:
            while self._committed_seq < target:
                self._urgent.set()
                self._has_work.set()
                if self._failure is not None:
                    self._raise_failure()
                await self._committed.wait()
        finally:
            self._flushes_waiting -= 1

    async def ensure_lease(self) -> None:
        """Return once a commit has confirmed the run's lease recently enough to act on
        it — at once, in a run whose commits flow; raise :class:`OwnershipLost` when
        another process holds it.  A writer without a fence returns at once.

        What the run does outside the database (a sink's write) waits on this, so a
        process whose lease ran out never writes after another took the run over.
        """
        asked = anyio.current_time()
        while (
            self._fence is not None
            and anyio.current_time() >= self._trusted_until
            and self._confirmed_sent < asked  # no commit sent since the call confirmed it
        ):
            if self._failure is not None:
                self._raise_failure()
            self._beat_requested = True
            self._urgent.set()
            self._has_work.set()
            await self._lease_confirmed.wait()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Records queued inside this block are committed in one transaction.

        The block may let other tasks run (to keep the event loop responsive while it
        queues many records); no batch is cut until it is left.  It must not wait for
        the writer — for room, a flush or the lease — or it would wait for itself.
        """
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds:
                self._released.set()
                self._released = anyio.Event()

    def close(self) -> None:
        """Ask the writer to commit what is queued and stop."""
        self._closing = True
        self._has_work.set()
        self._urgent.set()

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(self._batch.size, self._records_written, self._commits)

    def _queued(self) -> None:
        """Count a record just queued (inlined in :meth:`insert_row` and :meth:`payload`)."""
        self._batch.size += 1
        if not self._work_signalled:
            self._signal_work()

    def _signal_work(self) -> None:
        self._work_signalled = True
        self._has_work.set()

    def _raise_failure(self) -> NoReturn:
        """Raise, to a producer, why the writer failed (a lost lease as itself)."""
        failure = self._failure
        if isinstance(failure, OwnershipLost):
            raise OwnershipLost(str(failure)) from failure
        raise AuditIntegrityError("the Landscape writer has failed") from failure

    def _ensure_open(self) -> None:
        if self._failure is not None:
            self._raise_failure()
        if self._closing:
            raise AuditIntegrityError("audit record submitted after the writer was closed")

    # -- the writer task -------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write queued batches until :meth:`close` and the queue is empty.

        Signals ``started`` once it is ready to accept records.  A failed commit is
        raised (the run cannot go on without its audit trail).  When cancelled, it
        commits what is queued inside a shielded scope, then lets the cancellation through.
        """
        task_status.started()
        try:
            while not (self._closing and not self._batch.size):
                if not self._work_signalled and self._in_flight_seq > self._committed_seq:
                    await self._commit_queued()  # idle: confirm the batch in flight now
                with anyio.move_on_after(self._heartbeat) as idle:
                    await self._has_work.wait()
                if not self._closing and not idle.cancelled_caught:
                    with anyio.move_on_after(self._commit_interval):
                        await self._urgent.wait()
                self._has_work = anyio.Event()
                self._work_signalled = False
                self._urgent = anyio.Event()
                beat, self._beat_requested = self._beat_requested, False
                await self._commit_queued(
                    durable=self._closing or self._flushes_waiting > 0 or beat,
                    beat=beat or idle.cancelled_caught,
                )
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._commit_queued()
            raise
        except BaseException as exc:
            self._failure = exc
            self._closing = True  # producers now get the failure from _ensure_open
            self._committed.set()
            self._drained.set()
            self._lease_confirmed.set()
            raise

    async def aclose(self) -> None:
        """Commit everything queued and stop accepting records (safe to call under a shield)."""
        self.close()
        await self._commit_queued()

    async def _commit_queued(self, *, durable: bool = True, beat: bool = False) -> None:
        """Submit what is queued; with ``durable``, also wait until it is committed.

        Without ``durable`` the batch may still be in flight on return (the committer
        keeps at most one): it counts as committed once the committer confirms it.
        With ``beat`` a fenced writer that is not closing commits even an empty batch
        (its guard alone: the lease's heartbeat).
        """
        async with self._lock:
            while self._holds:
                await self._released.wait()
            batch = self._batch
            seq = self._handed_over = self._handed_over + batch.size
            self._batch = _Batch()
            self._drained.set()
            self._drained = anyio.Event()
            # None once closing: the last batch may hold the lease's release, and a guard
            # committed after it would find the lease gone (the run then failed).
            if batch.size or (beat and self._guard is not None and not self._closing):
                sent = anyio.current_time()
                await self._commit(batch)
                # Submitting waited for the answer to the batch before: it is committed.
                self._mark_committed(self._in_flight_seq, self._in_flight_sent)
                self._in_flight_seq, self._in_flight_sent = seq, sent
            if durable:
                await self._committer.wait_durable()
                self._mark_committed(seq, self._in_flight_sent)

    def _mark_committed(self, seq: int, sent: float) -> None:
        """Everything up to record ``seq`` is committed, by a transaction sent at ``sent``
        (whose guard confirmed the lease then)."""
        if seq > self._committed_seq:
            self._committed_seq = seq
            self._committed.set()
            self._committed = anyio.Event()
        if self._fence is not None and sent > self._confirmed_sent:
            self._confirmed_sent = sent
            self._trusted_until = sent + self._fence.trusted_for
            self._lease_confirmed.set()
            self._lease_confirmed = anyio.Event()

    async def _commit(self, batch: _Batch) -> None:
        self._check_widths(batch)
        await self._committer.submit(self._statements(batch))
        self._records_written += batch.size
        self._commits += 1

    @staticmethod
    def _check_widths(batch: _Batch) -> None:
        """Refuse a batch holding a row of the wrong width before any of it is sent."""
        for table in INSERT_ORDER:
            width = len(table.columns)
            chunks = [*batch.sealed.get(table, []), batch.inserts[table]]
            if any(len(values) % width for values in chunks):
                raise AuditIntegrityError(f"{table.name}: a queued row has the wrong width")

    def _statements(self, batch: _Batch) -> Iterator[Statement]:
        """The batch's statements, made one chunk at a time as the committer sends them;
        each chunk leaves the batch as its statement is made, so once sent it is freed."""
        if self._guard is not None:
            yield self._guard
        chunks = batch.take(None)
        while chunks:
            yield self._payload_insert, 2, (0, 1), chunks.pop(0)
        for table in INSERT_ORDER:
            chunks = batch.take(table)
            while chunks:
                yield self._insert_statement(table, chunks.pop(0))
        for queued in batch.updates:
            yield self._update_statement(*queued)

    def _insert_statement(self, table: Table, values: list[Any]) -> Statement:
        """The insert of a batch's ``values`` for ``table`` (its rows one after another).

        A column that is NULL in every row of the batch is left out, to take its default
        NULL: most rows leave the same few columns empty (no error, no context), and the
        sqlite3 driver binds each ``None`` through a slow adapter lookup.
        """
        width = len(table.columns)
        rows, misfit = divmod(len(values), width)
        if misfit:
            raise AuditIntegrityError(f"{table.name}: a queued row has the wrong width")
        # A column the first row sets is not empty: most are, and skip the scan.
        empty = {
            i
            for i in self._nullable[table]
            if values[i] is None and values[i::width].count(None) == rows
        }
        columns = tuple(i for i in range(width) if i not in empty)
        sql = self._insert_sql.get((table, columns))
        if sql is None:  # a handful of shapes per run: compile each once
            names = [table.columns[i].name for i in columns]
            sql = self._insert_sql[table, columns] = self._positional_sql(
                table.insert().values({name: bindparam(name) for name in names}), names
            )
        return sql, width, columns, values

    def _update_statement(
        self, table: Table, key: dict[str, Any], values: dict[str, Any]
    ) -> Statement:
        shape = (table, tuple(key), tuple(values))
        compiled = self._update_sql.get(shape)
        if compiled is None:  # a handful of shapes per run: compile each once
            clause = and_(*(table.c[name] == bindparam(f"k_{name}") for name in key))
            values_clause: dict[str, Any] = {n: bindparam(f"v_{n}") for n in values}
            statement = update(table).where(clause).values(values_clause)
            compiled = self._update_sql[shape] = statement.compile(dialect=self._dialect)
        params = {
            **{f"k_{n}": v for n, v in key.items()},
            **{f"v_{n}": v for n, v in values.items()},
        }
        assert compiled.positiontup is not None
        width = len(params)
        return str(compiled), width, tuple(range(width)), [params[n] for n in compiled.positiontup]

    def _positional_sql(self, statement: Any, names: list[str]) -> str:
        """``statement`` compiled for this dialect with positional parameters for the
        columns ``names``, in that order.

        Rows are queued flat and handed to the driver's ``executemany`` as they are:
        per-row parameter processing in SQLAlchemy would cost more than the insert.
        """
        compiled = statement.compile(dialect=self._dialect)
        if compiled.positiontup is None or list(compiled.positiontup) != names:
            raise LandscapeUnavailable(
                f"{self._dialect.name}: cannot insert positionally into {statement.table.name}"
            )
        return str(compiled)

    def _payload_statement(self) -> str:
        if self._dialect.name == "postgresql":
            stmt: Any = postgresql.insert(payloads).on_conflict_do_nothing(index_elements=["hash"])
        elif self._dialect.name == "sqlite":
            stmt = sqlite.insert(payloads).on_conflict_do_nothing(index_elements=["hash"])
        else:
            stmt = payloads.insert()
        names = [c.name for c in payloads.columns]
        return self._positional_sql(stmt.values({n: bindparam(n) for n in names}), names)
