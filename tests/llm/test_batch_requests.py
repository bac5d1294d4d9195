"""Batch-aware requests never drop answers: every `response_format` carries each row's
answer back to its own row, a row without one is that row's error, every schema sent
is a valid strict structured output, `embedding` batches its requests, and a node
cannot set `batch_size` on a plugin that cannot batch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import ConfigError, Pipeline
from landscape import Landscape
from landscape import _schema as t
from plugins.llm import Fault, MockLlmServer, MockSettings
from plugins.llm._embedding import _vectors
from plugins.llm._strict import strict_problems, strict_schema
from plugins.llm._transform import AnswerError, LlmTransform
from tests._read import read_jsonl, table_rows

from .conftest import CLASSIFY_SCHEMA, llm_node, pipeline, tickets
from .test_embedding import embed_node

Run = Callable[..., Any]

#: A schema whose parts are definitions it refers to.
TAGGED_SCHEMA = {
    "type": "object",
    "$defs": {
        "tag": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "weight": {"type": ["number", "null"]}},
            "required": ["name", "weight"],
        }
    },
    "properties": {
        "label": {"enum": ["billing", "login", "other"]},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2},
    },
    "required": ["label", "tags"],
}

#: Options of each response_format (a text answer needs a field to go into).
FORMATS: dict[str, dict[str, Any]] = {
    "text": {"response_format": "text", "json_schema": None, "output_field": "summary"},
    "json": {"response_format": "json", "json_schema": None},
    "json_schema": {},
    "json_schema_defs": {"json_schema": TAGGED_SCHEMA},
}


def node(response_format: str, **extra: Any) -> dict[str, Any]:
    options = {**FORMATS[response_format], **extra.pop("options", {})}
    return llm_node(options=options, **extra)


def run_dir(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A directory of its own for one run, and the URL of the Landscape in it."""
    path = tmp_path / name
    path.mkdir()
    return path, f"sqlite+aiosqlite:///{path / 'audit.db'}"


async def sent_requests(url: str) -> list[dict[str, Any]]:
    """The request of every call on record in the Landscape at ``url``."""
    calls = await table_rows(url, t.calls)
    async with Landscape.connect(url) as landscape:
        payloads = await landscape.load_payloads({c["request_hash"] for c in calls})
    return [payloads[c["request_hash"]] for c in calls]


def plugin_of(config: dict[str, Any], name: str = "classify") -> Any:
    """The plugin instance a pipeline built for node ``name`` (nothing runs)."""
    return Pipeline.from_dict(config).graph.nodes[name].plugin


def chat(content: Any) -> dict[str, Any]:
    """A chat completion answering ``content`` (JSON-encoded unless text)."""
    text = content if isinstance(content, str) else json.dumps(content)
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


# -- every response_format maps answers back to their rows ----------------------------------


@pytest.mark.parametrize("response_format", list(FORMATS))
async def test_each_row_of_a_batch_gets_the_answer_its_own_request_gets(
    run_verified: Run, tmp_path: Path, response_format: str
) -> None:
    single, single_url = run_dir(tmp_path, "single")
    batched, batched_url = run_dir(tmp_path, "batched")
    async with MockLlmServer(MockSettings(seed=3)) as server:
        await run_verified(
            pipeline(server.base_url, tickets(10), single, transforms=[node(response_format)]),
            url=single_url,
        )
        server.reset_statistics()
        config = pipeline(
            server.base_url,
            tickets(10),
            batched,
            transforms=[node(response_format, batch_size=4, batch_wait_ms=600_000)],
        )
        result = await run_verified(config, url=batched_url)
        stats = server.statistics()
    assert (stats.requests, stats.batch_requests, stats.batch_rows) == (3, 3, 10)
    assert result.outcomes == {"completed": 10}
    out = read_jsonl(batched / "out.jsonl")
    # the mock answers each prompt by its own text: equal rows mean each answer came home
    assert out == read_jsonl(single / "out.jsonl")
    answers = [row["summary"] if response_format == "text" else row["label"] for row in out]
    assert all(isinstance(answer, str) and answer for answer in answers)
    if response_format == "text":
        assert len(set(answers)) == 10


