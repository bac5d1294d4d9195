"""Built-in sources: ``csv``, ``jsonl``, ``json`` and ``memory``.

Every source yields one :class:`~plugins.protocols.SourceRecord` per record, in file
order; the n-th record yielded (0-based, malformed ones included) is row ``n``.  A record
that cannot be parsed is yielded with ``row=None``, its raw content and an error naming
its line (or array element); only problems with the file as a whole raise
:class:`SourceError`.  For the file sources a record is malformed when:

- it is longer than ``source.max_record_bytes`` (:attr:`PluginSetup.max_record_bytes`).
  It is not parsed, and its raw content is ``{"head": its first max_record_bytes bytes
  (as text, bytes invalid in the encoding shown as \\xNN), "record_bytes": its size,
  "record_sha256": the SHA-256 of all its bytes}``.  ``jsonl`` and ``csv`` read such a
  record in bounded pieces, so one costs about the limit in memory, however long;
- its bytes are not valid in the file's encoding;
- (JSON) it does not parse: bad syntax, ``NaN`` or infinities, a number beyond a
  double's range (``1e400``), a lone surrogate (``"\\udfff"``, which has no UTF-8 form),
  or objects and arrays nested deeper than :data:`MAX_RECORD_DEPTH` — so every row
  has a canonical JSON form with room to spare for the levels joins and aggregations
  add.  Integers of any length Python reads (4,300 digits) are valid and kept exact.

File sources parse in a worker thread, :data:`CHUNK_SIZE` records (at most about
:data:`CHUNK_BYTES` of input) per hop, so the event loop never waits on the disk;
``csv`` and ``jsonl`` stream, ``json`` holds its whole document (a JSON array cannot be
read in pieces with the standard library) but parses one element at a time.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
from array import array
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
from itertools import accumulate, islice
from pathlib import Path
from typing import IO, Any, ClassVar

import anyio
import anyio.lowlevel
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, SkipValidation, field_validator

from plugins.protocols import Source, SourceRecord

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_SIZE",
    "MAX_RECORD_DEPTH",
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

CHUNK_BYTES = 8 * 1024 * 1024
"""A hop ends early once its records took this many bytes of input."""

MAX_RECORD_DEPTH = 128
"""The deepest nesting of JSON objects and arrays a record may have.  Landscape hashing
takes twice as deep (``MAX_DEPTH`` of ``landscape._canonical``), which leaves room for
the levels that joins, aggregations and quarantine rows wrap around a row."""

Records = Generator[tuple[SourceRecord, int], None, None]
"""A file's records, each with the bytes of input it took."""

_UNDECODABLE = re.compile("[\udc80-\udcff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A \u escape of a surrogate: the only way JSON text can spell a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# A JSON string, or one that never closes (to the end of the text): every quote starts
# one match, and no match is tried twice, so a scan stays linear on any text.
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
# What the recovery scan of an element that does not parse steps on; a quote left
# alone (the last alternative) opens a string that never closes.
_STRUCTURE = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{},]|"', re.DOTALL)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
# What follows an array element: its delimiter (none, when the document is broken there).
_AFTER_ELEMENT = re.compile(r"[ \t\n\r]*([,\]]?)[ \t\n\r]*")
_JSON_SPACES = " \t\n\r"
# Room for a byte order mark and a CRLF beyond a record of max_record_bytes.
_LINE_SLACK = 5
# The widest characters of the encodings there are (backslash-escaped if need be).
_WIDE_CHARACTERS = ("\U0010ffff", "\uffff", "\u07ff", "\x80", "\udcff")


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


def _skip(records: Records, count: int) -> None:
    deque(islice(records, count), maxlen=0)


def _take(records: Records, count: int) -> list[SourceRecord]:
    """Up to ``count`` records, fewer once they took :data:`CHUNK_BYTES` of input."""
    chunk: list[SourceRecord] = []
    taken = 0
    for record, size in records:
        chunk.append(record)
        taken += size
        if len(chunk) >= count or taken >= CHUNK_BYTES:
            break
    return chunk


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


