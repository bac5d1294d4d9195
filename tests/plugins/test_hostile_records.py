"""Bad records are row errors, always (issue 19): nesting, surrogates, huge numbers and
over-long records are quarantined one by one; long ints pass through exactly.

The source-level tests read records directly; the pipeline tests run on a SQLite
Landscape (and the database sink on PostgreSQL too) and verify the audit trail; the
fuzz test at the end feeds seeded random records through every file source.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import random
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from engine import RunResult
from landscape import Landscape
from landscape import _schema as t
from plugins._sinks import DatabaseSink
from plugins._sources import CsvSource, JsonlSource, JsonSource, SourceError
from plugins.protocols import PluginSetup, SinkItem, Source, SourceRecord
from tests._postgres import PostgresServer
from tests._read import table_rows

Run = Callable[..., Any]

# -- helpers ------------------------------------------------------------------------------


def setup_in(tmp_path: Path, **limits: int) -> PluginSetup:
    """A plugin setup in ``tmp_path``; ``max_record_bytes=`` when a test sets a limit."""
    return PluginSetup(node_name="source", base_dir=tmp_path, **limits)


async def read_all(source: Source, **read: Any) -> list[SourceRecord]:
    """Every record, each checked against the SourceRecord promises."""
    async with source, aclosing(source.read(**read)) as records:
        found = [record async for record in records]
    for record in found:
        assert (record.row is None) == (record.error is not None), record
        json.dumps(record.raw)  # raw content is always JSON-serialisable
    return found


def rows(records: list[SourceRecord]) -> list[dict[str, Any] | None]:
    return [record.row for record in records]


def errors(records: list[SourceRecord]) -> list[str | None]:
    return [record.error for record in records]


def nested(depth: int, key: str | None = None) -> str:
    """JSON text of ``depth`` nested arrays (objects under ``key``) around a 1."""
    if key is None:
        return "[" * depth + "1" + "]" * depth
    return f'{{"{key}":' * depth + "1" + "}" * depth


def jsonl(setup: PluginSetup, *lines: bytes | str, name: str = "in.jsonl") -> JsonlSource:
    content = b"\n".join(line.encode() if isinstance(line, str) else line for line in lines)
    (setup.base_dir / name).write_bytes(content + b"\n")
    return JsonlSource.from_options({"path": name}, setup)


def json_doc(setup: PluginSetup, *elements: bytes | str, name: str = "in.json") -> JsonSource:
    parts = [e.encode() if isinstance(e, str) else e for e in elements]
    (setup.base_dir / name).write_bytes(b"[" + b",\n ".join(parts) + b"]")
    return JsonSource.from_options({"path": name}, setup)


def written(path: Path) -> list[Any]:
    """The rows of a JSONL file, split at its line feeds only (a row may hold U+2028,
    which ``str.splitlines`` would split at)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


