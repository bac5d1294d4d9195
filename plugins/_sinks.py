"""Built-in sinks: ``csv`` and ``jsonl`` files, and a ``database`` table.

Every sink makes a batch durable before :meth:`~plugins.protocols.Sink.write` returns:
file sinks write, flush and ``fsync`` in one worker-thread hop per batch; the database
sink commits one transaction per batch.  A row the sink cannot represent is left out and
returned as a :class:`~plugins.protocols.SinkRejection`; the rest of the batch is written.
Problems with the sink as a whole (an unwritable file, an unreachable database, an
existing table of the wrong shape) raise :class:`SinkError`.

Each sink keeps its artifact's hash as it writes: file sinks hash the exact bytes of the
file; the database sink hashes the canonical JSON lines of the rows it wrote, in order.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import re
import string
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import orjson
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from plugins.protocols import (
    Artifact,
    PluginSetup,
    Row,
    Sink,
    SinkItem,
    SinkRejection,
    SinkWriteError,
)

__all__ = [
    "CsvSink",
    "CsvSinkOptions",
    "DatabaseSink",
    "DatabaseSinkOptions",
    "JsonlSink",
    "JsonlSinkOptions",
    "SinkError",
]

_INT64 = range(-(2**63), 2**63)
_FLAT_NON_FLOAT = frozenset({str, int, bool, type(None)})
_RESERVED = ("token_id", "row_index")


class SinkError(Exception):
    """The sink as a whole cannot write: unwritable file, database error, wrong table."""


class _Unrepresentable(Exception):
    """One row cannot be written by this sink; ``str(exc)`` is the rejection's reason."""


def _json_default(value: Any) -> Any:
    """``json`` hook: dates, datetimes and times as ISO 8601 strings."""
    if isinstance(value, date | time):
        return value.isoformat()
    raise TypeError(f"a {type(value).__name__} is not JSON serialisable")


def _json_text(value: Any) -> str:
    """Compact JSON of ``value``; raises :class:`_Unrepresentable` when it has none."""
    try:
        return json.dumps(
            value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default
        )
    except (TypeError, ValueError) as exc:
        raise _Unrepresentable(f"not representable as JSON: {exc}") from exc


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Unrepresentable(f"not representable as UTF-8: {exc.reason}") from exc


@asynccontextmanager
async def _close_on_failure(sink: Sink) -> AsyncIterator[None]:
    """Close ``sink`` (shielded from cancellation) when the block raises.

    ``async with sink`` does not call ``__aexit__`` when ``__aenter__`` fails, so a
    failing :meth:`open` must release what it already acquired itself.
    """
    try:
        yield
    except BaseException:
        with anyio.CancelScope(shield=True):
            await sink.aclose()
        raise


# -- files --------------------------------------------------------------------------------


class _FileSinkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path


class CsvSinkOptions(_FileSinkOptions):
    columns: list[str] | None = Field(default=None, min_length=1)

    @field_validator("columns")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("column names must be unique")
        return value


class JsonlSinkOptions(_FileSinkOptions):
    pass


def _lock(file: io.FileIO) -> None:
    """Hold ``file`` exclusively for as long as it is open (an advisory lock, POSIX).

    Two processes writing one output — two runs of a pipeline, or a run and a resume
    of it — would interleave their bytes; the second is refused instead.  The lock
    ends with the process, however it ends.
    """
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(
            errno.EAGAIN, "another process is writing it (another run of this pipeline?)"
        ) from None


