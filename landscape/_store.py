"""Opening a Landscape database and reading it back."""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import anyio.to_thread
from sqlalchemy import and_, case, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from . import _schema as t
from ._committers import Committer, SqliteProcessCommitter
from ._errors import LandscapeError, LandscapeNotFound, LandscapeUnavailable
from ._leases import (
    Fence,
    LeaseHolder,
    Owner,
    claim_run,
    forget_lease,
    lease_holders,
    take_over_run,
)
from ._lineage import Lineage, explain
from ._migrate import SchemaState, lock_schema, schema_state, upgrade_schema
from ._outcomes import Outcome, RunStatus
from ._recorder import Recorder
from ._replay import load_answers
from ._resume import UnfinishedRun, load_unfinished
from ._sql import load_payloads
from ._verify import VerifyReport, verify
from ._writer import GroupCommitWriter

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["DEFAULT_URL", "CallSummary", "Landscape", "RunSummary", "redact_url"]

DEFAULT_URL = "sqlite+aiosqlite:///runs/audit.db"
_SQLITE_PAGE_SIZE = 65_536


@dataclass(frozen=True, slots=True)
class CallSummary:
    """What a run's external calls added up to, as recorded in ``calls``."""

    calls: int = 0
    retries: int = 0
    errors: int = 0
    tokens: int = 0
    cost: float = 0.0

    def describe(self) -> str:
        """One line, the same in the CLI, the progress display and ``ledgerflow runs``:
        ``calls 12 (2 retries, 1 errors), tokens 1,200, cost 0.0125``."""
        return (
            f"calls {self.calls:,} ({self.retries:,} retries, {self.errors:,} errors), "
            f"tokens {self.tokens:,}, cost {self.cost:.4f}"
        )


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One line of ``ledgerflow runs``."""

    run_id: str
    status: str
    started_at: float
    completed_at: float | None
    pipeline_name: str | None
    rows_processed: int | None
    outcomes: dict[str, int]
    #: External calls of the run: attempts, retries, tokens and cost.
    calls: CallSummary = field(default_factory=CallSummary)
    #: The run whose recorded answers this one replayed, if it is a replay.
    replayed_from: str | None = None
    #: The pipeline file the run was started with, when it was started from one.
    pipeline_file: str | None = None
    #: Who executes the run, or executed it last (``None``: no lease on record).
    owner: LeaseHolder | None = None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # First: switching a new database to WAL needs its lock, which another process
    # opening it at the same moment may hold.
    cursor.execute("PRAGMA busy_timeout=30000")
    # Takes effect only on a database not yet written (a new Landscape).  The audit is
    # write-mostly and its hash indexes take inserts all over: with 64 KiB pages a
    # group commit writes the same bytes in a sixteenth of the pages, and the SQLite
    # writer spends about a third less time per row than with the default 4 KiB.
    cursor.execute(f"PRAGMA page_size={_SQLITE_PAGE_SIZE}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite Landscape URL (``None``: in memory, or a ``file:`` URI)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _prepare_sqlite_path(path: Path, *, create: bool) -> None:
    """Make the directory of a SQLite Landscape file, or (``create=False``) check that
    the file exists: SQLite would create an empty one."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.is_file():
        raise LandscapeNotFound(
            f"there is no Landscape at {path.absolute()}: a run creates it; pass "
            "--landscape (or landscape.url) to read one elsewhere"
        )