def _finite_float(text: str) -> float:
    """``json`` hook: a number beyond a double's range (``1e400``) is not read as
    infinity, which has no canonical form.  (Cheaper per float than any scan of the
    text for such numbers is per character.)"""
    number = float(text)
    if number == _INFINITY or number == -_INFINITY:
        raise ValueError(f"number {text[:40]} is beyond the range of a double")
    return number


_INFINITY = float("inf")
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _parse_json(text: str) -> tuple[Any, str | None]:
    """``(value, None)`` for JSON text a row can hold, else ``(None, why)``.

    Never recurses deeper than :data:`MAX_RECORD_DEPTH` levels: deeper text is refused
    before it is parsed.  The checks beyond the parser's own cost a count in C, and a
    walk of the value only for text that spells a surrogate escape.
    """
    if _deeper_than(text, MAX_RECORD_DEPTH):
        return None, f"nested deeper than {MAX_RECORD_DEPTH} levels"
    try:
        value = _DECODER.decode(text)
    except ValueError as exc:  # JSONDecodeError, or more digits than Python converts
        return None, f"invalid JSON: {exc}"
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) and (found := _lone_surrogate(value)):
        return None, f"invalid JSON: a lone surrogate ({found}) has no UTF-8 form"
    return value, None


def _deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests objects and arrays more than ``limit`` deep."""
    if text.count("[") + text.count("{") <= limit:
        return False
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0) > limit


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in the keys and strings of a parsed value (``U+DFFF``),
    or ``None``; walks with a stack of its own."""
    pending = [value]
    while pending:
        item = pending.pop()
        if type(item) is dict:
            texts: Iterable[str] = item.keys()
            pending.extend(item.values())
        elif type(item) is list:
            pending.extend(item)
            continue
        elif type(item) is str:
            texts = (item,)
        else:
            continue
        for text in texts:
            if not text.isascii() and (found := _LONE_SURROGATE.search(text)):
                return f"U+{ord(found.group()):04X}"
    return None


@dataclass(frozen=True, slots=True)
class _Oversize:
    """What is kept of a record longer than the limit: its first bytes, size and hash."""

    head: bytes
    size: int
    sha256: str

    def record(self, where: str, limit: int, position: Any = None) -> SourceRecord:
        raw = {
            "head": self.head.decode("utf-8", "backslashreplace"),
            "record_bytes": self.size,
            "record_sha256": self.sha256,
        }
        error = (
            f"{where}: record is {self.size} bytes, over source.max_record_bytes ({limit}): "
            f"not parsed, stored cut to its first {limit} bytes (SHA-256 of the whole "
            f"record: {self.sha256})"
        )
        return SourceRecord(None, raw, error, position)


def _oversize(data: bytes | memoryview, limit: int) -> _Oversize:
    """What is kept of ``data``, one record read whole."""
    return _Oversize(bytes(data[:limit]), len(data), hashlib.sha256(data).hexdigest())