def _create_file(path: Path) -> io.FileIO:
    """Create (or truncate) ``path`` and its parent directories, locked (see
    :func:`_lock`: a file another process writes is left untouched); the entry is
    fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unbuffered: a refused write must leave no bytes behind for a later flush.
    file = io.FileIO(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666), "wb")
    try:
        _lock(file)
        file.truncate(0)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        file.close()
        raise
    return file


def _write_durably(file: io.FileIO, data: bytes, size: int) -> None:
    """Append ``data`` to ``file`` (``size`` bytes long, unbuffered) and fsync it.

    A write the system refuses (a full disk, a file size limit, an I/O error) raises
    :class:`SinkWriteError` with the file cut back to ``size`` bytes, as it was; if even
    that fails, the ``OSError`` of the cut is raised: the file's state is then unknown.
    """
    try:
        view = memoryview(data)
        while view:
            view = view[file.write(view) or 0 :]
        os.fsync(file.fileno())
    except OSError as refused:
        file.seek(size)
        file.truncate(size)
        os.fsync(file.fileno())
        raise SinkWriteError(f"the write was refused: {refused.strerror or refused}") from refused


def _reopen_at(path: Path, size: int) -> tuple[io.FileIO, Any]:
    """``path`` opened for appending after its first ``size`` bytes (the rest is cut
    off, durably), with the SHA-256 of those bytes."""
    file = io.FileIO(path, "r+b")
    try:
        _lock(file)
        actual = os.fstat(file.fileno()).st_size
        if actual < size:
            raise OSError(0, f"the file has {actual} bytes, fewer than the {size} recorded")
        digest = hashlib.sha256()
        remaining = size
        while remaining:
            chunk = file.read(min(remaining, 1 << 20))
            digest.update(chunk)
            remaining -= len(chunk)
        file.truncate(size)
        file.seek(size)
        os.fsync(file.fileno())
    except BaseException:
        file.close()
        raise
    return file, digest


class _FileSink(Sink):
    """A sink appending encoded rows to one file it creates; subclasses encode rows."""

    options: _FileSinkOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        self._path = setup.resolve(self.options.path).absolute()
        self._file: io.FileIO | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._rows = 0

    async def open(self) -> None:
        """Create the file (truncating it) and write the preamble, if any, durably."""
        if self._file is not None:
            raise RuntimeError(f"{self.name} sink {self._path} is already open")
        async with _close_on_failure(self):
            try:
                self._file = await anyio.to_thread.run_sync(_create_file, self._path)
            except OSError as exc:
                raise SinkError(f"cannot create {self._path}: {exc.strerror or exc}") from exc
            await self._append(self._preamble(), 0)

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        """Append the representable rows; flushed and fsynced when this returns."""
        chunks: list[bytes] = [self._batch_prefix(items)]
        rejections: list[SinkRejection] = []
        for item in items:
            try:
                chunks.append(self._encode(item.row))
            except _Unrepresentable as exc:
                rejections.append(SinkRejection(item.token_id, str(exc)))
        await self._append(b"".join(chunks), len(items) - len(rejections))
        return rejections

    async def aclose(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            await anyio.to_thread.run_sync(file.close)

    def position(self) -> dict[str, Any]:
        """The file's size, row count and SHA-256 after the last write."""
        return {"bytes": self._size, "rows": self._rows, "sha256": self._hash.hexdigest()}

    async def resume(self, position: Any) -> None:
        """Re-open the file, cut to ``position`` (what the recorded outcomes cover), to append.

        Without a position (nothing recorded as written) the file is created afresh.  A
        file whose bytes up to the position are not the ones the run wrote (their
        SHA-256 is in the position) is refused: appending to it would hide the change.
        """
        if position is None:
            await self.open()
            return
        if self._file is not None:
            raise RuntimeError(f"{self.name} sink {self._path} is already open")
        size, rows = int(position["bytes"]), int(position["rows"])
        try:
            self._file, self._hash = await anyio.to_thread.run_sync(_reopen_at, self._path, size)
        except OSError as exc:
            raise SinkError(f"cannot resume {self._path}: {exc.strerror or exc}") from exc
        recorded = position.get("sha256")
        if recorded is not None and recorded != self._hash.hexdigest():
            await self.aclose()
            raise SinkError(
                f"cannot resume {self._path}: its first {size} bytes are not what the run "
                "wrote (the file was changed since); restore it, or start a new run"
            )
        self._size, self._rows = size, rows
        self._restore(position)

    def _restore(self, position: Mapping[str, Any]) -> None:
        """Take up what a subclass keeps in its position (see :meth:`position`)."""

    def artifact(self) -> Artifact | None:
        """The file's URI, the SHA-256 and size of its bytes, and the rows in it."""
        return Artifact(
            uri=self._path.as_uri(),
            content_hash=self._hash.hexdigest(),
            size_bytes=self._size,
            rows_written=self._rows,
        )

    async def _append(self, data: bytes, rows: int) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.name} sink {self._path} is not open")
        if data:
            try:
                await anyio.to_thread.run_sync(_write_durably, self._file, data, self._size)
            except OSError as exc:
                raise SinkError(f"cannot write {self._path}: {exc.strerror or exc}") from exc
        self._hash.update(data)
        self._size += len(data)
        self._rows += rows

    def _preamble(self) -> bytes:
        """Bytes written once when the file is created."""
        return b""

    def _batch_prefix(self, items: Sequence[SinkItem]) -> bytes:
        """Bytes written before a batch's rows (in the same durable write)."""
        return b""

    def _encode(self, row: Row) -> bytes:
        """One row's bytes; raises :class:`_Unrepresentable` for a row it cannot write."""
        raise NotImplementedError