@pytest.mark.parametrize("response_format", ["text", "json", "json_schema"])
async def test_an_answer_left_out_of_a_batch_is_that_rows_error_alone(
    run_verified: Run, tmp_path: Path, sqlite_url: str, response_format: str
) -> None:
    settings = MockSettings(faults={Fault.WRONG_ANSWER_COUNT: 1.0})
    async with MockLlmServer(settings) as server:
        transform = node(
            response_format, batch_size=4, batch_wait_ms=600_000, options={"parse_retries": 0}
        )
        config = pipeline(server.base_url, tickets(8), tmp_path, transforms=[transform])
        result = await run_verified(config)  # the audit trail verifies
        assert server.statistics().requests == 2
    # the mock leaves out the last answer of each batch of four
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [row["id"] for row in out] == [0, 1, 2, 4, 5, 6]
    field = "summary" if response_format == "text" else "label"
    assert all(isinstance(row[field], str) and row[field] for row in out)
    errors = read_jsonl(tmp_path / "errors.jsonl")
    assert [row["id"] for row in errors] == [3, 7]
    assert "no item with index 3 for this row (3 items for 4 rows)" in errors[0]["_error"]
    assert result.outcomes == {"completed": 6, "quarantined": 2}
    states = await table_rows(sqlite_url, t.node_states)
    failed = [s for s in states if s["node_id"] == "classify" and s["status"] != "completed"]
    assert len(failed) == 2
    assert all("AnswerError" in (s["error_json"] or "") for s in failed)
    calls = await table_rows(sqlite_url, t.calls)
    assert len(calls) == 8  # the batch's call is on record for each of its rows


@pytest.mark.parametrize(
    ("response_format", "items", "message"),
    [
        (
            "text",
            [{"index": 0, "answer": "a"}, {"index": 1, "answer": "b"}, {"index": 1, "answer": "c"}],
            "holds 2 items with index 1",
        ),
        (
            "text",
            [{"index": 0, "answer": "a"}, {"index": 7, "answer": "b"}],
            "no item with index 1",
        ),
        ("text", [{"index": 0, "answer": "a"}, {"index": 1}], "no text 'answer'"),
        ("json", [{"index": 0, "answer": "{}"}, {"index": 1, "answer": "{oops"}], "not JSON"),
        ("json", [{"index": 0, "answer": "{}"}, {"index": 1, "answer": "[1]"}], "an object"),
        (
            "json_schema",
            [{"index": 0, "label": "login", "score": 0.5}, {"index": 1, "label": "login"}],
            "'score' is a required property",
        ),
    ],
    ids=["repeated", "unknown-index", "no-answer", "not-json", "not-object", "schema-invalid"],
)
def test_an_unusable_item_is_the_error_of_its_own_row(
    tmp_path: Path, response_format: str, items: list[dict[str, Any]], message: str
) -> None:
    config = pipeline("http://127.0.0.1:9/v1", [], tmp_path, transforms=[node(response_format)])
    llm: LlmTransform = plugin_of(config)
    rows = tickets(2)
    first, second = llm.batch_results(rows, chat({"answers": items}))
    assert isinstance(first, dict)
    assert first["id"] == rows[0]["id"]
    assert isinstance(second, AnswerError)
    assert message in str(second)


async def test_rows_keep_the_answers_of_an_earlier_attempt(tmp_path: Path) -> None:
    config = pipeline("http://127.0.0.1:9/v1", [], tmp_path, transforms=[node("text")])
    llm: LlmTransform = plugin_of(config)
    rows = tickets(3)
    first = llm.batch_results(rows, chat({"answers": [{"index": 0, "answer": "zero"}]}))
    assert first[0] == {**rows[0], "summary": "zero"}
    assert all(isinstance(result, AnswerError) for result in first[1:])
    whole = llm.batch_results(rows, chat("no JSON here"))
    assert all("not JSON" in str(result) for result in whole)


# -- strict structured outputs --------------------------------------------------------------


