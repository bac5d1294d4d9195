"""Built-in sources: ``csv``, ``jsonl``, ``json`` and ``memory``.

Every source yields one :class:`~plugins.protocols.SourceRecord` per record, in file
order; the n-th record yielded (0-based, malformed ones included) is row ``n``.  A record
that cannot be parsed is yielded with ``row=None``, its raw content and an error naming
its line (or array element); only problems with the file as a whole raise
:class:`SourceError`.

File sources parse in a worker thread, :data:`CHUNK_SIZE` records per hop, so the event
loop never waits on the disk; ``csv`` and ``jsonl`` stream, ``json`` parses the whole
document (a JSON array cannot be read in pieces with the standard library).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
from collections import Counter, deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any, ClassVar

import anyio
import anyio.lowlevel
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, SkipValidation, field_validator

from plugins.protocols import Source, SourceRecord

__all__ = [
    "CHUNK_SIZE",
    "CsvSource",
    "CsvSourceOptions",
    "JsonSource",
    "JsonSourceOptions",
    "JsonlSource",
    "JsonlSourceOptions",
    "MemorySource",
    "MemorySourceOptions",
    "SourceError",
]

CHUNK_SIZE = 1_000
"""Records parsed per worker-thread hop (and memory items per event-loop checkpoint)."""

Records = Generator[SourceRecord, None, None]

_UNDECODABLE = re.compile("[\udc80-\udcff]")


class SourceError(Exception):
    """The source as a whole cannot be read: missing file, unparsable document, bad layout."""


class _FileOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path


class CsvSourceOptions(_FileOptions):
    delimiter: str = ","
    encoding: str = "utf-8"
    skip_rows: int = Field(default=0, ge=0, description="lines skipped before the header")

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, value: str) -> str:
        if len(value) != 1 or value in '\r\n"':
            raise ValueError("must be one character other than a quote or a line break")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError as exc:
            raise ValueError(f"unknown encoding {value!r}") from exc
        return value


class JsonlSourceOptions(_FileOptions):
    pass


class JsonSourceOptions(_FileOptions):
    data_key: str | None = None


class MemorySourceOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    #: Data, not configuration: left out of the node's recorded config (``exclude``).
    rows: SkipValidation[Iterable[Any] | AsyncIterable[Any]] = Field(exclude=True)

    @field_validator("rows")
    @classmethod
    def _iterable(cls, value: Any) -> Any:
        if isinstance(value, str | bytes | Mapping) or not isinstance(
            value, Iterable | AsyncIterable
        ):
            raise ValueError(f"must be an iterable of dicts, not {type(value).__name__}")
        return value


# -- shared machinery ---------------------------------------------------------------------


async def _stream(records: Records, start_index: int) -> AsyncGenerator[SourceRecord, None]:
    """Yield ``records`` from ``start_index`` on, pulling them in chunks in a worker thread.

    The generator (and with it the file) is closed when this iterator finishes, fails or
    is closed early.
    """
    try:
        if start_index:
            await anyio.to_thread.run_sync(_skip, records, start_index)
        while chunk := await anyio.to_thread.run_sync(_take, records, CHUNK_SIZE):
            for record in chunk:
                yield record
    finally:
        records.close()


def _skip(records: Iterator[SourceRecord], count: int) -> None:
    deque(islice(records, count), maxlen=0)


def _take(records: Iterator[SourceRecord], count: int) -> list[SourceRecord]:
    return list(islice(records, count))


def _no_position(source: Source, resume_from: Mapping[str, Any] | None) -> None:
    if resume_from is not None:
        raise SourceError(f"a {source.name} source cannot resume from a position")


def _check_start(start_index: int) -> int:
    if start_index < 0:
        raise ValueError(f"start_index must be >= 0, got {start_index}")
    return start_index


def _cannot_open(path: Path, exc: OSError) -> SourceError:
    return SourceError(f"cannot open {path}: {exc.strerror or exc}")


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be opened for reading (``None`` when it can)."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return str(_cannot_open(path, exc))


class _FileSource(Source):
    """A source reading one file, named by its ``path`` option."""

    options: _FileOptions

    async def check_readable(self) -> str | None:
        return await anyio.to_thread.run_sync(_unreadable, self.setup.resolve(self.options.path))


def _bad(raw: Any, error: str) -> SourceRecord:
    return SourceRecord(row=None, raw=raw, error=error)


def _json_type(value: Any) -> str:
    """How JSON calls the type of a parsed value, for error messages."""
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", type(None): "null"}
    return names.get(type(value), "a number")


def _reject_constant(name: str) -> Any:
    """``json`` hook: NaN and infinities are not JSON and have no canonical form."""
    raise ValueError(f"{name} is not a valid JSON value")


# -- csv ----------------------------------------------------------------------------------


def _tap(lines: Iterable[str], taken: list[str]) -> Iterator[str]:
    """Pass ``lines`` through, appending each to ``taken`` (the current record's lines)."""
    for line in lines:
        taken.append(line)
        yield line


class _CsvParser:
    """Turns the lines of one CSV file into records; knows the current record's lines."""

    def __init__(self, lines: Iterator[str], options: CsvSourceOptions) -> None:
        self._taken: list[str] = []
        self._reader = csv.reader(
            _tap(lines, self._taken), delimiter=options.delimiter, strict=True
        )
        self._offset = options.skip_rows
        self._encoding = options.encoding
        self._header: list[str] = []

    def records(self) -> Records:
        """The file's data records, after its header; nothing for a file without a header."""
        if not self._read_header():
            return
        while (record := self._next_record()) is not None:
            yield record

    def _next_fields(self) -> list[str] | None:
        """The next non-blank record's fields (``None`` at end of file)."""
        while True:
            self._taken.clear()
            try:
                fields = next(self._reader)
            except StopIteration:
                return None
            except UnicodeDecodeError as exc:
                raise SourceError(f"{self._where()}: cannot decode as {self._encoding}") from exc
            if fields:
                return fields

    def _read_header(self) -> bool:
        try:
            header = self._next_fields()
        except csv.Error as exc:
            raise SourceError(f"header, {self._where()}: {exc}") from exc
        if header is None:
            return False
        if (problem := self._undecodable()) or (problem := _duplicates(header)):
            raise SourceError(f"header, {self._where()}: {problem}")
        self._header = header
        return True

    def _next_record(self) -> SourceRecord | None:
        try:
            fields = self._next_fields()
        except csv.Error as exc:
            return _bad(self._raw_text(), f"{self._where()}: {exc}")
        if fields is None:
            return None
        if problem := self._undecodable():
            return _bad(self._raw_text(), f"{self._where()}: {problem}")
        if len(fields) != len(self._header):
            expected = len(self._header)
            error = f"{self._where()}: expected {expected} fields, got {len(fields)}"
            return _bad(self._raw_text(), error)
        row = dict(zip(self._header, fields, strict=True))
        return SourceRecord(row=row, raw=row)

    def _where(self) -> str:
        """``line N`` (or ``lines N-M``) of the current record, 1-based in the file."""
        last = self._offset + self._reader.line_num
        first = last - max(len(self._taken), 1) + 1
        return f"line {last}" if first == last else f"lines {first}-{last}"

    def _undecodable(self) -> str | None:
        """Why the current record's bytes are not valid text, or ``None`` when they are."""
        for line in self._taken:
            if not line.isascii() and (found := _UNDECODABLE.search(line)):
                byte = ord(found.group()) - 0xDC00
                return f"invalid {self._encoding} (undecodable byte 0x{byte:02x})"
        return None

    def _raw_text(self) -> str:
        """The record's text, bad bytes shown as ``\\xNN``, without its line break."""
        text = "".join(self._taken).rstrip("\r\n")
        if text.isascii() or not _UNDECODABLE.search(text):
            return text
        original = text.encode(self._encoding, "surrogateescape")
        return original.decode(self._encoding, "backslashreplace")


def _duplicates(header: list[str]) -> str | None:
    """Why ``header`` cannot key a dict (a name used twice), or ``None``."""
    repeated = [name for name, count in Counter(header).items() if count > 1]
    return f"duplicate column names: {', '.join(map(repr, repeated))}" if repeated else None


def _csv_records(path: Path, options: CsvSourceOptions) -> Records:
    """All records of a CSV file; opens it lazily (in the thread that first pulls)."""
    is_utf8 = codecs.lookup(options.encoding).name == "utf-8"
    encoding = "utf-8-sig" if is_utf8 else options.encoding  # drops a leading BOM
    try:
        file = open(path, encoding=encoding, errors="surrogateescape", newline="")  # noqa: SIM115
    except OSError as exc:
        raise _cannot_open(path, exc) from exc
    with file:
        lines = iter(file)
        deque(islice(lines, options.skip_rows), maxlen=0)
        yield from _CsvParser(lines, options).records()


class CsvSource(_FileSource):
    """Rows of a CSV file with a header line; every value is a ``str``.

    Blank lines are skipped (they are not records).  A record with a wrong number of
    fields, bad quoting (text after a closing quote, a quote left open at the end of the
    file), a field over :func:`csv.field_size_limit` or bytes invalid in ``encoding`` is
    yielded as malformed; a header that is unreadable or repeats a name raises
    :class:`SourceError`.
    """

    name: ClassVar[str] = "csv"
    Options: ClassVar[type[BaseModel] | None] = CsvSourceOptions
    options: CsvSourceOptions

    def read(
        self, *, start_index: int = 0, resume_from: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[SourceRecord, None]:
        _no_position(self, resume_from)
        path = self.setup.resolve(self.options.path)
        return _stream(_csv_records(path, self.options), _check_start(start_index))


# -- jsonl --------------------------------------------------------------------------------


def _jsonl_record(line: bytes, number: int, position: _LinePosition) -> SourceRecord:
    """The record of one non-blank line: a JSON object, else a malformed record."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raw = line.decode("utf-8", "backslashreplace").rstrip("\r\n")
        bad_byte = line[exc.start]
        error = f"line {number}: invalid utf-8 (undecodable byte 0x{bad_byte:02x})"
        return SourceRecord(None, raw, error, position)
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        return SourceRecord(
            None, text.rstrip("\r\n"), f"line {number}: invalid JSON: {exc}", position
        )
    if type(value) is not dict:
        error = f"line {number}: expected a JSON object, got {_json_type(value)}"
        return SourceRecord(None, value, error, position)
    return SourceRecord(row=value, raw=value, position=position)


@dataclass(frozen=True, slots=True)
class _LinePosition:
    """Just after a line of a file: its byte offset, its line number, and the SHA-256 of
    the bytes before it (a running hash, copied; hex-digested only when recorded)."""

    offset: int
    line: int
    prefix: Any = field(compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _LinePosition:
        return cls(int(data["offset"]), int(data["line"]), str(data["sha256"]))

    def to_json(self) -> dict[str, Any]:
        digest = self.prefix if isinstance(self.prefix, str) else self.prefix.hexdigest()
        return {"offset": self.offset, "line": self.line, "sha256": digest}

    def check_prefix(self, path: Path) -> str | None:
        """Why ``path``'s first ``offset`` bytes are not the ones hashed, or ``None``."""
        try:
            with open(path, "rb") as file:
                digest = _hash_bytes(file, self.offset)
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror or exc}"
        if digest is None:
            return f"{path.name} is now shorter than the {self.offset} bytes read"
        if digest.hexdigest() != self.to_json()["sha256"]:
            return f"the first {self.line} lines of {path.name} are not the ones read"
        return None


_START = _LinePosition(0, 0, None)


def _hash_bytes(file: IO[bytes], count: int) -> Any:
    """SHA-256 of the next ``count`` bytes of ``file`` (``None`` if it has fewer)."""
    digest = hashlib.sha256()
    while count:
        chunk = file.read(min(count, 1 << 20))
        if not chunk:
            return None
        digest.update(chunk)
        count -= len(chunk)
    return digest


def _jsonl_records(path: Path, start: _LinePosition) -> Records:
    """The records of a JSON Lines file after ``start``, one per non-blank line, each
    with its position."""
    try:
        file = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise _cannot_open(path, exc) from exc
    with file:
        digest = _hash_bytes(file, start.offset) if start.offset else hashlib.sha256()
        if digest is None:
            raise SourceError(f"{path} is shorter than the position resumed from")
        offset, number = start.offset, start.line
        for line in file:
            number += 1
            offset += len(line)
            digest.update(line)
            data = line.removeprefix(codecs.BOM_UTF8) if number == 1 else line
            if data.strip():
                yield _jsonl_record(data, number, _LinePosition(offset, number, digest.copy()))


class JsonlSource(_FileSource):
    """Rows of a JSON Lines file: one JSON object per line; blank lines are skipped.

    A line that is not UTF-8, not JSON (NaN and infinities included) or not an object
    is yielded as malformed.
    """

    name: ClassVar[str] = "jsonl"
    Options: ClassVar[type[BaseModel] | None] = JsonlSourceOptions
    options: JsonlSourceOptions

    def read(
        self, *, start_index: int = 0, resume_from: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[SourceRecord, None]:
        """The file's records; with ``resume_from``, from the byte offset it names on."""
        path = self.setup.resolve(self.options.path)
        if resume_from is None:
            return _stream(_jsonl_records(path, _START), _check_start(start_index))
        return _stream(_jsonl_records(path, _LinePosition.from_json(resume_from)), 0)

    async def check_position(self, position: Mapping[str, Any]) -> str | None:
        """Whether the file's bytes before ``position`` are still the ones read then."""
        path = self.setup.resolve(self.options.path)
        at = _LinePosition.from_json(position)
        return await anyio.to_thread.run_sync(at.check_prefix, path)


# -- json ---------------------------------------------------------------------------------


def _load_array(path: Path, data_key: str | None) -> list[Any]:
    """The array of a JSON document (or of its ``data_key``); raises :class:`SourceError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _cannot_open(path, exc) from exc
    try:
        document = json.loads(data, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SourceError(f"{path} is not valid JSON: {exc}") from exc
    if data_key is not None:
        document = _member(document, data_key, path)
    if not isinstance(document, list):
        where = f"key {data_key!r}" if data_key is not None else "the top level"
        hint = "" if data_key is not None else " (set data_key to read an array inside it)"
        raise SourceError(f"{path}: expected an array at {where}, got {_json_type(document)}{hint}")
    return document


def _member(document: Any, key: str, path: Path) -> Any:
    if not isinstance(document, dict):
        raise SourceError(f"{path}: data_key {key!r} needs an object at the top level")
    if key not in document:
        keys = ", ".join(map(repr, list(document)[:20])) or "none"
        raise SourceError(f"{path}: data_key {key!r} is not in the document (keys: {keys})")
    return document[key]


def _json_records(path: Path, data_key: str | None) -> Records:
    """The records of a JSON array, one per element."""
    for index, item in enumerate(_load_array(path, data_key)):
        if type(item) is dict:
            yield SourceRecord(row=item, raw=item)
        else:
            yield _bad(item, f"element [{index}]: expected a JSON object, got {_json_type(item)}")


class JsonSource(_FileSource):
    """Rows of a JSON array of objects: the whole file, or the array under ``data_key``.

    An element that is not an object is yielded as malformed; a document that does not
    parse, or has no array where one is expected, raises :class:`SourceError`.
    """

    name: ClassVar[str] = "json"
    Options: ClassVar[type[BaseModel] | None] = JsonSourceOptions
    options: JsonSourceOptions

    def read(
        self, *, start_index: int = 0, resume_from: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[SourceRecord, None]:
        _no_position(self, resume_from)
        path = self.setup.resolve(self.options.path)
        records = _json_records(path, self.options.data_key)
        return _stream(records, _check_start(start_index))


# -- memory -------------------------------------------------------------------------------


def _memory_record(item: Any, index: int) -> SourceRecord:
    """A record of a copy of ``item`` if it is a mapping with string keys, else malformed."""
    if type(item) is dict or isinstance(item, Mapping):
        for key in item:
            if type(key) is not str:
                return _bad(repr(item), f"item {index}: keys must be strings, got {key!r}")
        row = dict(item)
        return SourceRecord(row=row, raw=row)
    return _bad(repr(item), f"item {index}: expected a dict, got {type(item).__name__}")


async def _memory_sync(rows: Iterable[Any], start_index: int) -> AsyncGenerator[SourceRecord, None]:
    for index, item in enumerate(rows):
        if index % CHUNK_SIZE == 0:
            await anyio.lowlevel.checkpoint()
        if index >= start_index:
            yield _memory_record(item, index)


async def _memory_async(
    rows: AsyncIterable[Any], start_index: int
) -> AsyncGenerator[SourceRecord, None]:
    index = 0
    async for item in rows:
        if index >= start_index:
            yield _memory_record(item, index)
        index += 1


class MemorySource(Source):
    """Rows from a Python iterable or async iterable (Python pipelines and tests only).

    Each mapping is copied into a new dict; anything else is yielded as malformed with
    its ``repr`` as raw content.  A one-shot iterator (a generator) can be read once, so
    resuming needs a re-iterable such as a list.
    """

    name: ClassVar[str] = "memory"
    Options: ClassVar[type[BaseModel] | None] = MemorySourceOptions
    options: MemorySourceOptions

    def read(
        self, *, start_index: int = 0, resume_from: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[SourceRecord, None]:
        _no_position(self, resume_from)
        rows = self.options.rows
        start = _check_start(start_index)
        if isinstance(rows, AsyncIterable):
            return _memory_async(rows, start)
        return _memory_sync(rows, start)

    @property
    def one_shot(self) -> bool:
        """Whether ``rows`` is an iterator (sync or async), which is used up by one read."""
        rows = self.options.rows
        if isinstance(rows, AsyncIterable):
            return isinstance(rows, AsyncIterator) and aiter(rows) is rows
        return isinstance(rows, Iterator) and iter(rows) is rows