class Rows:
    """Rows for a memory source, as an iterable of its own: data the engine only reads
    through the source (a list would also be walked as configuration)."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


def peak_bytes_while(read: Callable[[], Any]) -> int:
    """The peak of Python allocations (all threads) while ``read()`` runs."""
    tracemalloc.start()
    try:
        read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def read_records_sync(source: Source) -> list[SourceRecord]:
    """:func:`read_all` from a synchronous test (for measuring it)."""
    return anyio.run(read_all, source)


# -- nesting --------------------------------------------------------------------------------


async def test_jsonl_lines_nested_too_deep_are_malformed_and_reading_goes_on(
    tmp_path: Path,
) -> None:
    setup = setup_in(tmp_path)
    deep_lines = [
        '{"d": ' + nested(128) + "}",  # 129 levels with the object
        nested(600, key="k"),
        '{"d": ' + nested(100_000) + "}",
    ]
    source = jsonl(setup, '{"i": 0}', *deep_lines, '{"d": ' + nested(127) + "}", '{"i": 5}')
    records = await read_all(source)
    assert rows(records)[0] == {"i": 0}
    assert rows(records)[1:4] == [None, None, None]
    assert errors(records)[1:4] == [f"line {n}: nested deeper than 128 levels" for n in (2, 3, 4)]
    assert [record.raw for record in records[1:4]] == deep_lines  # the line as read
    assert rows(records)[4] == json.loads('{"d": ' + nested(127) + "}")  # 128 levels: fine
    assert rows(records)[5] == {"i": 5}


async def test_json_elements_nested_too_deep_are_malformed_and_reading_goes_on(
    tmp_path: Path,
) -> None:
    setup = setup_in(tmp_path)
    deep = '{"d": ' + nested(100_000) + "}"
    source = json_doc(setup, '{"i": 0}', deep, nested(300, key="k"), '{"i": 3}')
    records = await read_all(source)
    assert rows(records) == [{"i": 0}, None, None, {"i": 3}]
    assert errors(records)[1:3] == [
        "element [1]: nested deeper than 128 levels",
        "element [2]: nested deeper than 128 levels",
    ]
    assert records[1].raw == deep


# -- surrogates, numbers ------------------------------------------------------------------------


_SURROGATE_LINES = [
    r'{"\udfff": 1}',
    r'{"a": "x\ud800"}',
    r'{"a": [{"b": "\udc00\ud83d"}]}',
]
_FINE_ESCAPES = [
    (r'{"e": "\ud83d\ude00"}', {"e": "\U0001f600"}),  # a pair: one astral character
    (r'{"a": "\\ud800"}', {"a": "\\ud800"}),  # an escaped backslash, then text
    (r'{"\u00e9": "\u0000"}', {"é": "\x00"}),
]


async def test_lone_surrogates_are_malformed_records(tmp_path: Path) -> None:
    setup = setup_in(tmp_path)
    lines = [*_SURROGATE_LINES, *(text for text, _ in _FINE_ESCAPES)]
    for source in (jsonl(setup, *lines), json_doc(setup, *lines)):
        records = await read_all(source)
        assert rows(records) == [None, None, None, *(row for _, row in _FINE_ESCAPES)]
        bad = errors(records)[:3]
        assert all(e is not None and "lone surrogate" in e for e in bad), bad
        assert "U+DFFF" in str(bad[0])
        assert [record.raw for record in records[:3]] == _SURROGATE_LINES


async def test_long_ints_are_read_exactly_and_out_of_range_floats_are_malformed(
    tmp_path: Path,
) -> None:
    setup = setup_in(tmp_path)
    longs = {"a": 9007199254740993, "b": 2**64 + 1, "c": -(10**300) - 7, "d": 2**53}
    lines = [
        json.dumps(longs),
        '{"f": 1e308, "g": -0.0, "h": 5e-324, "i": 1.7976931348623157e308}',
        '{"f": 1e400}',
        '{"f": [-2e308]}',
        '{"f": ' + "9" * 400 + ".5}",
        '{"n": ' + "1" * 5000 + "}",
    ]
    for source in (jsonl(setup, *lines), json_doc(setup, *lines)):
        records = await read_all(source)
        assert rows(records)[0] == longs
        assert all(type(value) is int for value in (rows(records)[0] or {}).values())
        assert rows(records)[1] == {"f": 1e308, "g": -0.0, "h": 5e-324, "i": 1.7976931348623157e308}
        assert rows(records)[2:] == [None] * 4
        assert all("beyond the range of a double" in str(e) for e in errors(records)[2:5])
        assert "invalid JSON" in str(errors(records)[5])  # more digits than Python reads


async def test_a_bad_json_element_spoils_only_itself(tmp_path: Path) -> None:
    setup = setup_in(tmp_path)
    elements: list[bytes | str] = [
        '{"i": 0}',
        '{"a": NaN}',
        b'{"a": "bad \xff byte"}',
        '{"a": tru, "b": [1, {"c": "]}"}]}',
        '{"i": 4}',
    ]
    records = await read_all(json_doc(setup, *elements))
    assert rows(records) == [{"i": 0}, None, None, None, {"i": 4}]
    assert errors(records)[1:4] == [
        "element [1]: invalid JSON: NaN is not a valid JSON value",
        "element [2]: invalid utf-8 (undecodable byte 0xff)",
        "element [3]: invalid JSON: Expecting value: line 1 column 7 (char 6)",
    ]
    assert [record.raw for record in records[1:4]] == [
        '{"a": NaN}',
        '{"a": "bad \\xff byte"}',
        '{"a": tru, "b": [1, {"c": "]}"}]}',
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'[{"a": [1}', "is not valid JSON"),  # brackets that never close
        (b'[{"a": "never closed}]', "is not valid JSON"),
        (b'[{"a": 1},,{"b": 2}]', "is not valid JSON: Expecting value"),
    ],
)
async def test_a_json_document_whose_structure_breaks_is_still_refused_whole(
    tmp_path: Path, content: bytes, message: str
) -> None:
    setup = setup_in(tmp_path)
    (tmp_path / "in.json").write_bytes(content)
    with pytest.raises(SourceError, match=message):
        await read_all(JsonSource.from_options({"path": "in.json"}, setup))


# -- records over the limit ----------------------------------------------------------------


def kept(raw: Any) -> tuple[str, int, str]:
    assert isinstance(raw, dict), raw
    return raw["head"], raw["record_bytes"], raw["record_sha256"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_jsonl_line_over_the_limit_is_kept_cut_with_its_size_and_hash(
    tmp_path: Path,
) -> None:
    setup = setup_in(tmp_path, max_record_bytes=100)
    long_valid = json.dumps({"text": "é" * 500}).encode()
    long_invalid = b'{"text": "' + b"x" * 300
    just_over = b'{"t": "' + b"y" * 92 + b'"}'  # 101 bytes
    at_limit = b'{"t": "' + b"z" * 91 + b'"}'  # 100 bytes, then CRLF
    path = tmp_path / "in.jsonl"
    lines = [b'{"i": 0}', long_valid, long_invalid, just_over, at_limit + b"\r", b'{"i": 5}']
    path.write_bytes(codecs.BOM_UTF8 + b"\n".join(lines) + b"\n")
    source = JsonlSource.from_options({"path": "in.jsonl"}, setup)
    records = await read_all(source)
    assert rows(records) == [{"i": 0}, None, None, None, {"t": "z" * 91}, {"i": 5}]
    for record, line, number in zip(records[1:4], lines[1:4], (2, 3, 4), strict=True):
        head, size, digest = kept(record.raw)
        assert (size, digest) == (len(line), sha256(line))
        assert head == line[:100].decode("utf-8", "backslashreplace")
        assert record.error == (
            f"line {number}: record is {len(line)} bytes, over source.max_record_bytes (100): "
            f"not parsed, stored cut to its first 100 bytes (SHA-256 of the whole record: "
            f"{digest})"
        )
    # Positions count every byte read past (the BOM too): a resume reads on from them.
    assert records[1].position is not None
    assert records[1].position.to_json()["offset"] == 3 + len(b'{"i": 0}\n') + len(long_valid) + 1
    resumed = JsonlSource.from_options({"path": "in.jsonl"}, setup)
    position = records[2].position
    assert position is not None
    rest = await read_all(resumed, start_index=3, resume_from=position.to_json())
    assert rows(rest) == rows(records)[3:]
    assert await resumed.check_position(position.to_json()) is None


def test_jsonl_reads_an_over_long_line_in_bounded_memory(tmp_path: Path) -> None:
    limit, size = 1 << 20, 24 << 20
    with open(tmp_path / "in.jsonl", "wb") as file:
        file.write(b'{"i": 0}\n{"text": "')
        for _ in range(size // (1 << 20)):
            file.write(b"x" * (1 << 20))
        file.write(b'"}\n{"i": 2}\n')
    source = JsonlSource.from_options(
        {"path": "in.jsonl"}, setup_in(tmp_path, max_record_bytes=limit)
    )
    found: list[SourceRecord] = []
    peak = peak_bytes_while(lambda: found.extend(read_records_sync(source)))
    assert rows(found) == [{"i": 0}, None, {"i": 2}]
    assert kept(found[1].raw)[1] == size + len(b'{"text": ""}')
    assert peak < 6 * limit, f"peak {peak} bytes reading a {size}-byte line"


async def test_csv_record_over_the_limit_is_kept_cut_and_read_past(tmp_path: Path) -> None:
    setup = setup_in(tmp_path, max_record_bytes=100)
    long_line = b"1," + b"x" * 300
    quoted = b'2,"a ""quoted"" field\n' + b"y" * 150 + b"\n" + b"z" * 50 + b'\n"'
    content = b"id,v\n0,ok\n" + long_line + b"\n" + quoted + b"\r\n3,fine\n"
    (tmp_path / "in.csv").write_bytes(content)
    records = await read_all(CsvSource.from_options({"path": "in.csv"}, setup))
    assert rows(records) == [{"id": "0", "v": "ok"}, None, None, {"id": "3", "v": "fine"}]
    assert (kept(records[1].raw)[1:], kept(records[2].raw)[1:]) == (
        (len(long_line), sha256(long_line)),
        (len(quoted), sha256(quoted)),
    )
    assert kept(records[2].raw)[0] == quoted[:100].decode()
    assert str(errors(records)[1]).startswith(
        "line 3: record is 302 bytes, over source.max_record_bytes (100)"
    )
    assert str(errors(records)[2]).startswith("lines 4-7: record is ")


def test_csv_reads_an_over_long_line_in_bounded_memory(tmp_path: Path) -> None:
    limit, size = 1 << 20, 24 << 20
    with open(tmp_path / "in.csv", "wb") as file:
        file.write(b"id,v\n1,a\n2,")
        for _ in range(size // (1 << 20)):
            file.write(b"x" * (1 << 20))
        file.write(b"\n3,c\n")
    source = CsvSource.from_options({"path": "in.csv"}, setup_in(tmp_path, max_record_bytes=limit))
    found: list[SourceRecord] = []
    peak = peak_bytes_while(lambda: found.extend(read_records_sync(source)))
    assert rows(found) == [{"id": "1", "v": "a"}, None, {"id": "3", "v": "c"}]
    assert peak < 8 * limit, f"peak {peak} bytes reading a {size}-byte line"


async def test_json_element_over_the_limit_is_kept_cut(tmp_path: Path) -> None:
    setup = setup_in(tmp_path, max_record_bytes=64)
    big = json.dumps({"text": "w" * 200})
    records = await read_all(json_doc(setup, '{"i": 0}', big, '{"i": 2}'))
    assert rows(records) == [{"i": 0}, None, {"i": 2}]
    assert kept(records[1].raw) == (big[:64], len(big), sha256(big.encode()))
    assert str(errors(records)[1]).startswith("element [1]: record is 212 bytes, over ")


# -- through a pipeline ---------------------------------------------------------------------


def file_pipeline(plugin: str, path: Path, out: Path, **source: Any) -> dict[str, Any]:
    """``plugin`` reading ``path``; valid rows to ``out/out.jsonl``, malformed ones to
    ``out/q.jsonl``."""
    return {
        "source": {
            "plugin": plugin,
            "options": {"path": str(path)},
            "on_success": "out",
            "on_validation_failure": "quarantine",
            **source,
        },
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": str(out / "out.jsonl")}},
            {"name": "quarantine", "plugin": "jsonl", "options": {"path": str(out / "q.jsonl")}},
        ],
    }


async def deep_verified(url: str, result: RunResult) -> None:
    async with Landscape.connect(url) as landscape:
        report = await landscape.verify(result.run_id, deep=True)
    assert report.ok, [str(v) for v in report.violations]


async def validation_errors(url: str, run_id: str) -> dict[int, str]:
    found = await table_rows(url, t.validation_errors, t.validation_errors.c.run_id == run_id)
    return {int(row["row_index"]): str(row["error"]) for row in found}


async def stored_raw(url: str, run_id: str, row_index: int) -> str:
    """The stored content of a source row's raw payload, as text."""
    (row,) = await table_rows(
        url, t.rows, t.rows.c.run_id == run_id, t.rows.c.row_index == row_index
    )
    (payload,) = await table_rows(url, t.payloads, t.payloads.c.hash == row["source_data_hash"])
    return str(payload["content"])