class JsonlSink(_FileSink):
    """One compact JSON object per line (UTF-8); dates and datetimes as ISO strings.

    A row with a value JSON cannot hold (NaN, infinity, bytes, other objects) is rejected.
    """

    name: ClassVar[str] = "jsonl"
    Options: ClassVar[type[BaseModel] | None] = JsonlSinkOptions
    options: JsonlSinkOptions

    def _encode(self, row: Row) -> bytes:
        return _flat_json_line(row) or _utf8(_json_text(row) + "\n")


def _flat_json_line(row: Row) -> bytes | None:
    """orjson's line for a flat row whose bytes it provably prints as :func:`_json_text`
    does, else ``None`` (the general path decides).

    The two agree on strings, ints within 64 bits, booleans and ``null``, and on floats
    from 1e-4 up to 1e16 (where Python's ``repr`` has no exponent); orjson refuses
    the rest (non-string keys, lone surrogates, huge ints) itself.  Several times cheaper
    per row than :mod:`json`.
    """
    # One pass that stops at the first misfit is cheaper than set()/map() passes in C
    # for a row's few values; NaN fails the range test (every comparison is false).
    for value in row.values():
        kind = type(value)
        if kind is float:
            if not 1e-4 <= abs(value) < 1e16:
                return None
        elif kind not in _FLAT_NON_FLOAT:
            return None
    try:
        return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return None


class _LineCatcher:
    """A file-like target for :func:`csv.writer` that keeps the last line written."""

    line = ""

    def write(self, text: str) -> int:
        self.line = text
        return len(text)


def _csv_cell(value: Any) -> str:
    """The text of one CSV cell (``None`` is empty; containers are JSON)."""
    if isinstance(value, str):
        return str.__str__(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, dict | list | tuple):
        return _json_text(value)
    raise _Unrepresentable(f"a {type(value).__name__} value has no CSV text")


