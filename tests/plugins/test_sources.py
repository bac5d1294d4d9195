"""Built-in sources: records in order, malformed ones yielded (never raised), resume."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import aclosing
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psutil
import pytest
from pydantic import ValidationError

from plugins import _sources
from plugins._sources import (
    CHUNK_SIZE,
    CsvSource,
    JsonlSource,
    JsonSource,
    MemorySource,
    SourceError,
)
from plugins.protocols import PluginSetup, Source, SourceRecord


@pytest.fixture
def setup(tmp_path: Path) -> PluginSetup:
    return PluginSetup(node_name="source", base_dir=tmp_path)


async def read_all(source: Source, start_index: int = 0) -> list[SourceRecord]:
    """Every record from ``start_index``, each checked against the SourceRecord promises."""
    async with source, aclosing(generator(source.read(start_index=start_index))) as records:
        found = [record async for record in records]
    for record in found:
        assert (record.row is None) == (record.error is not None), record
        json.dumps(record.raw)  # raw content is always JSON-serialisable
    return found


def generator(records: AsyncIterator[SourceRecord]) -> AsyncGenerator[SourceRecord, None]:
    """The built-in sources return async generators: closing one closes its file."""
    assert isinstance(records, AsyncGenerator)
    return records


def rows(records: list[SourceRecord]) -> list[dict[str, Any] | None]:
    return [record.row for record in records]


def errors(records: list[SourceRecord]) -> list[str | None]:
    return [record.error for record in records]


def csv_source(setup: PluginSetup, **options: Any) -> CsvSource:
    return CsvSource.from_options({"path": "data.csv", **options}, setup)


def write(setup: PluginSetup, name: str, content: bytes) -> Path:
    path = setup.base_dir / name
    path.write_bytes(content)
    return path


# -- csv ----------------------------------------------------------------------------------


async def test_csv_yields_rows_of_strings_in_file_order(setup: PluginSetup) -> None:
    write(setup, "data.csv", b"id,name,amount\n1,ann,2.5\n2,bob,\n")
    records = await read_all(csv_source(setup))
    assert rows(records) == [
        {"id": "1", "name": "ann", "amount": "2.5"},
        {"id": "2", "name": "bob", "amount": ""},
    ]
    assert [record.raw for record in records] == rows(records)


async def test_csv_options_delimiter_encoding_and_skip_rows(setup: PluginSetup) -> None:
    content = "exported by tool\n\n# comment\nname;city\nZoë;Malmö\n".encode("latin-1")
    write(setup, "data.csv", content)
    source = csv_source(setup, delimiter=";", encoding="latin-1", skip_rows=3)
    assert rows(await read_all(source)) == [{"name": "Zoë", "city": "Malmö"}]


async def test_csv_skips_blank_lines_and_a_byte_order_mark(setup: PluginSetup) -> None:
    write(setup, "data.csv", b"\xef\xbb\xbfid,v\r\n\r\n1,a\r\n\r\n2,b\r\n")
    assert rows(await read_all(csv_source(setup))) == [{"id": "1", "v": "a"}, {"id": "2", "v": "b"}]


async def test_csv_reads_quoted_fields_with_delimiters_and_line_breaks(setup: PluginSetup) -> None:
    write(setup, "data.csv", b'id,text\n1,"a, ""quoted""\nsecond line"\n2,x\n')
    assert rows(await read_all(csv_source(setup))) == [
        {"id": "1", "text": 'a, "quoted"\nsecond line'},
        {"id": "2", "text": "x"},
    ]


async def test_csv_wrong_field_count_is_a_malformed_record(setup: PluginSetup) -> None:
    write(setup, "data.csv", b"id,name\n1,a\n2,b,extra\n3\n4,d\n")
    records = await read_all(csv_source(setup))
    assert rows(records) == [{"id": "1", "name": "a"}, None, None, {"id": "4", "name": "d"}]
    assert errors(records)[1:3] == [
        "line 3: expected 2 fields, got 3",
        "line 4: expected 2 fields, got 1",
    ]
    assert [records[1].raw, records[2].raw] == ["2,b,extra", "3"]


async def test_csv_line_numbers_count_skipped_and_multi_line_records(setup: PluginSetup) -> None:
    write(setup, "data.csv", b'preamble\nid,t\n1,"two\nlines"\n\n2,x,y\n3,"a\nb",c\n')
    records = await read_all(csv_source(setup, skip_rows=1))
    assert errors(records) == [
        None,
        "line 6: expected 2 fields, got 3",
        "lines 7-8: expected 2 fields, got 3",
    ]
    assert records[2].raw == '3,"a\nb",c'


async def test_csv_invalid_utf8_spoils_only_its_record(setup: PluginSetup) -> None:
    write(setup, "data.csv", b"id,name\n1,ok\n2,bad\xff\xfebytes\n3,fine\xc3\xa9\n")
    records = await read_all(csv_source(setup))
    assert rows(records) == [{"id": "1", "name": "ok"}, None, {"id": "3", "name": "fineé"}]
    assert records[1].error == "line 3: invalid utf-8 (undecodable byte 0xff)"
    assert records[1].raw == "2,bad\\xff\\xfebytes"


async def test_csv_bad_quoting_is_a_malformed_record(setup: PluginSetup) -> None:
    write(setup, "data.csv", b'id,v\n1,"bad"quote\n2,ok\n3,"never closed\n4,x\n')
    records = await read_all(csv_source(setup))
    assert rows(records) == [None, {"id": "2", "v": "ok"}, None]
    assert errors(records)[0] == "line 2: ',' expected after '\"'"
    assert errors(records)[2] == "lines 4-5: unexpected end of data"
    assert records[2].raw == '3,"never closed\n4,x'


async def test_csv_oversized_field_is_a_malformed_record(setup: PluginSetup) -> None:
    write(setup, "data.csv", b"id,v\n1," + b"x" * 200_000 + b"\n2,ok\n")
    records = await read_all(csv_source(setup))
    assert rows(records) == [None, {"id": "2", "v": "ok"}]
    assert errors(records)[0] == "line 2: field larger than field limit (131072)"


async def test_csv_bad_row_in_the_middle_of_a_long_file(setup: PluginSetup) -> None:
    lines = [b"n,sq\n", *(f"{n},{n * n}\n".encode() for n in range(2 * CHUNK_SIZE + 10))]
    lines[CHUNK_SIZE + 1] = b"bad\xff,row\n"
    write(setup, "data.csv", b"".join(lines))
    records = await read_all(csv_source(setup))
    assert len(records) == 2 * CHUNK_SIZE + 10
    assert [i for i, record in enumerate(records) if record.row is None] == [CHUNK_SIZE]
    assert records[-1].row == {"n": str(2 * CHUNK_SIZE + 9), "sq": str((2 * CHUNK_SIZE + 9) ** 2)}


async def test_csv_resume_skips_records_counting_malformed_ones(setup: PluginSetup) -> None:
    write(setup, "data.csv", b"id\n0\n1,x\n2\n\n3\n")
    everything = await read_all(csv_source(setup))
    assert errors(everything)[1] is not None
    for start in range(len(everything) + 2):
        assert await read_all(csv_source(setup), start_index=start) == everything[start:]


async def test_csv_resume_across_chunks(setup: PluginSetup) -> None:
    body = "".join(f"{n}\n" for n in range(3 * CHUNK_SIZE))
    write(setup, "data.csv", f"n\n{body}".encode())
    records = await read_all(csv_source(setup), start_index=CHUNK_SIZE + 5)
    assert records[0].row == {"n": str(CHUNK_SIZE + 5)}
    assert len(records) == 2 * CHUNK_SIZE - 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"id,id,x\n1,2,3\n", "header, line 1: duplicate column names: 'id'"),
        (b"id,n\xffame\n1,2\n", r"header, line 1: invalid utf-8 \(undecodable byte 0xff\)"),
    ],
)
async def test_csv_unusable_header_raises(setup: PluginSetup, content: bytes, message: str) -> None:
    write(setup, "data.csv", content)
    with pytest.raises(SourceError, match=message):
        await read_all(csv_source(setup))


@pytest.mark.parametrize("content", [b"", b"\n\n"])
async def test_csv_without_a_header_has_no_records(setup: PluginSetup, content: bytes) -> None:
    write(setup, "data.csv", content)
    assert await read_all(csv_source(setup)) == []


async def test_csv_header_only_has_no_records(setup: PluginSetup) -> None:
    write(setup, "data.csv", b"id,name\n")
    assert await read_all(csv_source(setup)) == []


@pytest.mark.parametrize(
    "options",
    [
        {"delimiter": ";;"},
        {"delimiter": "\n"},
        {"encoding": "klingon"},
        {"skip_rows": -1},
        {"x": 1},
    ],
)
def test_csv_invalid_options_are_rejected(setup: PluginSetup, options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        csv_source(setup, **options)


async def test_csv_reads_in_a_worker_thread(
    setup: PluginSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(setup, "data.csv", b"id\n1\n2\n")
    threads: list[threading.Thread] = []
    take = _sources._take

    def spy(records: Iterator[SourceRecord], count: int) -> list[SourceRecord]:
        threads.append(threading.current_thread())
        return take(records, count)

    monkeypatch.setattr(_sources, "_take", spy)
    await read_all(csv_source(setup))
    assert threads
    assert threading.main_thread() not in threads


async def test_csv_closes_its_file_when_reading_stops_early(setup: PluginSetup) -> None:
    path = write(setup, "data.csv", b"id\n" + b"1\n" * (3 * CHUNK_SIZE))
    source = csv_source(setup)
    async with source, aclosing(generator(source.read())) as records:
        async for _record in records:
            assert path_is_open(path)
            break
    assert not path_is_open(path)


def path_is_open(path: Path) -> bool:
    return any(Path(f.path) == path for f in psutil.Process().open_files())


# -- file-level problems ------------------------------------------------------------------


@pytest.mark.parametrize("source_class", [CsvSource, JsonlSource, JsonSource])
async def test_missing_file_raises_source_error_naming_it(
    setup: PluginSetup, source_class: type[Source]
) -> None:
    source = source_class.from_options({"path": "missing/nothing.txt"}, setup)
    with pytest.raises(SourceError, match=r"cannot open .*missing/nothing\.txt: No such file"):
        await read_all(source)


@pytest.mark.parametrize("source_class", [CsvSource, JsonlSource, JsonSource])
async def test_negative_start_index_is_refused(
    setup: PluginSetup, source_class: type[Source]
) -> None:
    source = source_class.from_options({"path": "data"}, setup)
    with pytest.raises(ValueError, match="start_index"):
        source.read(start_index=-1)


async def test_absolute_paths_are_used_as_given(setup: PluginSetup, tmp_path: Path) -> None:
    path = write(setup, "elsewhere.jsonl", b'{"a": 1}\n')
    other = PluginSetup(node_name="source", base_dir=tmp_path / "nowhere")
    source = JsonlSource.from_options({"path": str(path)}, other)
    assert rows(await read_all(source)) == [{"a": 1}]


# -- jsonl --------------------------------------------------------------------------------


def jsonl_source(setup: PluginSetup) -> JsonlSource:
    return JsonlSource.from_options({"path": "data.jsonl"}, setup)


async def test_jsonl_yields_objects_skipping_blank_lines(setup: PluginSetup) -> None:
    write(
        setup,
        "data.jsonl",
        b'\xef\xbb\xbf{"a": 1}\n\n  \n{"b": [1, {"c": null}]}\r\n{"d": "\xc3\xa9"}',
    )
    records = await read_all(jsonl_source(setup))
    assert rows(records) == [{"a": 1}, {"b": [1, {"c": None}]}, {"d": "é"}]


async def test_jsonl_malformed_lines_are_records_with_their_line_numbers(
    setup: PluginSetup,
) -> None:
    content = (
        b'{"ok": 1}\nnot json\n\n[1, 2]\n42\n"text"\nnull\n{"x": NaN}\n{"bad": "\xff"}\n{"ok": 2}\n'
    )
    write(setup, "data.jsonl", content)
    records = await read_all(jsonl_source(setup))
    assert rows(records) == [{"ok": 1}, None, None, None, None, None, None, None, {"ok": 2}]
    assert errors(records)[1:8] == [
        "line 2: invalid JSON: Expecting value: line 1 column 1 (char 0)",
        "line 4: expected a JSON object, got an array",
        "line 5: expected a JSON object, got a number",
        "line 6: expected a JSON object, got a string",
        "line 7: expected a JSON object, got null",
        "line 8: invalid JSON: NaN is not a valid JSON value",
        "line 9: invalid utf-8 (undecodable byte 0xff)",
    ]
    assert [record.raw for record in records[1:8]] == [
        "not json",
        [1, 2],
        42,
        "text",
        None,
        '{"x": NaN}',
        '{"bad": "\\xff"}',
    ]


async def test_jsonl_resume_skips_records_counting_malformed_ones(setup: PluginSetup) -> None:
    write(setup, "data.jsonl", b'{"i": 0}\n[]\n\n{"i": 2}\nbroken\n{"i": 4}\n')
    everything = await read_all(jsonl_source(setup))
    assert len(everything) == 5
    for start in range(len(everything) + 1):
        assert await read_all(jsonl_source(setup), start_index=start) == everything[start:]


async def test_jsonl_reads_on_from_a_recorded_position_without_reading_before_it(
    setup: PluginSetup,
) -> None:
    write(setup, "data.jsonl", b'{"i": 0}\n[]\n\n{"i": 2}\nbroken\n{"i": 4}\n')
    everything = await read_all(jsonl_source(setup))
    for index, record in enumerate(everything):
        assert record.position is not None
        position = record.position.to_json()
        source = jsonl_source(setup)
        assert await source.check_position(position) is None
        async with (
            source,
            aclosing(
                generator(source.read(start_index=index + 1, resume_from=position))
            ) as records,
        ):
            rest = [r async for r in records]
        assert rest == everything[index + 1 :]
        # Line numbers in errors go on counting from the position.
        assert errors(rest) == errors(everything[index + 1 :])


async def test_jsonl_position_check_notices_a_changed_or_shortened_file(
    setup: PluginSetup,
) -> None:
    write(setup, "data.jsonl", b'{"i": 0}\n{"i": 1}\n{"i": 2}\n')
    third = (await read_all(jsonl_source(setup)))[1].position
    assert third is not None
    position = third.to_json()
    write(setup, "data.jsonl", b'{"i": 0}\n{"i": 9}\n{"i": 2}\n')
    problem = await jsonl_source(setup).check_position(position)
    assert problem == "the first 2 lines of data.jsonl are not the ones read"
    write(setup, "data.jsonl", b'{"i": 0}\n')
    problem = await jsonl_source(setup).check_position(position)
    assert problem == f"data.jsonl is now shorter than the {position['offset']} bytes read"
    # Appending to the file is fine: what was read is unchanged.
    write(setup, "data.jsonl", b'{"i": 0}\n{"i": 1}\n{"i": 2}\n{"i": 3}\n')
    assert await jsonl_source(setup).check_position(position) is None


async def test_sources_without_positions_refuse_one(setup: PluginSetup) -> None:
    write(setup, "data.csv", b"a\n1\n")
    source = csv_source(setup)
    assert (
        await source.check_position({"offset": 2}) == "a csv source cannot resume from a position"
    )
    with pytest.raises(SourceError, match="cannot resume from a position"):
        source.read(resume_from={"offset": 2})


# -- json ---------------------------------------------------------------------------------


def json_source(setup: PluginSetup, **options: Any) -> JsonSource:
    return JsonSource.from_options({"path": "data.json", **options}, setup)


async def test_json_yields_the_objects_of_a_top_level_array(setup: PluginSetup) -> None:
    write(setup, "data.json", b'[{"a": 1}, {"a": 2, "b": {"c": [true]}}]')
    assert rows(await read_all(json_source(setup))) == [{"a": 1}, {"a": 2, "b": {"c": [True]}}]


async def test_json_data_key_selects_the_array(setup: PluginSetup) -> None:
    write(setup, "data.json", b'{"meta": {"n": 2}, "items": [{"a": 1}, {"a": 2}]}')
    assert rows(await read_all(json_source(setup, data_key="items"))) == [{"a": 1}, {"a": 2}]


async def test_json_non_object_elements_are_malformed_records(setup: PluginSetup) -> None:
    write(setup, "data.json", b'[{"a": 1}, 2, "x", [3], null, {"a": 4}]')
    records = await read_all(json_source(setup))
    assert rows(records) == [{"a": 1}, None, None, None, None, {"a": 4}]
    assert errors(records)[1:5] == [
        "element [1]: expected a JSON object, got a number",
        "element [2]: expected a JSON object, got a string",
        "element [3]: expected a JSON object, got an array",
        "element [4]: expected a JSON object, got null",
    ]
    assert [record.raw for record in records[1:5]] == [2, "x", [3], None]


async def test_json_resume_skips_elements(setup: PluginSetup) -> None:
    write(setup, "data.json", b'[{"a": 0}, 1, {"a": 2}]')
    assert (
        await read_all(json_source(setup), start_index=1)
        == (await read_all(json_source(setup)))[1:]
    )


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        (b'[{"a": 1},', {}, "is not valid JSON: Expecting value"),
        (b'[{"a": 1} {"a": 2}]', {}, "is not valid JSON: Expecting ',' delimiter"),
        (b'[{"a": 1}] [', {}, "is not valid JSON: Extra data"),
        (b'{"items": [{"a": 1}], "items" 2}', {"data_key": "items"}, "Expecting ':'"),
        (b'{"items": []}', {}, "expected an array at the top level, got an object .set data_key"),
        (
            b'{"rows": []}',
            {"data_key": "items"},
            "data_key 'items' is not in the document .keys: 'rows'",
        ),
        (b"[]", {"data_key": "items"}, "data_key 'items' needs an object at the top level"),
        (
            b'{"items": {"a": 1}}',
            {"data_key": "items"},
            "expected an array at key 'items', got an object",
        ),
    ],
)
async def test_json_unusable_document_raises(
    setup: PluginSetup, content: bytes, options: dict[str, Any], message: str
) -> None:
    write(setup, "data.json", content)
    with pytest.raises(SourceError, match=message):
        await read_all(json_source(setup, **options))


# -- memory -------------------------------------------------------------------------------


def memory_source(setup: PluginSetup, items: Any) -> MemorySource:
    return MemorySource.from_options({"rows": items}, setup)


async def test_memory_yields_copies_of_the_dicts(setup: PluginSetup) -> None:
    original = {"a": 1}
    records = await read_all(memory_source(setup, [original, MappingProxyType({"b": 2})]))
    assert rows(records) == [{"a": 1}, {"b": 2}]
    assert records[0].row is not original


async def test_memory_reads_a_generator(setup: PluginSetup) -> None:
    generated = ({"n": n} for n in range(3))
    assert rows(await read_all(memory_source(setup, generated))) == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_memory_reads_an_async_iterable(setup: PluginSetup) -> None:
    async def generate() -> AsyncIterator[Mapping[str, int]]:
        for n in range(4):
            yield {"n": n}

    source = memory_source(setup, generate())
    assert rows(await read_all(source, start_index=2)) == [{"n": 2}, {"n": 3}]


async def test_memory_non_dict_items_are_malformed_records(setup: PluginSetup) -> None:
    records = await read_all(memory_source(setup, [{"a": 1}, 5, ["x"], {1: "y"}, None, {"b": 2}]))
    assert rows(records) == [{"a": 1}, None, None, None, None, {"b": 2}]
    assert errors(records)[1:5] == [
        "item 1: expected a dict, got int",
        "item 2: expected a dict, got list",
        "item 3: keys must be strings, got 1",
        "item 4: expected a dict, got NoneType",
    ]
    assert [record.raw for record in records[1:5]] == ["5", "['x']", "{1: 'y'}", "None"]


async def test_memory_resume_counts_malformed_items(setup: PluginSetup) -> None:
    items = [{"i": 0}, "bad", {"i": 2}, {"i": 3}]
    everything = await read_all(memory_source(setup, items))
    for start in range(len(items) + 1):
        assert await read_all(memory_source(setup, items), start_index=start) == everything[start:]


@pytest.mark.parametrize("items", ["abc", b"abc", {"a": 1}, 42, None])
def test_memory_rows_must_be_an_iterable_of_dicts(setup: PluginSetup, items: Any) -> None:
    with pytest.raises(ValidationError, match="must be an iterable of dicts"):
        memory_source(setup, items)


def test_memory_rejects_unknown_options(setup: PluginSetup) -> None:
    with pytest.raises(ValidationError, match="extra"):
        MemorySource.from_options({"rows": [], "path": "x"}, setup)