async def test_hostile_jsonl_lines_are_quarantined_and_the_run_goes_on(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    data = tmp_path / "in.jsonl"
    big = {"i": 4, "exact": 9007199254740993, "wide": 2**64 + 1, "neg": -(2**70)}
    data.write_text(
        "\n".join(
            [
                '{"i": 0}',
                '{"d": ' + nested(600) + "}",
                '{"d": ' + nested(100_000) + "}",
                r'{"\udfff": 1}',
                json.dumps(big),
                '{"text": "' + "x" * 300_000 + '"}',
                '{"i": 6}',
            ]
        )
        + "\n"
    )
    result = await run_verified(file_pipeline("jsonl", data, tmp_path, max_record_bytes=1 << 18))
    assert result.status == "completed"
    assert result.outcomes == {"completed": 3, "quarantined": 4}
    assert written(tmp_path / "out.jsonl") == [{"i": 0}, big, {"i": 6}]
    assert "9007199254740993" in (tmp_path / "out.jsonl").read_text()
    assert json.loads(await stored_raw(sqlite_url, result.run_id, 4)) == big
    found = await validation_errors(sqlite_url, result.run_id)
    assert sorted(found) == [1, 2, 3, 5]
    assert "nested deeper than 128 levels" in found[1]
    assert "nested deeper than 128 levels" in found[2]
    assert "lone surrogate" in found[3]
    assert "record is 300012 bytes, over source.max_record_bytes (262144)" in found[5]
    quarantined = written(tmp_path / "q.jsonl")
    assert [q["_row_index"] for q in quarantined] == [1, 2, 3, 5]
    assert quarantined[3]["_raw"]["record_bytes"] == 300_012
    assert len(quarantined[3]["_raw"]["head"]) == 1 << 18
    await deep_verified(sqlite_url, result)


async def test_hostile_json_elements_are_quarantined_and_the_run_goes_on(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    data = tmp_path / "in.json"
    big = {"i": 4, "wide": 2**64 + 1}
    elements = [
        '{"i": 0}',
        nested(100_000),
        r'{"\udfff": 1}',
        '{"a": NaN}',
        json.dumps(big),
        b'{"b": "\xfe"}',
    ]
    data.write_bytes(
        b"[" + b",".join(e if isinstance(e, bytes) else e.encode() for e in elements) + b"]"
    )
    result = await run_verified(file_pipeline("json", data, tmp_path))
    assert result.outcomes == {"completed": 2, "quarantined": 4}
    assert written(tmp_path / "out.jsonl") == [{"i": 0}, big]
    assert sorted(await validation_errors(sqlite_url, result.run_id)) == [1, 2, 3, 5]
    await deep_verified(sqlite_url, result)


async def test_python_rows_nested_too_deep_are_quarantined_with_their_text(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    config = {
        "source": {
            "plugin": "memory",
            "options": {"rows": Rows([{"i": 0}, {"deep": deep}, {"i": 2}])},
            "on_success": "out",
            "on_validation_failure": "quarantine",
        },
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": str(tmp_path / "o.jsonl")}},
            {
                "name": "quarantine",
                "plugin": "jsonl",
                "options": {"path": str(tmp_path / "q.jsonl")},
            },
        ],
    }
    result = await run_verified(config)
    assert result.outcomes == {"completed": 2, "quarantined": 1}
    (error,) = (await validation_errors(sqlite_url, result.run_id)).values()
    assert "record has no JSON form: value is nested deeper than 256 levels" in error
    (quarantined,) = written(tmp_path / "q.jsonl")
    assert quarantined["_raw"].startswith("{'deep': [[[[")


async def test_a_quarantined_record_as_deep_as_a_payload_may_be_goes_as_text(
    run_verified: Run, tmp_path: Path
) -> None:
    """The quarantine row wraps the raw record in one more level; one already at the
    hashing limit goes to the quarantine sink as its text instead."""
    deep: Any = {"leaf": 1}
    for _ in range(254):
        deep = [deep]
    row = {"deep": deep}  # 256 levels: storable, with no level to spare
    config = {
        "source": {
            "plugin": "memory",
            "options": {"rows": Rows([row, {"id": 1}])},
            "on_success": "out",
            "on_validation_failure": "quarantine",
            # The deep row lacks its id: quarantined, its raw record wrapped for the sink.
            "schema": {"mode": "dynamic", "fields": {"id": "int"}},
        },
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": str(tmp_path / "o.jsonl")}},
            {
                "name": "quarantine",
                "plugin": "jsonl",
                "options": {"path": str(tmp_path / "q.jsonl")},
            },
        ],
    }
    result = await run_verified(config)
    assert result.outcomes == {"completed": 1, "quarantined": 1}
    (quarantined,) = written(tmp_path / "q.jsonl")
    assert isinstance(quarantined["_raw"], str)
    assert quarantined["_raw"].startswith("{'deep': [[[[")


async def test_decimals_are_stored_with_all_their_digits(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    exact = Decimal("0.1000000000000000055511151231257827021181583404541015625")
    config = {
        "source": {
            "plugin": "memory",
            "options": {"rows": [{"d": exact, "e": Decimal("12.50")}]},
            "on_success": "out",
            # The row lacks its id: quarantined in the Landscape, its raw record stored.
            "schema": {"mode": "dynamic", "fields": {"id": "int"}},
        },
        "sinks": [
            {"name": "out", "plugin": "jsonl", "options": {"path": str(tmp_path / "o.jsonl")}}
        ],
    }
    result = await run_verified(config)
    assert result.outcomes == {"quarantined": 1}
    stored = await stored_raw(sqlite_url, result.run_id, 0)
    assert stored == f'{{"d":{exact},"e":12.5}}'
    assert json.loads(stored, parse_float=Decimal) == {"d": exact, "e": Decimal("12.5")}
    await deep_verified(sqlite_url, result)


# -- the database sink ---------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'sink.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"hostile_{uuid.uuid4().hex}"
    await server.create_database(name)
    yield server.url(name)
    await server.drop_database(name)


async def test_database_sink_keeps_long_ints_exact(tmp_path: Path, database_url: str) -> None:
    sink = DatabaseSink.from_options({"url": database_url, "table": "t"}, setup_in(tmp_path))
    batch = [
        SinkItem("a", 0, {"wide": 2**64 + 1, "n": 2**63 - 1, "x": 0.5}),
        SinkItem("b", 1, {"wide": 7, "n": -(2**63), "x": 2**53}),
        SinkItem("c", 2, {"wide": -(10**40), "n": 1, "x": 2**53 + 1}),
        SinkItem("d", 3, {"wide": 1, "n": 2**63, "x": 1.0}),
    ]
    async with sink:
        rejections = await sink.write(batch)
    assert [(r.token_id, r.error) for r in rejections] == [
        ("c", f"field 'x': {2**53 + 1} has no exact value in a float column"),
        ("d", f"field 'n': {2**63} does not fit a 64-bit integer column"),
    ]
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(
                sa.text("SELECT wide, n, x FROM t ORDER BY row_index")
            )
            found = [tuple(row) for row in result]
    finally:
        await engine.dispose()
    assert found == [
        (str(2**64 + 1), 2**63 - 1, 0.5),
        ("7", -(2**63), float(2**53)),
    ]


# -- fuzz -----------------------------------------------------------------------------------

_FUZZ_SECONDS = 20.0
_FUZZ_LIMIT = 64 * 1024
_ODD_KEYS = ["", " ", "é", "\U0001f600", "\x00", 'q"uote', "back\\slash", "k" * 300, "ﬀ"]
_ODD_TEXT = ["", "\x00", "\u2028", "\r\n", "é\U0001f600", "\\", '"', "\x7f", "\ufeff"]
_ODD_NUMBERS = [0, -0.0, 1e308, -1e308, 5e-324, 2**53 + 1, -(2**64) - 1, 10**40, 0.1, 1e-7]
# Text the JSON writer cannot produce: (text, whether it is still valid JSON).
_ODD_JSON = [
    ("NaN", False),
    ("-Infinity", False),
    ("1e400", False),
    ('"\\udfff"', False),
    ('"\\ud83d\\ude00"', True),
    ("1" * 300, True),
    ("-0", True),
    ("1E+2", True),
]


def _scalar(rng: random.Random) -> Any:
    return rng.choice(
        [
            lambda: rng.choice(_ODD_NUMBERS),
            lambda: rng.choice(_ODD_TEXT) * rng.randint(1, 3),
            lambda: rng.randint(-(2**70), 2**70),
            lambda: rng.random() * 10 ** rng.randint(-30, 30),
            lambda: rng.choice([True, False, None]),
            lambda: "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 12))),
        ]
    )()


def _value(rng: random.Random, depth: int) -> Any:
    if depth <= 0 or rng.random() < 0.4:
        return _scalar(rng)
    if rng.random() < 0.5:
        return [_value(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(_ODD_KEYS) + str(n): _value(rng, depth - 1) for n in range(rng.randint(0, 4))
    }


def _json_record(rng: random.Random, index: int) -> bytes:
    """One JSON record's text, often odd: never a line break in it, and its brackets
    and quotes always close (so a bad element spoils only itself)."""
    kind = rng.randrange(12)
    body = json.dumps({"i": index, "v": _value(rng, 4)}, ensure_ascii=rng.random() < 0.5)
    if kind == 0:
        depth = rng.choice([127, 128, 129, 200, 3000])
        return f'{{"i": {index}, "d": {"[" * depth}{"]" * depth}}}'.encode()
    if kind == 1:
        odd, _valid = rng.choice(_ODD_JSON)
        return f'{{"i": {index}, "odd": {odd}}}'.encode()
    if kind == 2:
        text = "x" * rng.choice([10, _FUZZ_LIMIT, 3 * _FUZZ_LIMIT])
        return f'{{"i": {index}, "s": "{text}"}}'.encode()
    if kind == 3:  # a byte that is not UTF-8, inside a string
        return (
            body.encode()[:-1]
            + b', "b": "'
            + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"])
            + b'"}'
        )
    if kind == 4:
        return rng.choice([b"[1, 2]", b"42", b'"text"', b"null", b"true"])
    if kind == 5:
        return rng.choice([b'{"a": tru}', b'{"a" 1}', b'{"a": 1,}', b'{"a": [1,]}', b"{,}"])
    if kind == 6:  # keys only escapes spell
        return f'{{"i": {index}, "\\u0000": 1, "\\u00e9": 2, "\\ud800": 3}}'.encode()
    return body.encode()


def _jsonl_file(rng: random.Random, count: int) -> bytes:
    ending = rng.choice([b"\n", b"\r\n"])
    lines = [_json_record(rng, index) for index in range(count)]
    blank = rng.choice([b"", b"  ", b"\t"])
    text = ending.join(line + (ending + blank if rng.random() < 0.1 else b"") for line in lines)
    return (codecs.BOM_UTF8 if rng.random() < 0.3 else b"") + text + ending


def _json_file(rng: random.Random, count: int) -> bytes:
    space = rng.choice([b"", b" ", b"\r\n  ", b"\n"])
    elements = (b"," + space).join(_json_record(rng, index) for index in range(count))
    return (codecs.BOM_UTF8 if rng.random() < 0.3 else b"") + b"[" + space + elements + space + b"]"


def _csv_file(rng: random.Random, count: int) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=rng.choice(["\n", "\r\n"]))
    writer.writerow(["i", "a", "b"])
    records = []
    for index in range(count):
        kind = rng.randrange(8)
        cells = [str(index), str(_scalar(rng)), rng.choice(_ODD_TEXT)]
        if kind == 0:
            cells[1] = "x" * rng.choice([10, _FUZZ_LIMIT, 2 * _FUZZ_LIMIT])
        elif kind == 1:
            cells[2] = "line\nbreak " * rng.randint(1, 5) + "y" * rng.choice([1, _FUZZ_LIMIT])
        elif kind == 2:
            cells.append("extra")
        elif kind == 3:
            cells = cells[:1]
        record = io.StringIO()
        # (The writer quotes a field holding a line break only if its terminator has one.)
        csv.writer(record, lineterminator="\r\n").writerow(cells)
        text = record.getvalue().removesuffix("\r\n").encode("utf-8", "surrogatepass")
        if kind == 4:
            text = text + rng.choice([b"\xff", b"\xed\xa0\x80"])
        elif kind == 5:
            text = f'{index},"quoted"after,b'.encode()
        records.append(text)
    terminator = writer.dialect.lineterminator.encode()
    head = out.getvalue().encode()
    return (
        (codecs.BOM_UTF8 if rng.random() < 0.3 else b"")
        + head
        + terminator.join(records)
        + terminator
    )


_WORST_JSON = [
    b'{"i": 0, "d": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    b'{"i": 1, "\\udfff": 1}',
    b'{"i": 2, "big": ' + str(2**64 + 1).encode() + b"}",
    b'{"i": 3, "s": "' + b"z" * (4 * _FUZZ_LIMIT) + b'"}',
    b'{"i": 4, "f": [1e308, -0.0, 1e400]}',
]


# Deep brackets before a string that never closes, full of escaped quotes: a scan
# that retried at each quote would take quadratic time (a line only: in a document it
# would break the structure).
_WORST_LINE = b'{"i": 5, "s": ' + b"[" * 200 + b'"' + b'\\"' * 20_000 + b"}"


def _worst_file(kind: str) -> bytes:
    if kind == "jsonl":
        return b"\n".join([*_WORST_JSON, _WORST_LINE]) + b"\n"
    if kind == "json":
        return b"[" + b",".join(_WORST_JSON) + b"]"
    long_quoted = b'1,"' + b"q\n" * _FUZZ_LIMIT + b'",b'
    return b"i,a,b\n0,\x00,\r\n" + long_quoted + b"\n2,\xff,c\n3,ok,ok\n"


async def _check_run(
    run_verified: Run, tmp_path: Path, sqlite_url: str, kind: str, content: bytes, count: int
) -> None:
    """Run ``content`` through a ``kind`` source and check every record is accounted for."""
    for name in ("out.jsonl", "q.jsonl"):
        (tmp_path / name).unlink(missing_ok=True)
    data = tmp_path / f"in.{kind}"
    data.write_bytes(content)
    config = file_pipeline(kind, data, tmp_path, max_record_bytes=_FUZZ_LIMIT)
    result = await run_verified(config)
    assert result.status == "completed"
    assert set(result.outcomes) <= {"completed", "quarantined"}, result.outcomes
    assert sum(result.outcomes.values()) == count
    errors = await validation_errors(sqlite_url, result.run_id)
    assert len(errors) == result.outcomes.get("quarantined", 0)
    landed_rows = written(tmp_path / "out.jsonl")
    assert len(landed_rows) == result.outcomes.get("completed", 0)
    # Each record is exactly once either written (carrying its index) or quarantined.
    landed = [int(row["i"]) for row in landed_rows]
    assert sorted(landed + list(errors)) == list(range(count))
    assert len(written(tmp_path / "q.jsonl")) == len(errors)


async def test_fuzzed_records_are_written_or_quarantined_never_fail_a_run(
    run_verified: Run, tmp_path: Path, sqlite_url: str
) -> None:
    """Seeded random records (and a few worst cases) through jsonl, json and csv sources:
    no run fails, and every record is written or quarantined with a validation error.
    The wall clock only bounds how many rounds run; a failing round names its seed."""
    await _check_run(run_verified, tmp_path, sqlite_url, "jsonl", _worst_file("jsonl"), 6)
    await _check_run(run_verified, tmp_path, sqlite_url, "json", _worst_file("json"), 5)
    await _check_run(run_verified, tmp_path, sqlite_url, "csv", _worst_file("csv"), 4)
    makers = {"jsonl": _jsonl_file, "json": _json_file, "csv": _csv_file}
    deadline = time.monotonic() + _FUZZ_SECONDS
    seed = 19_000
    while time.monotonic() < deadline or seed < 19_003:
        for kind, make in makers.items():
            rng = random.Random(seed)
            count = rng.randint(20, 120)
            try:
                await _check_run(run_verified, tmp_path, sqlite_url, kind, make(rng, count), count)
            except AssertionError as exc:
                raise AssertionError(f"{kind} round with seed {seed}: {exc}") from exc
        seed += 1
