"""Where a group commit is executed: in-process through SQLAlchemy, or in a SQLite process.

A committer takes ``(sql, width, columns, values)`` statements — positional SQL
compiled for its dialect; its rows' values one after another, ``width`` to a row; and the
positions in a row of the values the SQL binds — and executes them in one transaction.
It takes them from an iterable, one at a time: the writer makes each statement as it is
wanted, so a large batch is encoded (and freed) a piece at a time between the event
loop's other work.
A statement of width 0 is a **guard**: executed once with ``values`` as its parameters,
it must change exactly one row, or the transaction is rolled back and the committer
raises :class:`OwnershipLost` (the run's lease is someone else's).
:meth:`submit` may return before the transaction is durable (the SQLite process commits
one batch while the engine prepares the next); :meth:`wait_durable` returns once everything
submitted is committed, and raises the error of a batch that failed.  Both translate
driver errors into :class:`AuditIntegrityError` (a constraint refused the write) or
:class:`LandscapeUnavailable` (anything else).
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import struct
import sys
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol, Self

import anyio
import anyio.lowlevel
from anyio.streams.buffered import BufferedByteReceiveStream
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ._errors import AuditIntegrityError, LandscapeUnavailable
from ._leases import OwnershipLost
from ._sqlite_worker import rows_of

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from types import TracebackType

    from anyio.abc import Process
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "Committer",
    "SqlAlchemyCommitter",
    "SqliteProcessCommitter",
    "Statement",
    "Statements",
]

Statement = tuple[str, int, tuple[int, ...], list[Any]]
Statements = list[Statement]
_HEADER = struct.Struct(">Q")
# Values per frame sent to the SQLite process: encoding one takes a few hundred microseconds.
_FRAME_VALUES = 4_096
# Seconds of encoding between two sends (each one a turn for the event loop's other tasks).
_SEND_SLICE = 0.0005
_LEASE_LOST = "the run's lease is held by another owner: this process may write nothing more"
_WORKER = Path(__file__).with_name("_sqlite_worker.py")


def _enlarge_pipe(stream: object) -> None:
    """Ask Linux for a 1 MiB pipe buffer: frames are megabytes, and each 64 KiB refill of
    a default pipe costs an event-loop round trip.  Elsewhere this does nothing."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    writer = getattr(stream, "_stream", None)  # anyio's wrapper of asyncio's StreamWriter
    transport = getattr(writer, "transport", None)
    pipe = transport.get_extra_info("pipe") if transport is not None else None
    if set_size is None or pipe is None:
        return
    # A refusal (a lower fs.pipe-max-size) only costs speed, never correctness.
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), set_size, 1 << 20)


def _frames(statements: Iterable[Statement]) -> Iterator[bytes]:
    """The frames of one batch: each a length-prefixed marshalled ``(last, statements)``
    of about :data:`_FRAME_VALUES` values (a statement is never split)."""
    group: Statements = []
    size = 0
    for statement in statements:
        if group and size + len(statement[3]) > _FRAME_VALUES:
            yield _frame(False, group)
            group, size = [], 0
        group.append(statement)
        size += len(statement[3])
    yield _frame(True, group)


def _slices(frames: Iterator[bytes]) -> Iterator[bytes]:
    """``frames`` joined into one send per :data:`_SEND_SLICE` of encoding: each send
    lets the event loop's other tasks run, and the SQLite process waits for none of them
    while it has frames to execute."""
    pending: list[bytes] = []
    began = perf_counter()
    for frame in frames:
        pending.append(frame)
        if perf_counter() - began >= _SEND_SLICE:
            yield b"".join(pending)
            pending.clear()
            began = perf_counter()
    if pending:
        yield b"".join(pending)


def _frame(last: bool, statements: Statements) -> bytes:
    data = marshal.dumps((last, statements))
    return _HEADER.pack(len(data)) + data


