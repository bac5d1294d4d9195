"""The SQLite commit process: runs group commits on its own core.

Started by :class:`~landscape._committers.SqliteProcessCommitter` as
``python .../landscape/_sqlite_worker.py DATABASE``; it imports only the standard library.
It reads frames from stdin — an 8-byte big-endian length, then a marshalled
``(last, statements)``: a list of ``(sql, width, columns, values)`` statements, whose
``values`` hold the rows' values one after another, ``width`` to a row, bound by the SQL
at the positions ``columns``.  A batch is one or more frames, the last one flagged
``last``, executed as they arrive in one transaction (the engine encodes the next frame
while this one runs), and answered ``K`` (committed) or ``E`` plus a length-prefixed
message (``I`` for an integrity error, ``F`` when a guard — a statement of width 0,
executed once with ``values`` as parameters — changed other than one row): the
transaction is rolled back and the batch's remaining frames are read and dropped.  A
batch cut short by EOF is rolled back.  EOF on stdin ends it; SIGINT and
SIGTERM do not (the engine decides when the audit trail is finished), and the death of
the engine does (Linux: ``PR_SET_PDEATHSIG``).
``marshal`` carries the frames: the values are plain, and it is several times faster
than pickle.

Executing SQLite in a separate process keeps the engine's event loop from competing
for the GIL with parameter binding: on two cores the audit writes then run beside the
pipeline instead of inside it.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import signal
import sqlite3
import struct
import sys
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["main", "rows_of"]

_HEADER = struct.Struct(">Q")


_Statements = list[tuple[str, int, tuple[int, ...], list[Any]]]
_Reply = tuple[bytes, str]


def rows_of(width: int, columns: tuple[int, ...], values: list[Any]) -> Iterator[tuple[Any, ...]]:
    """The rows of a statement's flat ``values`` (``width`` to a row), each with the values
    at the positions ``columns``; a ragged tail raises ``ValueError``."""
    return zip(*[values[i::width] for i in columns], strict=True)


def _read_frame(stream: BinaryIO) -> tuple[bool, _Statements] | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (length,) = _HEADER.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    frame: tuple[bool, _Statements] = marshal.loads(payload)
    return frame


def _reply(stream: BinaryIO, code: bytes, message: str) -> None:
    if code == b"K":
        stream.write(code)
    else:
        data = message.encode("utf-8", "replace")
        stream.write(code + _HEADER.pack(len(data)) + data)
    stream.flush()


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=30000")
    # The page cache fills up to its size whatever the run's length, so it is what
    # this process's memory grows to: 64 MiB.  256 MiB made this process 290 MiB at
    # 200,000 rows for no measurable speed (the writer's CPU per row within noise);
    # 32 MiB costs it about a tenth more CPU per row.
    db.execute("PRAGMA cache_size=-65536")
    return db


class _GuardFailed(Exception):
    """A guard statement changed other than exactly one row."""


def _execute(db: sqlite3.Connection, statements: _Statements) -> None:
    for sql, width, columns, values in statements:
        if width:
            db.executemany(sql, rows_of(width, columns, values))
        elif db.execute(sql, values).rowcount != 1:
            raise _GuardFailed(sql)


def _refusal(exc: BaseException) -> _Reply | None:
    """The answer for a batch that failed with ``exc`` (``None``: not the database's
    refusal, a bug that ends this process)."""
    if isinstance(exc, _GuardFailed):
        return b"F", str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        return b"I", str(exc)
    if isinstance(exc, sqlite3.Error):
        return b"E", f"{type(exc).__name__}: {exc}"
    return None


class _Transaction:
    """The transaction of one batch: begun by its first frame, ended by its last."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._failure: _Reply | None = None

    def execute(self, statements: _Statements) -> None:
        if self._failure is not None:
            return  # the batch has failed: the rest of it is dropped
        try:
            if not self._db.in_transaction:
                self._db.execute("BEGIN IMMEDIATE")
            _execute(self._db, statements)
        except BaseException as exc:
            self._rollback()
            self._failure = _refusal(exc)
            if self._failure is None:
                raise

    def end(self) -> _Reply:
        """Commit the batch (unless it failed); the answer to send."""
        failure, self._failure = self._failure, None
        if failure is not None:
            return failure
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            return _refusal(exc) or (b"E", str(exc))
        return b"K", ""

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


def _die_with_parent() -> None:
    """Be killed with the engine process (Linux): once it is gone, nothing more may be
    committed in its name — a resume may already be reading the Landscape."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _ignore_stop_signals() -> None:
    """Leave SIGINT and SIGTERM to the engine: it stops the run and then closes stdin,
    which ends this process once the shutdown records are committed."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def main(path: str) -> int:
    """Serve commits for the database at ``path`` until stdin closes."""
    _ignore_stop_signals()
    _die_with_parent()
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    db = _connect(path)
    try:
        transaction = _Transaction(db)
        while (frame := _read_frame(source)) is not None:
            last, statements = frame
            transaction.execute(statements)
            if last:
                _reply(sink, *transaction.end())
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