class CsvSink(_FileSink):
    """A CSV file (UTF-8, ``\\n`` line ends) with a header of ``columns``.

    ``columns`` defaults to the keys of the first row written.  A row with a field that
    is not a column is rejected; a column missing from a row is written empty.  With
    explicit ``columns`` the header is written on open, so even an empty run leaves a
    header-only file.
    """

    name: ClassVar[str] = "csv"
    Options: ClassVar[type[BaseModel] | None] = CsvSinkOptions
    options: CsvSinkOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        self._columns: list[str] = []
        self._column_set: frozenset[str] = frozenset()
        self._catcher = _LineCatcher()
        self._writer = csv.writer(self._catcher, lineterminator="\n")

    def _preamble(self) -> bytes:
        return self._header(self.options.columns) if self.options.columns else b""

    def _header(self, columns: list[str]) -> bytes:
        self._set_columns(columns)
        self._writer.writerow(columns)
        return _utf8(self._catcher.line)

    def position(self) -> dict[str, Any]:
        return {**super().position(), "columns": self._columns}

    def _restore(self, position: Mapping[str, Any]) -> None:
        self._set_columns(position.get("columns") or [])

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        """As the file sinks do; a refused first write leaves the header still to write."""
        columns = self._columns
        try:
            return await super().write(items)
        except SinkWriteError:
            self._set_columns(columns)
            raise

    def _set_columns(self, columns: Sequence[str]) -> None:
        self._columns = list(columns)
        self._column_set = frozenset(columns)

    def _batch_prefix(self, items: Sequence[SinkItem]) -> bytes:
        if self._columns or not items:
            return b""
        return self._header(list(items[0].row))

    def _encode(self, row: Row) -> bytes:
        unknown = [field for field in row if field not in self._column_set]
        if unknown:
            names = ", ".join(map(repr, unknown))
            what = "field {} is not a column" if len(unknown) == 1 else "fields {} are not columns"
            raise _Unrepresentable(f"{what.format(names)} of {self._path.name}")
        self._writer.writerow([_csv_cell(row.get(column)) for column in self._columns])
        return _utf8(self._catcher.line)


# -- database -----------------------------------------------------------------------------