async def test_every_schema_sent_is_a_valid_strict_structured_output(
    run_verified: Run, tmp_path: Path
) -> None:
    schemas: dict[str, list[dict[str, Any]]] = {}
    async with MockLlmServer(MockSettings()) as server:
        for response_format in FORMATS:
            for batch_size in (1, 3):
                out, url = run_dir(tmp_path, f"{response_format}-{batch_size}")
                transform = node(response_format, batch_size=batch_size)
                config = pipeline(server.base_url, tickets(6), out, transforms=[transform])
                await run_verified(config, url=url)
                for request in await sent_requests(url):
                    spec = request.get("response_format", {}).get("json_schema")
                    if spec is not None:
                        assert spec["strict"] is True
                        schemas.setdefault(spec["name"], []).append(spec["schema"])
    assert set(schemas) == {"answer", "answers", "text_answers", "json_answers"}
    for name, sent in schemas.items():
        for schema in sent:
            assert strict_problems(schema) == [], name
    # the checker is not a rubber stamp: the wrapper sent before lacked what strict needs
    index = {"index": {"type": "integer"}}
    old_item = {"type": "object", "properties": index, "required": ["index"]}
    answers = {"type": "array", "items": old_item, "minItems": 2, "maxItems": 2}
    old = {"type": "object", "properties": {"answers": answers}, "required": ["answers"]}
    assert strict_problems(old) == [
        "(root): an object schema needs additionalProperties: false",
        "/properties/answers/items: an object schema needs additionalProperties: false",
    ]


def test_a_schema_is_sent_in_its_strict_form_and_answers_still_meet_it_all() -> None:
    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "maxLength": 10, "format": "uri"},
            "tags": {
                "type": "array",
                "items": {"properties": {"name": {"type": "string"}}, "required": ["name"]},
                "uniqueItems": True,
            },
            "note": {"type": ["string", "null"]},
        },
        "required": ["summary", "tags", "note"],
    }
    sent = strict_schema(schema)
    assert strict_problems(sent) == []
    assert sent["additionalProperties"] is False
    assert sent["properties"]["summary"] == {"type": "string"}
    assert sent["properties"]["tags"]["items"] == {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    assert "additionalProperties" not in schema  # the user's schema is left as it was


@pytest.mark.parametrize(
    ("json_schema", "message"),
    [
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": []},
            "property 'a' is not in required",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"oneOf": [{"type": "string"}]}},
                "required": ["a"],
            },
            "keyword 'oneOf' is not supported (use anyOf)",
        ),
        ({"type": "array", "items": {"type": "string"}}, "the root must be an object schema"),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "object", "additionalProperties": True}},
                "required": ["a"],
            },
            "/properties/a: an object schema needs additionalProperties: false",
        ),
    ],
    ids=["optional", "oneOf", "array-root", "open-object"],
)
def test_a_schema_that_cannot_be_strict_is_refused_at_its_key_path(
    tmp_path: Path, json_schema: dict[str, Any], message: str
) -> None:
    transform = node("json_schema", options={"json_schema": json_schema})
    config = pipeline("http://127.0.0.1:9/v1", [], tmp_path, transforms=[transform])
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(config)
    (issue,) = info.value.issues
    assert issue.path == "transforms[0].options.json_schema"
    assert message in issue.message


# -- embedding batches -----------------------------------------------------------------------


async def test_embedding_makes_one_request_per_batch_and_each_vector_finds_its_row(
    run_verified: Run, tmp_path: Path
) -> None:
    rows = [{"id": i, "text": f"document number {i}"} for i in range(20)]
    single, single_url = run_dir(tmp_path, "single")
    batched, batched_url = run_dir(tmp_path, "batched")
    async with MockLlmServer(MockSettings(embedding_dimensions=4)) as server:
        await run_verified(
            pipeline(server.base_url, rows, single, transforms=[embed_node()]), url=single_url
        )
        server.reset_statistics()
        transform = {**embed_node(), "batch_size": 8, "batch_wait_ms": 600_000}
        config = pipeline(server.base_url, rows, batched, transforms=[transform])
        result = await run_verified(config, url=batched_url)
        assert server.statistics().requests == 3
    out = read_jsonl(batched / "out.jsonl")
    assert out == read_jsonl(single / "out.jsonl")  # the mock's vector depends on the text
    assert len({tuple(row["embedding"]) for row in out}) == 20
    assert result.calls.calls == 3
    calls = await table_rows(batched_url, t.calls)
    assert len(calls) == 20  # every row's state holds the call its text went in
    assert len({c["state_id"] for c in calls}) == 20
    inputs = sorted(len(r["input"]) for r in await sent_requests(batched_url))
    assert sorted(set(inputs)) == [4, 8]