class _Keeper:
    """Keeps what :class:`_Oversize` needs of a record fed piece by piece: its first
    ``limit`` bytes, its size and its SHA-256, without its final line break."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._head = bytearray()
        self._size = 0
        self._digest = hashlib.sha256()
        self._line_break = b""

    def add(self, piece: bytes) -> None:
        # A line break may end the record: it is counted only once more bytes follow.
        data = self._line_break + piece if self._line_break else piece
        body = data.rstrip(b"\r\n")
        self._line_break = data[len(body) :]
        self._digest.update(body)
        self._size += len(body)
        if len(self._head) < self._limit:
            self._head += body[: self._limit - len(self._head)]

    def result(self) -> _Oversize:
        return _Oversize(bytes(self._head), self._size, self._digest.hexdigest())


# -- csv ----------------------------------------------------------------------------------


class _RecordTooLong(Exception):
    """Raised through :func:`csv.reader` by :class:`_CsvLines` for a record over the
    limit, once all of it was read past."""

    def __init__(self, kept: _Oversize, first_line: int) -> None:
        super().__init__("record too long")
        self.kept = kept
        self.first_line = first_line


class _CsvLines:
    """The lines of a CSV file as :func:`csv.reader` pulls them, each also kept as the
    current record's (``taken``).

    Lines are read in pieces of at most about the limit, so an over-long line is never
    held whole.  Once the record being read is longer than the limit, the rest of it is
    read past — to the end of a line outside quotes: quote characters pair up in CSV —
    hashing its bytes as they come, and :class:`_RecordTooLong` is raised to the reader
    (which starts afresh on its next record).
    """

    def __init__(self, file: IO[str], encoding: str, limit: int) -> None:
        self._file = file
        self._limit = limit
        self._piece = limit + _LINE_SLACK
        # Incremental: a stateful encoding (UTF-16) writes its byte order mark once.
        self._encoder = codecs.getincrementalencoder(encoding)("surrogateescape")
        # Bytes one character can take at most: a record of few enough characters is
        # within the limit without being encoded to count its bytes.
        self._char_bytes = max(
            len(char.encode(encoding, "backslashreplace")) for char in _WIDE_CHARACTERS
        )
        self.taken: list[str] = []
        self.line_num = 0
        #: Characters of the record being read.
        self.record_chars = 0
        self._record_bytes: int | None = None  # counted once it may pass the limit
        self._record_start = 1

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = self._file.readline(self._piece)
        if not line:
            raise StopIteration
        if not self.taken:
            self._record_start = self.line_num + 1
            self.record_chars = 0
            self._record_bytes = None
        self.record_chars += len(line)
        if self.record_chars * self._char_bytes > self._limit and self._over_limit(line):
            raise _RecordTooLong(self._read_past(line), self._record_start)
        self.line_num += 1
        self.taken.append(line)
        return line

    def _over_limit(self, line: str) -> bool:
        """Whether the record is longer than the limit with ``line``, its bytes counted
        (each line once)."""
        if self._record_bytes is None:
            self._record_bytes = sum(len(self._encoder.encode(taken)) for taken in self.taken)
        self._record_bytes += len(self._encoder.encode(line))
        return self._record_bytes > self._limit

    def _read_past(self, piece: str) -> _Oversize:
        """Read to the end of the over-long record that ``piece`` continues; what is
        kept of it."""
        kept = _Keeper(self._limit)
        quotes = 0
        for line in self.taken:
            quotes += line.count('"')
            kept.add(self._encoder.encode(line))
        self.taken.clear()
        while True:
            quotes += piece.count('"')
            kept.add(self._encoder.encode(piece))
            ended = piece.endswith(("\n", "\r"))
            if ended:
                self.line_num += 1
                if quotes % 2 == 0:
                    break
            piece = self._file.readline(self._piece)
            if not piece:
                self.line_num += not ended
                break
        return kept.result()


class _CsvParser:
    """Turns the lines of one CSV file into records; knows the current record's lines."""

    def __init__(self, file: IO[str], options: CsvSourceOptions, limit: int) -> None:
        self._lines = lines = _CsvLines(file, options.encoding, limit)
        self._taken = lines.taken
        self._reader = csv.reader(lines, delimiter=options.delimiter, strict=True)
        self._offset = options.skip_rows
        self._encoding = options.encoding
        self._limit = limit
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
        except _RecordTooLong as exc:
            error = f"header is {exc.kept.size} bytes, over source.max_record_bytes"
            raise SourceError(f"{error} ({self._limit})") from None
        if header is None:
            return False
        if (problem := self._undecodable()) or (problem := _duplicates(header)):
            raise SourceError(f"header, {self._where()}: {problem}")
        self._header = header
        return True

    def _next_record(self) -> tuple[SourceRecord, int] | None:
        try:
            fields = self._next_fields()
        except csv.Error as exc:
            return self._sized(_bad(self._raw_text(), f"{self._where()}: {exc}"))
        except _RecordTooLong as exc:
            where = self._span(exc.first_line, self._lines.line_num)
            return exc.kept.record(where, self._limit), exc.kept.size
        if fields is None:
            return None
        if problem := self._undecodable():
            return self._sized(_bad(self._raw_text(), f"{self._where()}: {problem}"))
        if len(fields) != len(self._header):
            expected = len(self._header)
            error = f"{self._where()}: expected {expected} fields, got {len(fields)}"
            return self._sized(_bad(self._raw_text(), error))
        row = dict(zip(self._header, fields, strict=True))
        return self._sized(SourceRecord(row=row, raw=row))

    def _sized(self, record: SourceRecord) -> tuple[SourceRecord, int]:
        return record, self._lines.record_chars

    def _where(self) -> str:
        """``line N`` (or ``lines N-M``) of the current record, 1-based in the file."""
        last = self._lines.line_num
        return self._span(last - max(len(self._taken), 1) + 1, last)

    def _span(self, first: int, last: int) -> str:
        first, last = first + self._offset, max(first, last) + self._offset
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


