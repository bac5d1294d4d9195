"""Built-in sinks, each run through ``check_sink``: durable writes, rejections, artifacts."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import create_async_engine

from plugins._sinks import CsvSink, DatabaseSink, JsonlSink, SinkError, _flat_json_line
from plugins.protocols import Artifact, PluginSetup, Row, Sink, SinkItem, SinkRejection
from plugins.testing import check_sink
from tests._postgres import PostgresServer


@pytest.fixture
def setup(tmp_path: Path) -> PluginSetup:
    return PluginSetup(node_name="sink", base_dir=tmp_path)


def items(*rows: Row) -> list[SinkItem]:
    return [SinkItem(token_id=f"t{n}", row_index=n, row=row) for n, row in enumerate(rows)]


def rejected_tokens(rejections: Sequence[SinkRejection]) -> list[str]:
    return [rejection.token_id for rejection in rejections]


async def write_batches(sink: Sink, *batches: list[SinkItem]) -> list[SinkRejection]:
    async with sink:
        return [rejection for batch in batches for rejection in await sink.write(batch)]


# -- csv ----------------------------------------------------------------------------------


def csv_sink(setup: PluginSetup, **options: Any) -> CsvSink:
    return CsvSink.from_options({"path": "out/rows.csv", **options}, setup)


async def test_csv_columns_default_to_the_first_rows_keys(setup: PluginSetup) -> None:
    artifact = await check_sink(
        csv_sink(setup), items({"id": 1, "name": "ann"}, {"name": "bob", "id": 2}, {"id": 3})
    )
    data = (setup.base_dir / "out/rows.csv").read_bytes()
    assert data == b"id,name\n1,ann\n2,bob\n3,\n"
    assert artifact == Artifact(
        uri=(setup.base_dir / "out/rows.csv").as_uri(),
        content_hash=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        rows_written=3,
    )


async def test_csv_rejects_rows_with_fields_outside_the_columns(setup: PluginSetup) -> None:
    sink = csv_sink(setup, columns=["id", "name"])
    batch = items({"id": 1}, {"id": 2, "extra": "x", "more": 1}, {"id": 3, "name": "c"})
    artifact = await check_sink(sink, batch)
    assert artifact is not None
    assert artifact.rows_written == 2
    assert (setup.base_dir / "out/rows.csv").read_text() == "id,name\n1,\n3,c\n"


async def test_csv_rejection_names_the_unknown_fields(setup: PluginSetup) -> None:
    rejections = await write_batches(csv_sink(setup, columns=["id"]), items({"id": 1, "x": 2}))
    assert rejections == [SinkRejection("t0", "field 'x' is not a column of rows.csv")]


async def test_csv_with_explicit_columns_writes_the_header_on_open(setup: PluginSetup) -> None:
    artifact = await check_sink(csv_sink(setup, columns=["a", "b"]), [])
    assert (setup.base_dir / "out/rows.csv").read_text() == "a,b\n"
    assert artifact is not None
    assert artifact.rows_written == 0


async def test_csv_without_columns_or_rows_leaves_an_empty_file(setup: PluginSetup) -> None:
    await check_sink(csv_sink(setup), [])
    assert (setup.base_dir / "out/rows.csv").read_bytes() == b""


async def test_csv_cell_text_of_each_value_type(setup: PluginSetup) -> None:
    row = {
        "none": None,
        "yes": True,
        "int": 7,
        "float": 2.5,
        "day": date(2024, 1, 2),
        "moment": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "nested": {"k": [1, "é"]},
        "text": 'comma, "quote"\nnewline',
    }
    await check_sink(csv_sink(setup), items(row))
    with (setup.base_dir / "out/rows.csv").open(newline="", encoding="utf-8") as file:
        [read_back] = list(csv.DictReader(file))
    assert read_back == {
        "none": "",
        "yes": "true",
        "int": "7",
        "float": "2.5",
        "day": "2024-01-02",
        "moment": "2024-01-02T03:04:05+00:00",
        "nested": '{"k":[1,"é"]}',
        "text": 'comma, "quote"\nnewline',
    }


async def test_csv_rejects_values_without_text(setup: PluginSetup) -> None:
    batch = items({"v": "ok"}, {"v": b"bytes"}, {"v": object()}, {"v": "\ud800"}, {"v": "fine"})
    artifact = await check_sink(csv_sink(setup), batch)
    assert artifact is not None
    assert artifact.rows_written == 2
    assert (setup.base_dir / "out/rows.csv").read_text() == "v\nok\nfine\n"


async def test_csv_header_survives_a_rejected_first_row(setup: PluginSetup) -> None:
    rejections = await write_batches(csv_sink(setup), items({"v": b"x"}, {"v": 1}))
    assert rejected_tokens(rejections) == ["t0"]
    assert (setup.base_dir / "out/rows.csv").read_text() == "v\n1\n"


# -- files in general ---------------------------------------------------------------------


FILE_SINKS = [
    pytest.param(CsvSink, "out.csv", id="csv"),
    pytest.param(JsonlSink, "out.jsonl", id="jsonl"),
]


@pytest.mark.parametrize(("sink_class", "name"), FILE_SINKS)
async def test_file_sink_creates_parents_and_truncates(
    setup: PluginSetup, sink_class: type[Sink], name: str
) -> None:
    path = setup.base_dir / "a" / "b" / name
    path.parent.mkdir(parents=True)
    path.write_text("old content that must go\n" * 10)
    sink = sink_class.from_options({"path": f"a/b/{name}"}, setup)
    artifact = await check_sink(sink, items({"x": 1}))
    assert artifact is not None
    assert b"old content" not in path.read_bytes()


@pytest.mark.parametrize(("sink_class", "name"), FILE_SINKS)
async def test_a_file_another_sink_writes_is_refused_and_left_untouched(
    setup: PluginSetup, sink_class: type[Sink], name: str
) -> None:
    first = sink_class.from_options({"path": name}, setup)
    second = sink_class.from_options({"path": name}, setup)
    async with first:
        await first.write(items({"x": 1}))
        written = (setup.base_dir / name).read_bytes()
        with pytest.raises(SinkError, match="another process is writing it"):
            await second.open()
        with pytest.raises(SinkError, match="another process is writing it"):
            await second.resume(first.position())
        assert (setup.base_dir / name).read_bytes() == written
    async with second:  # free again once the first is closed
        await second.write(items({"x": 2}))


@pytest.mark.parametrize(("sink_class", "name"), FILE_SINKS)
async def test_resuming_a_file_changed_since_it_was_written_is_refused(
    setup: PluginSetup, sink_class: type[Sink], name: str
) -> None:
    sink = sink_class.from_options({"path": name}, setup)
    async with sink:
        await sink.write(items({"x": 1}, {"x": 2}))
        position = sink.position()
    path = setup.base_dir / name
    path.write_bytes(path.read_bytes().replace(b"1", b"9"))
    again = sink_class.from_options({"path": name}, setup)
    with pytest.raises(SinkError, match="not what the run wrote"):
        await again.resume(position)


@pytest.mark.parametrize(("sink_class", "name"), FILE_SINKS)
async def test_file_sink_fsyncs_once_per_batch_off_the_event_loop(
    setup: PluginSetup, sink_class: type[Sink], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        threads.append(threading.current_thread())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sink = sink_class.from_options({"path": name}, setup)
    await write_batches(sink, items({"x": 1}, {"x": 2}), items({"x": 3}), [])
    assert len(threads) == 1 + 2  # the directory entry on open, then one per non-empty batch
    assert threading.main_thread() not in threads


@pytest.mark.parametrize(("sink_class", "name"), FILE_SINKS)
async def test_file_sink_hash_matches_the_file_across_batches(
    setup: PluginSetup, sink_class: type[Sink], name: str
) -> None:
    sink = sink_class.from_options({"path": name}, setup)
    batch = items(*({"n": n, "text": "é" * n} for n in range(50)))
    artifact = await check_sink(sink, batch)
    assert artifact is not None
    assert artifact.rows_written == 50


@pytest.mark.parametrize(("sink_class", "name"), FILE_SINKS)
async def test_file_sink_refuses_writes_when_not_open(
    setup: PluginSetup, sink_class: type[Sink], name: str
) -> None:
    sink = sink_class.from_options({"path": name}, setup)
    with pytest.raises(RuntimeError, match="is not open"):
        await sink.write(items({"x": 1}))


@pytest.mark.parametrize(("sink_class", "name"), FILE_SINKS)
async def test_file_sink_unwritable_path_raises_sink_error(
    setup: PluginSetup, sink_class: type[Sink], name: str
) -> None:
    (setup.base_dir / "file").write_text("not a directory")
    sink = sink_class.from_options({"path": f"file/{name}"}, setup)
    with pytest.raises(SinkError, match="cannot create"):
        await write_batches(sink)


@pytest.mark.parametrize(
    "options", [{}, {"path": "x", "columns": []}, {"path": "x", "columns": ["a", "a"]}]
)
def test_csv_sink_invalid_options_are_rejected(setup: PluginSetup, options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CsvSink.from_options(options, setup)


# -- jsonl --------------------------------------------------------------------------------


def jsonl_sink(setup: PluginSetup) -> JsonlSink:
    return JsonlSink.from_options({"path": "out/rows.jsonl"}, setup)


async def test_jsonl_writes_one_compact_object_per_line(setup: PluginSetup) -> None:
    rows = items(
        {"a": 1, "b": "é", "c": None},
        {"day": date(2024, 1, 2), "at": datetime(2024, 1, 2, 3, 4, tzinfo=UTC)},
        {"nested": {"list": [1.5, True]}},
    )
    await check_sink(jsonl_sink(setup), rows)
    assert (setup.base_dir / "out/rows.jsonl").read_text(encoding="utf-8").splitlines() == [
        '{"a":1,"b":"é","c":null}',
        '{"day":"2024-01-02","at":"2024-01-02T03:04:00+00:00"}',
        '{"nested":{"list":[1.5,true]}}',
    ]


async def test_jsonl_rejects_rows_json_cannot_hold(setup: PluginSetup) -> None:
    batch = items(
        {"ok": 1},
        {"v": float("nan")},
        {"v": b"bytes"},
        {"v": {1, 2}},
        {"v": "\udcff"},
        {"ok": 2},
    )
    rejections = await write_batches(jsonl_sink(setup), batch)
    assert rejected_tokens(rejections) == ["t1", "t2", "t3", "t4"]
    assert all("not representable" in rejection.error for rejection in rejections)
    lines = (setup.base_dir / "out/rows.jsonl").read_text().splitlines()
    assert lines == ['{"ok":1}', '{"ok":2}']
    await check_sink(jsonl_sink(setup), batch)


_FLAT_VALUES = (
    st.text()
    | st.integers()
    | st.floats()
    | st.sampled_from([0.0, -0.0, 2.0, 1e-4, 9.5e-5, 1e16, 1e-7, float("nan"), float("inf")])
    | st.booleans()
    | st.none()
)


@settings(max_examples=500)
@given(row=st.dictionaries(st.text(max_size=3), _FLAT_VALUES, max_size=6))
def test_jsonl_fast_encoding_is_the_json_module_s(row: dict[str, Any]) -> None:
    """Flat rows take orjson: its line must be byte for byte the one :mod:`json` writes
    (same floats, escapes, refusals), so the file does not depend on which path ran."""
    fast = _flat_json_line(row)
    if fast is None:
        return
    reference = json.dumps(row, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    assert fast == (reference + "\n").encode("utf-8")


@pytest.mark.parametrize(
    "row",
    [{"a": 0.5, "b": float("nan")}, {"a": 1e-5}, {"a": 1e16}, {"a": 2**64}, {"\udcff": 1}],
)
def test_jsonl_fast_encoding_leaves_what_it_cannot_match_to_json(row: dict[str, Any]) -> None:
    assert _flat_json_line(row) is None
    assert (
        _flat_json_line({"a": 0.25, "b": "é", "c": None})
        == '{"a":0.25,"b":"é","c":null}\n'.encode()
    )


# -- database -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'sink.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"sink_{uuid.uuid4().hex}"
    await server.create_database(name)
    yield server.url(name)
    await server.drop_database(name)


def database_sink(setup: PluginSetup, url: str, table: str = "results") -> DatabaseSink:
    return DatabaseSink.from_options({"url": url, "table": table}, setup)


async def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(sa.text(sql))
            return [tuple(row) for row in result]
    finally:
        await engine.dispose()


async def execute(url: str, sql: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text(sql))
    finally:
        await engine.dispose()


def canonical_hash(rows: Sequence[Row]) -> tuple[str, int]:
    data = b"".join(
        json.dumps(row, sort_keys=True, separators=(",", ":"), default=str).encode() + b"\n"
        for row in rows
    )
    return hashlib.sha256(data).hexdigest(), len(data)


async def test_database_creates_the_table_with_inferred_types(
    setup: PluginSetup, database_url: str
) -> None:
    rows = [
        {"id": 1, "score": 0.5, "ok": True, "name": "ann", "note": None},
        {"id": 2, "score": 1, "ok": False, "name": "bob", "note": "n"},
    ]
    artifact = await check_sink(database_sink(setup, database_url), items(*rows))
    assert await query(
        database_url, "SELECT token_id, row_index, id, score, ok, name, note FROM results"
    ) == [("t0", 0, 1, 0.5, True, "ann", None), ("t1", 1, 2, 1.0, False, "bob", "n")]
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(
                lambda sync: {c["name"]: c["type"] for c in sa.inspect(sync).get_columns("results")}
            )
    finally:
        await engine.dispose()
    assert isinstance(columns["id"], sa.BigInteger | sa.Integer)
    assert isinstance(columns["score"], sa.Float | sa.Numeric)
    assert isinstance(columns["ok"], sa.Boolean) or database_url.startswith("sqlite")
    assert isinstance(columns["note"], sa.Text | sa.String)
    expected_hash, size = canonical_hash(rows)
    assert artifact is not None
    assert (artifact.content_hash, artifact.size_bytes, artifact.rows_written) == (
        expected_hash,
        size,
        2,
    )
    assert artifact.uri.endswith("#results")


async def test_database_upserts_by_token_id(setup: PluginSetup, database_url: str) -> None:
    first = [SinkItem("a", 0, {"v": "one"}), SinkItem("b", 1, {"v": "two"})]
    await check_sink(database_sink(setup, database_url), first)
    again = [
        SinkItem("b", 1, {"v": "TWO"}),
        SinkItem("c", 2, {"v": "three"}),
        SinkItem("c", 2, {"v": "THREE"}),
    ]
    rejections = await write_batches(database_sink(setup, database_url), again)
    assert rejections == []
    assert await query(database_url, "SELECT token_id, v FROM results ORDER BY token_id") == [
        ("a", "one"),
        ("b", "TWO"),
        ("c", "THREE"),
    ]


async def test_database_rejects_rows_it_cannot_store(setup: PluginSetup, database_url: str) -> None:
    batch = items(
        {"n": 1, "x": 0.5, "flag": True, "text": "a"},
        {"n": 2, "extra": "no column"},
        {"n": "three"},
        {"n": 2**63},
        {"x": float("inf")},
        {"x": 10**400},
        {"flag": 1},
        {"text": b"bytes"},
        {"text": "nul\x00"},
        {"token_id": "mine"},
        {"n": 10, "x": 3, "text": 4.5},
        {"n": None, "text": {"k": [1, date(2024, 1, 2)]}},
    )
    artifact = await check_sink(database_sink(setup, database_url), batch)
    assert artifact is not None
    assert artifact.rows_written == 3
    assert await query(
        database_url, "SELECT token_id, n, x, text FROM results ORDER BY row_index"
    ) == [
        ("t0", 1, 0.5, "a"),
        ("t10", 10, 3.0, "4.5"),
        ("t11", None, None, '{"k":[1,"2024-01-02"]}'),
    ]


async def test_database_rejections_say_why(setup: PluginSetup, database_url: str) -> None:
    batch = items({"n": 1}, {"m": 1}, {"n": "x"}, {"row_index": 5})
    rejections = await write_batches(database_sink(setup, database_url), batch)
    assert [rejection.error for rejection in rejections] == [
        "field 'm' has no column in table 'results'",
        "field 'n': 'x' does not fit a 64-bit integer column",
        "field 'row_index' is reserved for the sink's own column",
    ]


async def test_database_writes_into_an_existing_table(
    setup: PluginSetup, database_url: str
) -> None:
    await check_sink(database_sink(setup, database_url), items({"a": 1, "b": None}))
    second = [SinkItem("new", 7, {"b": "now text", "a": 2})]
    await check_sink(database_sink(setup, database_url), second)
    assert await query(database_url, "SELECT token_id, a, b FROM results ORDER BY row_index") == [
        ("t0", 1, None),
        ("new", 2, "now text"),
    ]


async def test_database_refuses_an_existing_table_not_keyed_by_token(
    setup: PluginSetup, database_url: str
) -> None:
    await execute(database_url, "CREATE TABLE results (id INTEGER PRIMARY KEY, v TEXT)")
    with pytest.raises(SinkError, match="not keyed by token_id"):
        await write_batches(database_sink(setup, database_url))


async def test_database_empty_batches_create_nothing(setup: PluginSetup, database_url: str) -> None:
    artifact = await check_sink(database_sink(setup, database_url, table="never"), [])
    assert artifact is not None
    assert artifact.rows_written == 0
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            exists = await connection.run_sync(lambda sync: sa.inspect(sync).has_table("never"))
    finally:
        await engine.dispose()
    assert not exists


async def test_database_relative_sqlite_path_is_relative_to_the_pipeline(
    setup: PluginSetup,
) -> None:
    sink = database_sink(setup, "sqlite+aiosqlite:///out/nested/db.sqlite")
    artifact = await check_sink(sink, items({"a": 1}))
    path = setup.base_dir / "out/nested/db.sqlite"
    assert path.exists()
    assert artifact is not None
    assert artifact.uri == f"sqlite+aiosqlite:///{path}#results"


def test_database_artifact_uri_hides_the_password(setup: PluginSetup) -> None:
    url = "postgresql+asyncpg://user:secret@db.example:5432/app"
    artifact = database_sink(setup, url).artifact()
    assert artifact is not None
    assert artifact.uri == "postgresql+asyncpg://user:***@db.example:5432/app#results"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///x.db", "is not async"),
        ("postgresql+psycopg2://h/db", "is not async"),
        ("mysql+aiomysql://h/db", "is not sqlite or postgresql"),
        ("not a url", "not a usable SQLAlchemy URL"),
    ],
)
def test_database_url_must_be_async_sqlite_or_postgresql(
    setup: PluginSetup, url: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        database_sink(setup, url)


async def test_database_unreachable_server_raises_sink_error(setup: PluginSetup) -> None:
    sink = database_sink(setup, "postgresql+asyncpg://nobody@127.0.0.1:1/none")
    with pytest.raises(SinkError, match="database sink postgresql"):
        await write_batches(sink)


async def test_check_sink_catches_a_miscounting_artifact(setup: PluginSetup) -> None:
    class Miscounting(JsonlSink):
        def artifact(self) -> Artifact | None:
            found = super().artifact()
            assert found is not None
            return Artifact(found.uri, found.content_hash, found.size_bytes, 99)

    sink = Miscounting.from_options({"path": "x.jsonl"}, setup)
    with pytest.raises(AssertionError, match="says 99 rows written, expected 1"):
        await check_sink(sink, items({"a": 1}))


async def test_check_sink_catches_a_wrong_file_hash(setup: PluginSetup) -> None:
    class Lying(JsonlSink):
        def artifact(self) -> Artifact | None:
            found = super().artifact()
            assert found is not None
            return Artifact(found.uri, "0" * 64, found.size_bytes, found.rows_written)

    with pytest.raises(AssertionError, match="!= sha256 of the file"):
        await check_sink(Lying.from_options({"path": "x.jsonl"}, setup), items({"a": 1}))
