"""The SQLite commit process: runs group commits on its own core.

Started by :class:`~landscape._committers.SqliteProcessCommitter` as
``python .../landscape/_sqlite_worker.py DATABASE``; it imports only the standard library.
It reads frames from stdin — an 8-byte big-endian length, then a marshalled list of
``(sql, width, columns, values)`` statements: ``values`` holds the rows' values one after
another, ``width`` to a row, and the SQL binds those at the positions ``columns`` —
executes each frame in one transaction, and answers ``K`` (committed) or ``E`` plus a
length-prefixed message (``I`` for an integrity error, ``F`` when a guard — a statement
of width 0, executed once with ``values`` as parameters — changed other than one row:
the transaction is rolled back).  EOF on stdin ends it; SIGINT and
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


def rows_of(width: int, columns: tuple[int, ...], values: list[Any]) -> Iterator[tuple[Any, ...]]:
    """The rows of a statement's flat ``values`` (``width`` to a row), each with the values
    at the positions ``columns``; a ragged tail raises ``ValueError``."""
    return zip(*[values[i::width] for i in columns], strict=True)


def _read_frame(stream: BinaryIO) -> _Statements | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (length,) = _HEADER.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    statements: _Statements = marshal.loads(payload)
    return statements


def _reply(stream: BinaryIO, code: bytes, message: str = "") -> None:
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
    # Audit keys are hashes and ids inserted in random order: a large page cache keeps
    # the index pages they touch in memory instead of re-reading them per insert.
    db.execute("PRAGMA cache_size=-262144")
    return db


class _GuardFailed(Exception):
    """A guard statement changed other than exactly one row."""


def _commit(db: sqlite3.Connection, statements: _Statements) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql, width, columns, values in statements:
            if width:
                db.executemany(sql, rows_of(width, columns, values))
            elif db.execute(sql, values).rowcount != 1:
                raise _GuardFailed(sql)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


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
        while (statements := _read_frame(source)) is not None:
            try:
                _commit(db, statements)
            except _GuardFailed as exc:
                _reply(sink, b"F", str(exc))
            except sqlite3.IntegrityError as exc:
                _reply(sink, b"I", str(exc))
            except sqlite3.Error as exc:
                _reply(sink, b"E", f"{type(exc).__name__}: {exc}")
            else:
                _reply(sink, b"K")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