async def test_a_row_without_text_fails_alone_in_its_embedding_batch(
    run_verified: Run, tmp_path: Path
) -> None:
    rows = [{"id": 0, "text": "alpha"}, {"id": 1, "text": None}, {"id": 2, "text": "gamma"}]
    async with MockLlmServer(MockSettings()) as server:
        transform = {**embed_node(), "batch_size": 3, "batch_wait_ms": 600_000}
        config = pipeline(server.base_url, rows, tmp_path, transforms=[transform])
        result = await run_verified(config)
        assert server.statistics().requests == 1
    assert [row["id"] for row in read_jsonl(tmp_path / "out.jsonl")] == [0, 2]
    (error,) = read_jsonl(tmp_path / "errors.jsonl")
    assert error["id"] == 1
    assert "NoneType, not text" in error["_error"]
    assert result.outcomes == {"completed": 2, "quarantined": 1}


def test_embedding_vectors_are_mapped_by_their_index_not_their_position() -> None:
    answer = {
        "data": [
            {"index": 2, "embedding": [0.2]},
            {"index": 0, "embedding": [0.0]},
            {"index": 3, "embedding": [0.3]},
            {"index": 3, "embedding": [0.31]},
            {"index": 9, "embedding": [0.9]},
        ]
    }
    # index 1 has no vector, index 3 two of them: neither row gets one
    assert _vectors(answer, 4) == {0: [0.0], 2: [0.2]}


# -- batch_size on a plugin that cannot batch ------------------------------------------------


def test_batch_size_on_a_plugin_that_cannot_batch_is_refused_at_its_key_path(
    tmp_path: Path,
) -> None:
    passthrough = {
        "name": "copy",
        "plugin": "passthrough",
        "input": "raw",
        "on_success": "out",
        "on_error": "errors",
        "batch_size": 8,
    }
    config = pipeline("http://127.0.0.1:9/v1", [], tmp_path, transforms=[passthrough])
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(config)
    (issue,) = info.value.issues
    assert issue.path == "transforms[0].batch_size"
    assert "'passthrough' transform processes rows one at a time" in issue.message


def test_a_schema_whose_property_is_named_index_cannot_be_batched(tmp_path: Path) -> None:
    properties = {**CLASSIFY_SCHEMA["properties"], "index": {"type": "integer"}}  # type: ignore[dict-item]
    schema = {**CLASSIFY_SCHEMA, "properties": properties, "required": [*properties]}
    transform = node("json_schema", batch_size=2, options={"json_schema": schema})
    config = pipeline("http://127.0.0.1:9/v1", [], tmp_path, transforms=[transform])
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(config)
    (issue,) = info.value.issues
    assert issue.path == "transforms[0].batch_size"
    assert "property 'index'" in issue.message
    unbatched = node("json_schema", options={"json_schema": schema})
    plugin_of(pipeline("http://127.0.0.1:9/v1", [], tmp_path, transforms=[unbatched]))


def test_validate_and_run_exit_2_naming_the_batch_size_key(tmp_path: Path) -> None:
    document = {
        "source": {"plugin": "json", "options": {"path": "in.json"}, "on_success": "raw"},
        "transforms": [
            {"name": "tidy", "plugin": "passthrough", "input": "raw", "on_success": "mid"},
            {
                "name": "copy",
                "plugin": "field_map",
                "input": "mid",
                "on_success": "out",
                "batch_size": 4,
                "options": {"rename": {"a": "b"}},
            },
        ],
        "sinks": [{"name": "out", "plugin": "jsonl", "options": {"path": "out.jsonl"}}],
    }
    (tmp_path / "in.json").write_text("[]", encoding="utf-8")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    for command in ("validate", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", command, "pipeline.yaml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "transforms[1].batch_size" in done.stderr
    assert not (tmp_path / "out.jsonl").exists()
