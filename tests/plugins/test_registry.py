"""Plugin lookup by entry name and import path, and registration of more plugins and kinds."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from plugins import _registry
from plugins._registry import (
    PluginNotFound,
    known_kinds,
    known_plugins,
    register_kind,
    register_plugin,
    resolve_plugin,
)
from plugins._sinks import CsvSink, DatabaseSink, JsonlSink
from plugins._sources import CsvSource, JsonlSource, JsonSource, MemorySource
from plugins._transforms import FieldMapTransform, PassthroughTransform
from plugins.protocols import Plugin, PluginSetup, Row, RowContext, Sink, Transform, TransformResult
from plugins.testing import check_transform


class Shout(Transform):
    """A custom transform found by import path in these tests."""

    name: ClassVar[str] = "shout"

    async def process(self, row: Row, ctx: RowContext) -> TransformResult:
        return {key: str(value).upper() for key, value in row.items()}

    class Inner(Transform):
        name: ClassVar[str] = "inner"


class Enricher(Plugin):
    """A stand-in for a kind added later."""


class Batcher(Enricher):
    name: ClassVar[str] = "batcher"


def not_a_class() -> None:
    """An attribute that is not a plugin class."""


@pytest.fixture
def registry() -> Iterator[None]:
    """Undo registrations made by a test."""
    bases = dict(_registry._BASES)
    entries = {kind: dict(names) for kind, names in _registry._ENTRIES.items()}
    yield
    _registry._BASES.clear()
    _registry._BASES.update(bases)
    _registry._ENTRIES.clear()
    _registry._ENTRIES.update(entries)


def test_builtins_are_known_per_kind() -> None:
    assert known_plugins("source") == ["csv", "json", "jsonl", "memory"]
    assert known_plugins("transform") == [
        "compute",
        "embedding",
        "field_map",
        "filter",
        "llm",
        "passthrough",
    ]
    assert known_plugins("sink") == ["csv", "database", "jsonl"]
    assert known_plugins("aggregation") == ["batch_stats", "collect", "llm_batch"]
    assert known_kinds() == ["aggregation", "sink", "source", "transform"]


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        ("source", "csv", CsvSource),
        ("sink", "csv", CsvSink),
        ("source", "jsonl", JsonlSource),
        ("sink", "jsonl", JsonlSink),
        ("source", "json", JsonSource),
        ("source", "memory", MemorySource),
        ("transform", "field_map", FieldMapTransform),
        ("sink", "database", DatabaseSink),
    ],
)
def test_entry_names_resolve_by_kind(kind: str, name: str, expected: type[Plugin]) -> None:
    assert resolve_plugin(kind, name) is expected


def test_unknown_name_lists_the_known_names_of_its_kind() -> None:
    with pytest.raises(PluginNotFound) as caught:
        resolve_plugin("sink", "parquet")
    assert str(caught.value) == (
        "unknown sink plugin 'parquet'; known sink plugins: csv, database, jsonl"
    )


def test_a_name_of_another_kind_is_not_found() -> None:
    with pytest.raises(PluginNotFound, match="unknown transform plugin 'csv'"):
        resolve_plugin("transform", "csv")


def test_dotted_name_without_colon_hints_at_the_import_path_form() -> None:
    with pytest.raises(PluginNotFound, match=r"'package\.module:ClassName'"):
        resolve_plugin("transform", "tests.plugins.test_registry.Shout")


def test_plugin_not_found_is_a_lookup_error() -> None:
    assert issubclass(PluginNotFound, LookupError)


def test_import_path_resolves_a_custom_class() -> None:
    assert resolve_plugin("transform", f"{__name__}:Shout") is Shout
    assert resolve_plugin("transform", f"{__name__}:Shout.Inner") is Shout.Inner


async def test_an_imported_plugin_runs() -> None:
    shout = resolve_plugin("transform", f"{__name__}:Shout")
    transform = shout.from_options({}, PluginSetup(node_name="shout", base_dir=Path(".")))
    assert await check_transform(transform, [{"a": "x", "b": 1}]) == [{"a": "X", "b": "1"}]


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("no_such_module_xyz:Thing", "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
        (f"{__name__}:Missing", f"{__name__!r} has no attribute 'Missing'"),
        (f"{__name__}:Shout.Missing", "has no attribute 'Shout.Missing'"),
        (f"{__name__}:not_a_class", "is a function, not a subclass of Transform"),
        (f"{__name__}:Batcher", "is a class Batcher, not a subclass of Transform"),
        ("plugins.protocols:Transform", "is a class Transform, not a subclass of Transform"),
        (":Shout", "expected 'package.module:ClassName'"),
        (f"{__name__}:", "expected 'package.module:ClassName'"),
    ],
)
def test_bad_import_paths_are_not_found(reference: str, message: str) -> None:
    with pytest.raises(PluginNotFound, match=message):
        resolve_plugin("transform", reference)


def test_a_module_failing_at_import_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_plugin_module.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(PluginNotFound, match="RuntimeError: boom at import") as caught:
            resolve_plugin("transform", "broken_plugin_module:Thing")
        assert isinstance(caught.value.__cause__, RuntimeError)
    finally:
        sys.modules.pop("broken_plugin_module", None)


def test_an_import_path_of_the_wrong_kind_is_refused() -> None:
    with pytest.raises(PluginNotFound, match="not a subclass of Sink"):
        resolve_plugin("sink", "plugins._transforms:PassthroughTransform")


def test_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown plugin kind 'gizmo'"):
        resolve_plugin("gizmo", "csv")
    with pytest.raises(ValueError, match="unknown plugin kind 'gizmo'"):
        known_plugins("gizmo")


@pytest.mark.usefixtures("registry")
def test_register_plugin_adds_an_entry_name() -> None:
    assert register_plugin("transform", Shout) is Shout
    assert resolve_plugin("transform", "shout") is Shout
    assert "shout" in known_plugins("transform")
    register_plugin("transform", Shout)  # the same class again is a no-op
    register_plugin("transform", Shout, name="yell")
    assert resolve_plugin("transform", "yell") is Shout


@pytest.mark.usefixtures("registry")
def test_register_plugin_refuses_a_taken_name_or_a_wrong_base() -> None:
    with pytest.raises(ValueError, match="'passthrough' is already registered"):
        register_plugin("transform", Shout, name="passthrough")
    with pytest.raises(TypeError, match="is not a Sink subclass"):
        register_plugin("sink", Shout)
    with pytest.raises(ValueError, match="no name"):
        register_plugin("transform", Transform)
    assert resolve_plugin("transform", "passthrough") is PassthroughTransform


@pytest.mark.usefixtures("registry")
def test_new_kinds_can_be_registered() -> None:
    register_kind("enricher", Enricher)
    register_kind("enricher", Enricher)  # idempotent
    register_plugin("enricher", Batcher)
    assert known_kinds() == ["aggregation", "enricher", "sink", "source", "transform"]
    assert resolve_plugin("enricher", "batcher") is Batcher
    assert resolve_plugin("enricher", f"{__name__}:Batcher") is Batcher
    with pytest.raises(PluginNotFound, match="not a subclass of Enricher"):
        resolve_plugin("enricher", f"{__name__}:Shout")
    with pytest.raises(ValueError, match="already registered with another base"):
        register_kind("enricher", Sink)