def _csv_records(path: Path, options: CsvSourceOptions, limit: int) -> Records:
    """All records of a CSV file; opens it lazily (in the thread that first pulls)."""
    is_utf8 = codecs.lookup(options.encoding).name == "utf-8"
    encoding = "utf-8-sig" if is_utf8 else options.encoding  # drops a leading BOM
    try:
        file = open(path, encoding=encoding, errors="surrogateescape", newline="")  # noqa: SIM115
    except OSError as exc:
        raise _cannot_open(path, exc) from exc
    with file:
        for _ in range(options.skip_rows):
            _skip_line(file, limit)
        yield from _CsvParser(file, options, limit).records()


def _skip_line(file: IO[str], limit: int) -> None:
    """Read past one line, in pieces of about ``limit``."""
    piece = file.readline(limit + _LINE_SLACK)
    while piece and not piece.endswith(("\n", "\r")):
        piece = file.readline(limit + _LINE_SLACK)


class CsvSource(_FileSource):
    """Rows of a CSV file with a header line; every value is a ``str``.

    Blank lines are skipped (they are not records).  A record with a wrong number of
    fields, bad quoting (text after a closing quote, a quote left open at the end of the
    file), a field over :func:`csv.field_size_limit`, bytes invalid in ``encoding`` or
    more bytes than ``source.max_record_bytes`` is yielded as malformed; a header that
    is unreadable, too long or repeats a name raises :class:`SourceError`.
    """

    name: ClassVar[str] = "csv"
    Options: ClassVar[type[BaseModel] | None] = CsvSourceOptions
    options: CsvSourceOptions

    def read(
        self, *, start_index: int = 0, resume_from: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[SourceRecord, None]:
        _no_position(self, resume_from)
        path = self.setup.resolve(self.options.path)
        records = _csv_records(path, self.options, self.setup.max_record_bytes)
        return _stream(records, _check_start(start_index))


# -- jsonl --------------------------------------------------------------------------------


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


def _content_length(line: bytes) -> int:
    """The length of ``line`` without the line break (``\\n``, ``\\r``) it ends with."""
    end = len(line)
    while end and line[end - 1] in b"\r\n":
        end -= 1
    return end


def _decoded_line(
    line: bytes, number: int, position: _LinePosition, limit: int
) -> str | SourceRecord:
    """The text of one whole non-blank line, or its malformed record when it is longer
    than ``limit`` or not UTF-8."""
    size = _content_length(line)
    if size > limit:
        return _oversize(memoryview(line)[:size], limit).record(f"line {number}", limit, position)
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raw = line[:size].decode("utf-8", "backslashreplace")
        error = f"line {number}: invalid utf-8 (undecodable byte 0x{line[exc.start]:02x})"
        return SourceRecord(None, raw, error, position)


def _jsonl_record(text: str, number: int, position: _LinePosition) -> SourceRecord:
    """The record of one line's text: a JSON object, else a malformed record."""
    value, problem = _parse_json(text)
    if problem is not None:
        return SourceRecord(None, text.rstrip("\r\n"), f"line {number}: {problem}", position)
    if type(value) is not dict:
        error = f"line {number}: expected a JSON object, got {_json_type(value)}"
        return SourceRecord(None, value, error, position)
    return SourceRecord(row=value, raw=value, position=position)


def _read_past_line(
    file: IO[bytes], first: bytes, digest: Any, limit: int
) -> tuple[_Oversize, int]:
    """Read the rest of a line longer than ``limit`` whose first piece is ``first``, in
    pieces of about ``limit`` (hashed into the file's running ``digest`` too): what is
    kept of it, and how many bytes it took with its line break."""
    kept = _Keeper(limit)
    kept.add(first)
    taken = len(first)
    piece = first
    while not piece.endswith(b"\n") and (piece := file.readline(limit + _LINE_SLACK)):
        digest.update(piece)
        kept.add(piece)
        taken += len(piece)
    return kept.result(), taken


def _jsonl_records(path: Path, start: _LinePosition, limit: int) -> Records:
    """The records of a JSON Lines file after ``start``, one per non-blank line, each
    with its position.  A line is read in pieces of about ``limit`` bytes: one longer
    than that is read past, never held whole."""
    try:
        file = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise _cannot_open(path, exc) from exc
    piece = limit + _LINE_SLACK
    with file:
        digest = _hash_bytes(file, start.offset) if start.offset else hashlib.sha256()
        if digest is None:
            raise SourceError(f"{path} is shorter than the position resumed from")
        offset, number = start.offset, start.line
        while line := file.readline(piece):
            number += 1
            digest.update(line)
            whole = len(line) < piece or line.endswith(b"\n")
            offset += len(line)
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not whole:  # longer than the limit, even without a BOM and a CRLF
                kept, taken = _read_past_line(file, line, digest, limit)
                offset += taken - len(line)
                position = _LinePosition(offset, number, digest.copy())
                yield kept.record(f"line {number}", limit, position), taken
                continue
            if not line or line.isspace():
                continue
            position = _LinePosition(offset, number, digest.copy())
            size = len(line)
            decoded = _decoded_line(line, number, position, limit)
            # Each copy of a long line goes as soon as the next is made: the bytes before
            # the text is parsed, the text before the next line is read.
            del line
            if isinstance(decoded, str):
                decoded = _jsonl_record(decoded, number, position)
            yield decoded, size


class JsonlSource(_FileSource):
    """Rows of a JSON Lines file: one JSON object per line; blank lines are skipped.

    A line that is not UTF-8, not JSON (NaN and infinities included), not an object, or
    longer than ``source.max_record_bytes`` is yielded as malformed (see the module's
    documentation).
    """

    name: ClassVar[str] = "jsonl"
    Options: ClassVar[type[BaseModel] | None] = JsonlSourceOptions
    options: JsonlSourceOptions

    def read(
        self, *, start_index: int = 0, resume_from: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[SourceRecord, None]:
        """The file's records; with ``resume_from``, from the byte offset it names on."""
        path = self.setup.resolve(self.options.path)
        limit = self.setup.max_record_bytes
        if resume_from is None:
            return _stream(_jsonl_records(path, _START, limit), _check_start(start_index))
        return _stream(_jsonl_records(path, _LinePosition.from_json(resume_from), limit), 0)

    async def check_position(self, position: Mapping[str, Any]) -> str | None:
        """Whether the file's bytes before ``position`` are still the ones read then."""
        path = self.setup.resolve(self.options.path)
        at = _LinePosition.from_json(position)
        return await anyio.to_thread.run_sync(at.check_prefix, path)


# -- json ---------------------------------------------------------------------------------


def _read_document(path: Path) -> tuple[str, str]:
    """The text of a JSON document (bytes invalid in its encoding kept as lone
    surrogates, for the element holding them to report) and the codec it is in."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _cannot_open(path, exc) from exc
    encoding = json.detect_encoding(data)
    codec = "utf-8" if encoding == "utf-8-sig" else encoding
    return data.decode(encoding, "surrogateescape"), codec


class _Document:
    """Walks the structure around the array a ``json`` source reads, element by element
    (each parsed and dropped), to find where each element begins and ends.

    Raises :class:`SourceError` when that structure is not valid JSON or has no array
    where one is expected.  An element that does not parse is not the document's
    problem as long as its brackets and quotes show where it ends: the elements are
    checked one by one later.
    """

    def __init__(self, text: str, path: Path) -> None:
        self.text = text
        self.path = path
        self.at = 0

    def spans(self, data_key: str | None) -> array[int]:
        """Start and end of each element of the array read, one after the other."""
        spans = self._top_level_array() if data_key is None else self._array_under(data_key)
        self._space()
        if self.at != len(self.text):
            raise self._invalid(json.JSONDecodeError("Extra data", self.text, self.at))
        return spans

    def _top_level_array(self) -> array[int]:
        if self._next_char() == "[":
            return self._elements()
        value = self._value()
        hint = " (set data_key to read an array inside it)"
        raise SourceError(
            f"{self.path}: expected an array at the top level, got {_json_type(value)}{hint}"
        )

    def _array_under(self, key: str) -> array[int]:
        if self._next_char() != "{":
            self._value()
            raise SourceError(f"{self.path}: data_key {key!r} needs an object at the top level")
        self.at += 1
        keys: list[str] = []
        found: array[int] | str | None = None  # the spans, or the type of a non-array
        while self._next_char() != "}" or keys:
            name = self._member_name(bool(keys))
            keys.append(name)
            if name != key:
                self.at = self._value_end()
            elif self._next_char() == "[":
                found = self._elements()
            else:
                found = _json_type(self._value())  # the last of repeated keys counts
            if self._next_char() == "}":
                break
        self.at += 1
        if found is None:
            shown = ", ".join(map(repr, keys[:20])) or "none"
            raise SourceError(
                f"{self.path}: data_key {key!r} is not in the document (keys: {shown})"
            )
        if isinstance(found, str):
            raise SourceError(f"{self.path}: expected an array at key {key!r}, got {found}")
        return found

    def _member_name(self, after_another: bool) -> str:
        """Read ``[,] "name" :`` of an object member; its name."""
        if after_another:
            if self._next_char() != ",":
                raise self._invalid(
                    json.JSONDecodeError("Expecting ',' delimiter", self.text, self.at)
                )
            self.at += 1
        self._space()
        if not self.text.startswith('"', self.at):
            raise self._invalid(
                json.JSONDecodeError(
                    "Expecting property name enclosed in double quotes", self.text, self.at
                )
            )
        name = self._value()
        if self._next_char() != ":":
            raise self._invalid(json.JSONDecodeError("Expecting ':' delimiter", self.text, self.at))
        self.at += 1
        self._space()
        return str(name)

    def _elements(self) -> array[int]:
        """The spans of the elements of the array opening at ``at``; ends past it."""
        spans = array("q")
        self.at += 1
        if self._next_char() == "]":
            self.at += 1
            return spans
        text, parse = self.text, _DECODER.raw_decode
        while True:
            start = self.at
            try:
                end = parse(text, start)[1]
            except (ValueError, RecursionError) as exc:
                end = self._scanned_element_end(exc)
            spans.append(start)
            spans.append(end)
            after = _AFTER_ELEMENT.match(text, end)
            assert after is not None  # it matches the empty string
            self.at = after.end()
            if after.group(1) == "]":
                return spans
            if after.group(1) != ",":
                raise self._invalid(
                    json.JSONDecodeError("Expecting ',' delimiter", text, after.start(1))
                )

    def _scanned_element_end(self, problem: Exception) -> int:
        """The end of the element at ``at``, which does not parse, by where its brackets
        and quotes close; raises when they show none."""
        end = _scanned_end(self.text, self.at)
        if end is None or end == self.at:
            raise self._invalid(problem) from None
        return end

    def _value_end(self) -> int:
        try:
            return _DECODER.raw_decode(self.text, self.at)[1]
        except (ValueError, RecursionError) as exc:
            raise self._invalid(exc) from None

    def _value(self) -> Any:
        """The value at ``at`` (parsed whole: for a short one, or to report a problem)."""
        try:
            value, self.at = _DECODER.raw_decode(self.text, self.at)
        except (ValueError, RecursionError) as exc:
            raise self._invalid(exc) from None
        return value

    def _next_char(self) -> str:
        self._space()
        return self.text[self.at : self.at + 1]

    def _space(self) -> None:
        match = _JSON_SPACE.match(self.text, self.at)
        assert match is not None  # it matches the empty string
        self.at = match.end()

    def _invalid(self, problem: Exception) -> SourceError:
        reason = str(problem) if not isinstance(problem, RecursionError) else "nested too deeply"
        return SourceError(f"{self.path} is not valid JSON: {reason}")


def _scanned_end(text: str, start: int) -> int | None:
    """Where the JSON value at ``start`` ends by its brackets and quotes alone (before
    the ``,`` or ``]`` that follows it, trailing spaces left out), or ``None`` when it
    runs to the end of ``text``."""
    depth = 0
    for match in _STRUCTURE.finditer(text, start):
        char = text[match.start()]
        if char == '"':
            if match.end() - match.start() == 1:
                return None
        elif char in "[{":
            depth += 1
        elif char in "]}" and depth:
            depth -= 1
        elif char in "],}" and not depth:
            end = match.start()
            while end > start and text[end - 1] in _JSON_SPACES:
                end -= 1
            return end
    return None


def _json_element(text: str, index: int, codec: str, limit: int) -> SourceRecord:
    """The record of one array element's text: an object, else a malformed record."""
    where = f"element [{index}]"
    data = _encoded_if_over(text, codec, limit)
    if data is not None:
        return _oversize(data, limit).record(where, limit)
    if not text.isascii() and (found := _UNDECODABLE.search(text)):
        raw = text.encode(codec, "surrogateescape").decode(codec, "backslashreplace")
        byte = ord(found.group()) - 0xDC00
        return _bad(raw, f"{where}: invalid {codec} (undecodable byte 0x{byte:02x})")
    value, problem = _parse_json(text)
    if problem is not None:
        return _bad(text, f"{where}: {problem}")
    if type(value) is not dict:
        return _bad(value, f"{where}: expected a JSON object, got {_json_type(value)}")
    return SourceRecord(row=value, raw=value)


def _encoded_if_over(text: str, codec: str, limit: int) -> bytes | None:
    """``text`` in ``codec`` when that is more than ``limit`` bytes, else ``None``
    (encoding only text that could be: a character takes at most four bytes)."""
    if len(text) * 4 <= limit or (codec == "utf-8" and text.isascii() and len(text) <= limit):
        return None
    data = text.encode(codec, "surrogateescape")
    return data if len(data) > limit else None


def _json_records(path: Path, data_key: str | None, limit: int) -> Records:
    """The records of a JSON array, one per element, each parsed when it is yielded."""
    text, codec = _read_document(path)
    spans = _Document(text, path).spans(data_key)
    undecodable = not text.isascii() and _UNDECODABLE.search(text) is not None
    for index in range(len(spans) // 2):
        start, end = spans[2 * index], spans[2 * index + 1]
        record = None
        if (end - start) * 4 <= limit and not (
            undecodable and _UNDECODABLE.search(text, start, end)
        ):
            record = _object_in_place(text, start, end)
        if record is None:
            record = _json_element(text[start:end], index, codec, limit)
        yield record, end - start


def _object_in_place(text: str, start: int, end: int) -> SourceRecord | None:
    """The record of the element ``text[start:end]`` when it is an object that passes
    every check of :func:`_parse_json`, parsed where it lies; ``None`` for anything
    else, which :func:`_json_element` then looks at (and words the problem of)."""
    if text.count("[", start, end) + text.count("{", start, end) > MAX_RECORD_DEPTH:
        return None
    try:
        value, stop = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    if stop != end or type(value) is not dict:
        return None
    escapes = text.find("\\u", start, end) != -1
    if escapes and _SURROGATE_ESCAPE.search(text, start, end) and _lone_surrogate(value):
        return None
    return SourceRecord(row=value, raw=value)


class JsonSource(_FileSource):
    """Rows of a JSON array of objects: the whole file, or the array under ``data_key``.

    An element that is not an object, does not parse or is longer than
    ``source.max_record_bytes`` is yielded as malformed (see the module's
    documentation); a document whose structure around the elements does not parse, or
    has no array where one is expected, raises :class:`SourceError` before any record
    is yielded.
    """

    name: ClassVar[str] = "json"
    Options: ClassVar[type[BaseModel] | None] = JsonSourceOptions
    options: JsonSourceOptions

    def read(
        self, *, start_index: int = 0, resume_from: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[SourceRecord, None]:
        _no_position(self, resume_from)
        path = self.setup.resolve(self.options.path)
        records = _json_records(path, self.options.data_key, self.setup.max_record_bytes)
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