@asynccontextmanager
async def _opening(path: Path | None) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on a SQLite Landscape file's directory while the file
    is opened.

    The first connections to a new database switch it to WAL and create its schema,
    and SQLite refuses at once (rather than wait) a connection whose lock could
    deadlock with another one's doing so: processes and tasks opening one file take
    turns here.  The lock is on the directory, never on the database file: closing any
    descriptor of that file would drop the POSIX locks SQLite holds on it in this
    process.
    """
    if path is None:
        yield
        return
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        await anyio.to_thread.run_sync(fcntl.flock, directory, fcntl.LOCK_EX)
        yield
    finally:
        os.close(directory)  # releases the lock


async def _open_schema(engine: AsyncEngine, *, create: bool, where: str) -> None:
    """Check the schema and, if it is absent or outdated, create or upgrade it under the
    schema lock (a current schema costs one inspection and no write)."""
    async with engine.connect() as conn:
        state = await conn.run_sync(schema_state)
    if state is SchemaState.CURRENT:
        return
    if state is SchemaState.ABSENT and not create:
        raise LandscapeNotFound(f"the database at {where} holds no Landscape (no runs table)")
    async with engine.connect() as conn:
        await lock_schema(conn)
        await conn.run_sync(upgrade_schema)
        await conn.commit()


class Landscape:
    """The audit store: ``async with Landscape.connect(url) as ls: ...``.

    Creates the schema on first use.  One instance may record several runs and answer
    queries; it refuses use outside its ``async with`` block.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.create = create
        self._engine: AsyncEngine | None = None

    @classmethod
    def connect(cls, url: str = DEFAULT_URL, *, create: bool = True) -> Self:
        """Return a Landscape for ``url``; enter it with ``async with`` to open it.

        With ``create=False`` (what reading commands use) only an existing Landscape is
        opened: where there is none, entering raises :class:`LandscapeNotFound` and
        nothing is created — no file, no directory, no table.
        """
        return cls(url, create=create)

    async def __aenter__(self) -> Self:
        if self._engine is not None:
            raise LandscapeError("this Landscape is already open")
        try:
            backend = make_url(self.url).get_backend_name()
        except ArgumentError as exc:
            raise LandscapeUnavailable(f"not a database URL: {redact_url(self.url)!r}") from exc
        engine: AsyncEngine | None = None
        try:
            sqlite_file = _sqlite_file(self.url) if backend == "sqlite" else None
            if sqlite_file is not None:
                _prepare_sqlite_path(sqlite_file, create=self.create)
            # The parameters of the Landscape's statements are the audit records: rows'
            # contents.  Kept out of every error's text (and so out of logs); the CLI's
            # --verbose shows them from the error itself.
            engine = create_async_engine(self.url, hide_parameters=True)
            if backend == "sqlite":
                event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
            async with _opening(sqlite_file):
                await _open_schema(engine, create=self.create, where=redact_url(self.url))
        except LandscapeError:
            if engine is not None:
                await engine.dispose()
            raise
        except (SQLAlchemyError, OSError, ImportError) as exc:
            if engine is not None:
                await engine.dispose()
            raise LandscapeUnavailable(
                f"cannot open the Landscape at {redact_url(self.url)}: {exc}"
            ) from exc
        self._engine = engine
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        """The open SQLAlchemy engine (for queries beyond this API)."""
        if self._engine is None:
            raise LandscapeError(
                "the Landscape is not open: use `async with Landscape.connect(url)`"
            )
        return self._engine

    # -- recording ---------------------------------------------------------------------

    @asynccontextmanager
    async def own_run(
        self,
        run_id: str,
        *,
        new: bool,
        lease_seconds: float = 10.0,
        heartbeat_seconds: float = 2.0,
    ) -> AsyncIterator[Fence]:
        """Become the one owner of run ``run_id`` for the block; the fence that its
        writer (:meth:`open_writer`) checks on every commit.

        ``new``: the run is being started (its lease is recorded with it); otherwise it
        is taken over from its last owner, which raises :class:`RunOwned` while that
        owner is alive (see :mod:`landscape._leases`).  The lease is released by the
        execution's last commit (:meth:`Recorder.release_run`); should that never come,
        it expires ``lease_seconds`` after the last heartbeat.
        """
        owner = Owner.here()
        fence = Fence(run_id, owner.owner_id, 0, lease_seconds, heartbeat_seconds)
        try:
            async with self.engine.connect() as conn:
                if new:
                    await claim_run(conn, owner, fence)
                else:
                    await take_over_run(conn, owner, fence)
        except SQLAlchemyError as exc:
            raise LandscapeUnavailable(f"cannot take run {run_id}: {exc}") from exc
        try:
            yield fence
        finally:
            forget_lease(owner)

    def open_writer(
        self, *, commit_interval: float = 0.05, fence: Fence | None = None
    ) -> GroupCommitWriter:
        """A group-commit writer on this database (for the owner of ``fence``'s run).

        Use it as ``async with landscape.open_writer() as writer:`` and run
        ``writer.run`` in a task group inside that block.  On a SQLite file the commits
        run in a child process (see :mod:`landscape._sqlite_worker`); elsewhere through
        the engine.
        """
        committer: Committer | None = None
        sqlite_file = _sqlite_file(self.url) if self.engine.dialect.name == "sqlite" else None
        if sqlite_file is not None:
            committer = SqliteProcessCommitter(str(sqlite_file.resolve()))
        return GroupCommitWriter(
            self.engine, committer, commit_interval=commit_interval, fence=fence
        )

    def recorder(
        self,
        writer: GroupCommitWriter,
        run_id: str,
        *,
        scrub: Callable[[Any], Any] | None = None,
    ) -> Recorder:
        """The recorder of run ``run_id``; ``scrub`` masks secrets in what it records of
        errors, routing reasons and outcome contexts."""
        return Recorder(writer, run_id, scrub=scrub)

    # -- reading -----------------------------------------------------------------------

    async def list_runs(self) -> list[RunSummary]:
        """Every run, newest first (a ``running`` run whose owner died is ``crashed``)."""
        query = select(t.runs).order_by(t.runs.c.started_at.desc())
        async with self.engine.connect() as conn:
            runs = list(await conn.execute(query))
            calls = await _call_summaries(conn, None)
            owners = await lease_holders(conn)
        return [
            _summary(row._mapping, calls.get(row.run_id), owners.get(row.run_id)) for row in runs
        ]

    async def get_run(self, run_id: str) -> RunSummary | None:
        """The run ``run_id`` (``None`` if there is none), its status as :meth:`list_runs`."""
        async with self.engine.connect() as conn:
            result = await conn.execute(select(t.runs).where(t.runs.c.run_id == run_id))
            row = result.first()
            calls = await _call_summaries(conn, run_id)
            owners = await lease_holders(conn, [run_id])
        if row is None:
            return None
        return _summary(row._mapping, calls.get(run_id), owners.get(run_id))

    async def outcome_counts(self, run_id: str) -> dict[str, int]:
        """Terminal outcome counts of ``run_id`` as recorded."""
        query = (
            select(t.token_outcomes.c.outcome, func.count())
            .where(t.token_outcomes.c.run_id == run_id, t.token_outcomes.c.is_terminal)
            .group_by(t.token_outcomes.c.outcome)
        )
        async with self.engine.connect() as conn:
            result = await conn.execute(query)
            return dict(result)

    async def row_errors(self, run_id: str) -> int:
        """How many tokens of ``run_id`` had an error: they ended ``failed`` or
        ``diverted`` (a sink could not write them), or a node sent them down its error
        route (a ``divert`` edge of a transform, gate, join or aggregation: the source's
        invalid records are quarantined, not errors, and a sink's write failures are
        counted by their ``diverted`` outcome)."""
        out, e, d, n = t.token_outcomes, t.routing_events, t.edges, t.nodes
        failed = select(func.count()).where(
            out.c.run_id == run_id,
            out.c.is_terminal,
            out.c.outcome.in_((Outcome.FAILED.value, Outcome.DIVERTED.value)),
        )
        diverted = (
            select(func.count())
            .select_from(e)
            .join(d, and_(d.c.run_id == e.c.run_id, d.c.edge_id == e.c.edge_id))
            .join(n, and_(n.c.run_id == d.c.run_id, n.c.node_id == d.c.from_node_id))
            .where(e.c.run_id == run_id, d.c.mode == "divert")
            .where(n.c.node_type.not_in(("source", "sink")))
        )
        async with self.engine.connect() as conn:
            return int((await conn.execute(failed)).scalar_one()) + int(
                (await conn.execute(diverted)).scalar_one()
            )

    async def load_payload(self, content_hash: str) -> Any:
        """The value stored under ``content_hash`` (``None`` if absent)."""
        query = select(t.payloads.c.content).where(t.payloads.c.hash == content_hash)
        async with self.engine.connect() as conn:
            content = (await conn.execute(query)).scalar_one_or_none()
        return None if content is None else json.loads(content)

    async def unfinished_run(self, run_id: str) -> UnfinishedRun | None:
        """What resuming ``run_id`` needs to know (``None`` if there is no such run)."""
        async with self.engine.connect() as conn:
            return await load_unfinished(conn, run_id)

    async def recorded_answers(self, run_id: str) -> dict[str, tuple[str, Any]] | None:
        """Request hash -> (answer hash, answer), of every answered call of ``run_id``
        (what a replay of it is answered from); ``None`` if there is no such run."""
        async with self.engine.connect() as conn:
            return await load_answers(conn, run_id)

    async def load_payloads(self, hashes: Iterable[str]) -> dict[str, Any]:
        """The values stored under ``hashes`` (absent ones are left out)."""
        async with self.engine.connect() as conn:
            return await load_payloads(conn, hashes)

    async def explain(
        self,
        run_id: str,
        *,
        row_index: int | None = None,
        row_id: str | None = None,
        token_id: str | None = None,
    ) -> Lineage:
        """The lineage of one source row (or of the row a token belongs to)."""
        async with self.engine.connect() as conn:
            return await explain(
                conn, run_id, row_index=row_index, row_id=row_id, token_id=token_id
            )

    async def verify(self, run_id: str, *, deep: bool = False) -> VerifyReport:
        """Check the audit invariants of ``run_id`` (``docs/audit.md``), its sink files
        against their records and, with ``deep``, every payload against its hash."""
        async with self.engine.connect() as conn:
            return await verify(conn, run_id, deep=deep)