_UPSERT_INSERTS: dict[str, Callable[[sa.Table], Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}


class DatabaseSinkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    table: str = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _async_upsert_url(cls, value: str) -> str:
        try:
            url = make_url(value)
            is_async = url.get_dialect().is_async
        except (ArgumentError, ImportError) as exc:
            raise ValueError(f"not a usable SQLAlchemy URL: {exc}") from exc
        if url.get_backend_name() not in _UPSERT_INSERTS:
            raise ValueError(f"backend {url.get_backend_name()!r} is not sqlite or postgresql")
        if not is_async:
            raise ValueError(f"driver {url.drivername!r} is not async (use aiosqlite or asyncpg)")
        return value


Fitter = Callable[[Any], Any]
"""Turns a row value into a column value, or raises :class:`_Unrepresentable`."""


def _fit_int(value: Any) -> Any:
    if value is None or (type(value) is int and value in _INT64):
        return value
    raise _Unrepresentable(f"{value!r} does not fit a 64-bit integer column")


def _fit_float(value: Any) -> Any:
    if value is None or (type(value) in (int, float) and _finite(value)):
        if type(value) is int and (value not in _INT64 or float(value) != value):
            # A double cannot hold it: stored, it would silently become another number.
            raise _Unrepresentable(f"{value!r} has no exact value in a float column")
        return value
    raise _Unrepresentable(f"{value!r} is not a finite number for a float column")


def _finite(number: float) -> bool:
    """Whether ``number`` is a finite float (an int too large for a float is not)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def _fit_bool(value: Any) -> Any:
    if value is None or type(value) is bool:
        return value
    raise _Unrepresentable(f"{value!r} is not a bool for a boolean column")


def _fit_text(value: Any) -> Any:
    """Strings as they are; numbers, bools and containers as JSON; dates as ISO."""
    if value is None:
        return None
    if isinstance(value, date | time):
        text = value.isoformat()
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float | dict | list | tuple):
        text = _json_text(value)
    else:
        raise _Unrepresentable(f"a {type(value).__name__} value has no text form")
    if "\x00" in text:
        raise _Unrepresentable("text with a NUL character cannot be stored")
    if not text.isascii():
        _utf8(text)  # a lone surrogate has no UTF-8: the driver would fail the batch
    return text


def _fit_instance(kind: type) -> Fitter:
    def fit(value: Any) -> Any:
        if value is None or (type(value) is kind):
            return value
        raise _Unrepresentable(f"{value!r} is not a {kind.__name__} for a {kind.__name__} column")

    return fit


def _unsupported(column_type: sa.types.TypeEngine[Any]) -> Fitter:
    def fit(value: Any) -> Any:
        raise _Unrepresentable(f"column type {column_type} is not supported by the sink")

    return fit


def _fitter(column: sa.Column[Any]) -> Fitter:
    """The value check/conversion for one column, chosen by its SQL type."""
    kind = column.type
    fitters: list[tuple[type | tuple[type, ...], Fitter]] = [
        (sa.Boolean, _fit_bool),
        (sa.Integer, _fit_int),
        ((sa.Float, sa.Numeric), _fit_float),  # siblings, not parent and child, in 2.1
        (sa.String, _fit_text),
        (sa.DateTime, _fit_instance(datetime)),
        (sa.Date, _fit_instance(date)),
    ]
    return next((fit for sql, fit in fitters if isinstance(kind, sql)), _unsupported(kind))


def _column_type(value: Any) -> sa.types.TypeEngine[Any]:
    """The SQL type inferred for a first-row value (bool before int: bools are ints)."""
    if isinstance(value, bool):
        return sa.Boolean()
    if isinstance(value, int):
        # Beyond 64 bits SQLite has no exact integer type: TEXT keeps every digit.
        return sa.BigInteger() if value in _INT64 else sa.Text()
    if isinstance(value, float):
        return sa.Float()
    return sa.Text()


#: PostgreSQL keeps the first 63 bytes of a longer name (its NAMEDATALEN - 1).
_MAX_NAME_BYTES = 63
_NAME_DIGEST_CHARS = 12
_UNSAFE_IN_NAMES = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


@functools.lru_cache(maxsize=4096)
def _column_name(field: str) -> str:
    """The column a row's field is written to.

    A field name is its own column name when it is safe everywhere: not empty, at most
    63 bytes of UTF-8, without control characters (NUL included) or lone surrogates.
    Any other name becomes its safe characters (each unsafe one replaced by ``_``, cut
    to 50 bytes) followed by ``_`` and the first 12 hex digits of the SHA-256 of the
    name's UTF-8 (surrogates kept as they are): two long names sharing a prefix stay
    apart, and the same name always maps to the same column.
    """
    encoded = field.encode("utf-8", "surrogatepass")
    if field and len(encoded) <= _MAX_NAME_BYTES and not _UNSAFE_IN_NAMES.search(field):
        return field
    digest = hashlib.sha256(encoded).hexdigest()[:_NAME_DIGEST_CHARS]
    room = _MAX_NAME_BYTES - _NAME_DIGEST_CHARS - 1
    safe = _UNSAFE_IN_NAMES.sub("_", field).encode("utf-8")[:room].decode("utf-8", "ignore")
    return f"{safe or 'field'}_{digest}"


def _same_column_key(dialect: str) -> Callable[[str], str]:
    """What makes two column names one column in ``dialect``: SQLite folds ASCII case."""
    if dialect == "sqlite":
        return lambda name: name.translate(_ASCII_LOWER)
    return lambda name: name


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _new_table(name: str, row: Row, dialect: str) -> sa.Table:
    """A table keyed by ``token_id`` with one column per field of ``row`` (named by
    :func:`_column_name`; of fields sharing a column, the first)."""
    key = _same_column_key(dialect)
    taken = {key(reserved) for reserved in _RESERVED}
    columns: list[sa.Column[Any]] = []
    for field, value in row.items():
        column = _column_name(field)
        if key(column) not in taken:
            taken.add(key(column))
            columns.append(sa.Column(column, _column_type(value)))
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("token_id", sa.Text(), primary_key=True),
        sa.Column("row_index", sa.BigInteger(), nullable=False),
        *columns,
    )


def _reflect(connection: sa.Connection, name: str) -> sa.Table | None:
    """The existing table ``name``, or ``None`` when there is none."""
    if not sa.inspect(connection).has_table(name):
        return None
    return sa.Table(name, sa.MetaData(), autoload_with=connection)


def _canonical_line(row: Row) -> bytes:
    text = json.dumps(row, sort_keys=True, separators=(",", ":"), default=str)
    return text.encode("utf-8", "backslashreplace") + b"\n"


class _Target:
    """The table a database sink writes, its upsert statement and its column fitters."""

    def __init__(self, table: sa.Table, dialect: str, *, exists: bool) -> None:
        missing = [name for name in _RESERVED if name not in table.c]
        if missing or list(table.primary_key.columns.keys()) != ["token_id"]:
            raise SinkError(
                f"table {table.name!r} exists but is not keyed by token_id with a row_index"
            )
        self.table = table
        self.exists = exists
        self.same_column = _same_column_key(dialect)
        self.fitters = {c.name: _fitter(c) for c in table.columns if c.name not in _RESERVED}
        insert = _UPSERT_INSERTS[dialect](table)
        updates = {c.name: insert.excluded[c.name] for c in table.columns if c.name != "token_id"}
        self.upsert = insert.on_conflict_do_update(index_elements=["token_id"], set_=updates)

    def params(self, item: SinkItem) -> dict[str, Any]:
        """The statement parameters of one item; raises :class:`_Unrepresentable`."""
        params: dict[str, Any] = dict.fromkeys(self.fitters)
        params["token_id"] = item.token_id
        params["row_index"] = item.row_index
        taken: dict[str, str] = {self.same_column(name): name for name in _RESERVED}
        for field, value in item.row.items():
            column = _column_name(field)
            other = taken.get(self.same_column(column))
            if other is not None:
                raise _Unrepresentable(self._collision(field, other, column))
            taken[self.same_column(column)] = field
            fit = self.fitters.get(column)
            if fit is None:
                table = self.table.name
                raise _Unrepresentable(f"field {field!r} has no column in table {table!r}")
            try:
                params[column] = fit(value)
            except _Unrepresentable as exc:
                raise _Unrepresentable(f"field {field!r}: {exc}") from exc
        return params

    def _collision(self, field: str, other: str, column: str) -> str:
        if field == other:
            return f"field {field!r} is reserved for the sink's own column"
        if other in _RESERVED:
            return f"field {field!r} maps to the sink's own column {other!r}"
        return f"fields {other!r} and {field!r} map to one column {column!r}"


def _resolve_url(url: str, setup: PluginSetup) -> URL:
    """``url`` with a relative SQLite file path made relative to the pipeline's directory."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return parsed
    if database.startswith("file:"):
        return parsed
    return parsed.set(database=str(setup.resolve(database).absolute()))


class DatabaseSink(Sink):
    """Rows upserted by ``token_id`` into ``table`` (SQLite or PostgreSQL, async driver).

    A missing table is created from the first row written: ``token_id`` (primary key),
    ``row_index`` and one column per field, typed from its value (int → BIGINT, float →
    FLOAT, bool → BOOLEAN, anything else → TEXT; an int beyond 64 bits → TEXT holding
    all its digits, and a float column takes only ints a double holds exactly).  Column
    names are the field names, except a name that is empty, longer than 63 bytes of
    UTF-8, or holds a control character (NUL included) or a lone surrogate: it becomes
    its safe characters (the others replaced by ``_``, cut to 50 bytes), ``_`` and the
    first 12 hex digits of the SHA-256 of the name.  A row the sink cannot write — a
    field with no column, two fields on one column (``Name`` and ``name`` on SQLite,
    whose names ignore ASCII case), a field on ``token_id`` or ``row_index``, a value
    its column cannot hold, a row that breaks a constraint of an existing table — is a
    write failure of that row alone, settled by ``on_write_failure``.  Re-writing a token
    replaces its row.
    """

    name: ClassVar[str] = "database"
    Options: ClassVar[type[BaseModel] | None] = DatabaseSinkOptions
    options: DatabaseSinkOptions

    def __init__(self, options: Any, setup: PluginSetup) -> None:
        super().__init__(options, setup)
        self._url = _resolve_url(self.options.url, setup)
        self._engine: AsyncEngine | None = None
        self._target: _Target | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._rows = 0

    async def open(self) -> None:
        """Connect and look up the table (created on the first write if missing)."""
        if self._engine is not None:
            raise RuntimeError(f"database sink {self._where()} is already open")
        # Statement parameters are rows' contents: kept out of errors (and so of logs).
        self._engine = engine = create_async_engine(self._url, hide_parameters=True)
        async with _close_on_failure(self):
            try:
                if self._url.get_backend_name() == "sqlite" and self._url.database:
                    await anyio.to_thread.run_sync(_make_parent, self._url.database)
                async with engine.connect() as connection:
                    table = await connection.run_sync(_reflect, self.options.table)
            except (SQLAlchemyError, OSError) as exc:  # drivers raise OSError on connect
                raise SinkError(f"database sink {self._where()}: {exc}") from exc
            if table is not None:
                self._target = _Target(table, engine.dialect.name, exists=True)

    async def write(self, items: Sequence[SinkItem]) -> Sequence[SinkRejection]:
        """Upsert the representable rows in one transaction, committed when this returns."""
        if self._engine is None:
            raise RuntimeError(f"database sink {self._where()} is not open")
        if not items:
            return []
        target = self._target or self._new_target(items[0].row)
        params, lines, rejections = _prepare(target, items)
        try:
            async with self._engine.begin() as connection:
                if not target.exists:
                    await connection.run_sync(target.table.create, checkfirst=True)
                if params:
                    await connection.execute(target.upsert, params)
        except (IntegrityError, DataError) as exc:
            # The transaction was rolled back: a row broke a constraint of the table.
            raise SinkWriteError(f"database sink {self._where()}: {exc.orig}") from exc
        except (SQLAlchemyError, OSError) as exc:  # drivers raise OSError on connect
            raise SinkError(f"database sink {self._where()}: {exc}") from exc
        target.exists = True
        self._record(lines)
        return rejections

    def position(self) -> dict[str, Any]:
        """Rows written so far (re-writing a token replaces its row, so no cut is needed)."""
        return {"rows": self._rows}

    async def resume(self, position: Any) -> None:
        """Open as usual; the count of rows written goes on from ``position``.

        The artifact's hash then covers the rows written since the resume.
        """
        await self.open()
        if position is not None:
            self._rows = int(position["rows"])

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    def artifact(self) -> Artifact | None:
        """The table's URL (password hidden) and the hash of the rows written, in order."""
        return Artifact(
            uri=self._where(),
            content_hash=self._hash.hexdigest(),
            size_bytes=self._size,
            rows_written=self._rows,
        )

    def _where(self) -> str:
        return f"{self._url.render_as_string(hide_password=True)}#{self.options.table}"

    def _new_target(self, row: Row) -> _Target:
        assert self._engine is not None
        dialect = self._engine.dialect.name
        self._target = _Target(_new_table(self.options.table, row, dialect), dialect, exists=False)
        return self._target

    def _record(self, lines: list[bytes]) -> None:
        for line in lines:
            self._hash.update(line)
            self._size += len(line)
        self._rows += len(lines)


def _make_parent(database: str) -> None:
    Path(database).parent.mkdir(parents=True, exist_ok=True)


def _prepare(
    target: _Target, items: Sequence[SinkItem]
) -> tuple[list[dict[str, Any]], list[bytes], list[SinkRejection]]:
    """Statement parameters (one per token, the last write winning), hash lines, rejections."""
    by_token: dict[str, dict[str, Any]] = {}
    lines: list[bytes] = []
    rejections: list[SinkRejection] = []
    for item in items:
        try:
            by_token[item.token_id] = target.params(item)
        except _Unrepresentable as exc:
            rejections.append(SinkRejection(item.token_id, str(exc)))
        else:
            lines.append(_canonical_line(item.row))
    return list(by_token.values()), lines, rejections