class Committer(Protocol):
    """Executes one batch of statements atomically."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def submit(self, statements: Iterable[Statement]) -> None: ...

    async def wait_durable(self) -> None: ...


class SqlAlchemyCommitter:
    """Commits through the Landscape's own async engine (PostgreSQL, in-memory SQLite)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def wait_durable(self) -> None:
        """Nothing to wait for: :meth:`submit` returns once its transaction committed."""

    async def submit(self, statements: Iterable[Statement]) -> None:
        try:
            async with self._engine.begin() as conn:
                for sql, width, columns, values in statements:
                    if width:
                        await conn.exec_driver_sql(sql, list(rows_of(width, columns, values)))
                        continue
                    guarded = await conn.exec_driver_sql(sql, tuple(values))
                    if guarded.rowcount != 1:
                        raise OwnershipLost(_LEASE_LOST)
        except IntegrityError as exc:
            raise AuditIntegrityError(f"audit write refused by the database: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            raise LandscapeUnavailable(f"audit write failed: {exc}") from exc


class SqliteProcessCommitter:
    """Commits in a child process running :mod:`landscape._sqlite_worker` on the file."""

    def __init__(self, database: str) -> None:
        self._database = database
        self._process: Process | None = None
        self._replies: BufferedByteReceiveStream | None = None
        self._awaiting_answer = False

    async def __aenter__(self) -> Self:
        # Run the worker file itself rather than ``-m landscape._sqlite_worker``: importing
        # the package would load SQLAlchemy in a process that needs only sqlite3.
        command = [sys.executable, str(_WORKER), self._database]
        try:
            # A session of its own: a terminal's Ctrl-C, ``docker stop`` or ``kill -- -PGID``
            # signal the engine's whole process group, and the engine must still be able
            # to commit its shutdown records through this process.  It dies with the
            # engine all the same (see ``_sqlite_worker._die_with_parent``).
            self._process = await anyio.open_process(command, start_new_session=True)
        except OSError as exc:
            raise LandscapeUnavailable(f"cannot start the SQLite writer: {exc}") from exc
        assert self._process.stdout is not None
        self._replies = BufferedByteReceiveStream(self._process.stdout)
        _enlarge_pipe(self._process.stdin)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            assert process.stdin is not None
            await process.stdin.aclose()
            with anyio.move_on_after(30):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()

    async def submit(self, statements: Iterable[Statement]) -> None:
        """Send one batch, a frame at a time; the previous batch's answer is awaited
        first (one in flight)."""
        await self.wait_durable()
        if self._process is None:
            raise LandscapeUnavailable("the SQLite writer process is not running")
        stdin = self._process.stdin
        assert stdin is not None
        # Shielded: the frames of a batch cut short would be committed with the next one.
        with anyio.CancelScope(shield=True):
            try:
                for frames in _slices(_frames(statements)):
                    await stdin.send(frames)
                    # A send that finds room in the pipe returns at once, without a
                    # turn of the loop: let its other tasks run between two slices.
                    await anyio.lowlevel.cancel_shielded_checkpoint()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise LandscapeUnavailable(f"the SQLite writer process died: {exc!r}") from exc
        self._awaiting_answer = True

    async def wait_durable(self) -> None:
        """Read the answer to the batch in flight, if any; raise if it failed."""
        if not self._awaiting_answer:
            return
        assert self._replies is not None
        self._awaiting_answer = False
        try:
            code = await self._replies.receive_exactly(1)
            if code == b"K":
                return
            (length,) = _HEADER.unpack(await self._replies.receive_exactly(_HEADER.size))
            message = (await self._replies.receive_exactly(length)).decode("utf-8", "replace")
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.IncompleteRead) as exc:
            raise LandscapeUnavailable(f"the SQLite writer process died: {exc!r}") from exc
        if code == b"I":
            raise AuditIntegrityError(f"audit write refused by the database: {message}")
        if code == b"F":
            raise OwnershipLost(_LEASE_LOST)
        raise LandscapeUnavailable(f"audit write failed: {message}")