async def _call_summaries(conn: AsyncConnection, run_id: str | None) -> dict[str, CallSummary]:
    c = t.calls
    tokens = func.coalesce(c.c.prompt_tokens, 0) + func.coalesce(c.c.completion_tokens, 0)
    query = select(
        c.c.run_id,
        func.count(),
        func.sum(case((c.c.attempt > 1, 1), else_=0)),
        func.sum(case((c.c.status != "success", 1), else_=0)),
        func.sum(tokens),
        func.sum(func.coalesce(c.c.cost, 0.0)),
    ).group_by(c.c.run_id)
    if run_id is not None:
        query = query.where(c.c.run_id == run_id)
    return {
        run: CallSummary(
            int(n), int(retries or 0), int(errors or 0), int(used or 0), float(cost or 0.0)
        )
        for run, n, retries, errors, used, cost in await conn.execute(query)
    }


def _summary(row: Any, calls: CallSummary | None, owner: LeaseHolder | None) -> RunSummary:
    status = row["status"]
    if status == RunStatus.RUNNING and owner is not None and not owner.alive():
        status = RunStatus.CRASHED.value
    return RunSummary(
        run_id=row["run_id"],
        status=status,
        owner=owner,
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        pipeline_name=row["pipeline_name"],
        rows_processed=row["rows_processed"],
        outcomes=json.loads(row["outcomes_json"]) if row["outcomes_json"] else {},
        calls=calls or CallSummary(),
        replayed_from=row["replayed_from"],
        pipeline_file=row["pipeline_file"],
    )


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (also when it does not parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^/@:\s]*:)[^/@\s]*@", r"\1***@", url)
