"""Plugin lookup: from a YAML ``plugin:`` reference to a plugin class.

A reference is an entry name registered for a kind (``csv``, ``field_map``, ...; a
source and a sink may share a name, the kind tells them apart) or an import path
``"package.module:ClassName"`` (``ClassName`` may be dotted, for a nested class).  Either
way the class must subclass the kind's base class.

Kinds start as ``source``, ``transform``, ``aggregation`` and ``sink``; a module that
brings a new kind adds it with :func:`register_kind`, and modules that bring plugins add
them with :func:`register_plugin`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Literal, TypeVar, overload

from plugins._aggregations import BatchStatsAggregation, CollectAggregation
from plugins._sinks import CsvSink, DatabaseSink, JsonlSink
from plugins._sources import CsvSource, JsonlSource, JsonSource, MemorySource
from plugins._transforms import (
    ComputeTransform,
    FieldMapTransform,
    FilterTransform,
    PassthroughTransform,
)
from plugins.protocols import Aggregation, Plugin, Sink, Source, Transform

__all__ = [
    "PluginNotFound",
    "known_kinds",
    "known_plugins",
    "register_kind",
    "register_plugin",
    "resolve_plugin",
]

P = TypeVar("P", bound=Plugin)

_BASES: dict[str, type[Plugin]] = {
    "source": Source,
    "transform": Transform,
    "aggregation": Aggregation,
    "sink": Sink,
}
_ENTRIES: dict[str, dict[str, type[Plugin]]] = {kind: {} for kind in _BASES}

#: Built-ins registered on first use (their modules are slow to import).
_DEFERRED: dict[str, dict[str, str]] = {
    "transform": {
        "llm": "plugins.llm:LlmTransform",
        "embedding": "plugins.llm:EmbeddingTransform",
    },
    "aggregation": {"llm_batch": "plugins.llm:LlmBatchAggregation"},
}


class PluginNotFound(LookupError):
    """A plugin reference names no usable plugin class of the requested kind."""


def register_kind(kind: str, base: type[Plugin]) -> None:
    """Add a plugin kind whose plugins subclass ``base`` (idempotent for the same base)."""
    if _BASES.get(kind, base) is not base:
        raise ValueError(f"plugin kind {kind!r} is already registered with another base")
    if not (inspect.isclass(base) and issubclass(base, Plugin)):
        raise TypeError(f"the base of plugin kind {kind!r} must be a Plugin subclass")
    _BASES[kind] = base
    _ENTRIES.setdefault(kind, {})


def register_plugin(kind: str, cls: type[P], *, name: str | None = None) -> type[P]:
    """Register ``cls`` under ``name`` (default ``cls.name``) for ``kind``; returns ``cls``.

    Re-registering the same class is a no-op; taking a name already held by another
    class raises :class:`ValueError`.
    """
    entry = name if name is not None else cls.name
    base = _base(kind)
    if not entry:
        raise ValueError(f"{cls.__qualname__} has no name to register it under")
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise TypeError(f"{cls!r} is not a {base.__name__} subclass")
    entries = _ENTRIES[kind]
    _DEFERRED.get(kind, {}).pop(entry, None)  # a name registered now wins over a built-in
    if entries.get(entry, cls) is not cls:
        raise ValueError(f"{kind} plugin {entry!r} is already registered as {entries[entry]!r}")
    entries[entry] = cls
    return cls


def known_kinds() -> list[str]:
    """The registered plugin kinds."""
    return sorted(_BASES)


def known_plugins(kind: str) -> list[str]:
    """The entry names registered for ``kind``, sorted."""
    _base(kind)
    return sorted({*_ENTRIES[kind], *_DEFERRED.get(kind, {})})


@overload
def resolve_plugin(kind: Literal["source"], reference: str) -> type[Source]: ...
@overload
def resolve_plugin(kind: Literal["transform"], reference: str) -> type[Transform]: ...
@overload
def resolve_plugin(kind: Literal["aggregation"], reference: str) -> type[Aggregation]: ...
@overload
def resolve_plugin(kind: Literal["sink"], reference: str) -> type[Sink]: ...
@overload
def resolve_plugin(kind: str, reference: str) -> type[Plugin]: ...
def resolve_plugin(kind: str, reference: str) -> type[Plugin]:
    """The plugin class ``reference`` names for ``kind``.

    Raises :class:`PluginNotFound` when the name is unknown (the message lists the known
    names), the import path does not import or has no such attribute, or the object is
    not a subclass of the kind's base class.  An unknown ``kind`` is a :class:`ValueError`.
    """
    base = _base(kind)
    if ":" not in reference:
        return _entry(kind, reference)
    found = _import(kind, reference)
    if not (inspect.isclass(found) and issubclass(found, base)) or found is base:
        what = f"class {found.__qualname__}" if inspect.isclass(found) else type(found).__name__
        raise PluginNotFound(
            f"{kind} plugin {reference!r} is a {what}, not a subclass of {base.__name__}"
        )
    return found


def _base(kind: str) -> type[Plugin]:
    try:
        return _BASES[kind]
    except KeyError:
        known = ", ".join(sorted(_BASES))
        raise ValueError(f"unknown plugin kind {kind!r} (known kinds: {known})") from None


def _entry(kind: str, name: str) -> type[Plugin]:
    deferred = _DEFERRED.get(kind, {}).pop(name, None)
    if deferred is not None:
        found = _import(kind, deferred)
        assert inspect.isclass(found)
        assert issubclass(found, Plugin)
        register_plugin(kind, found, name=name)
    try:
        return _ENTRIES[kind][name]
    except KeyError:
        known = ", ".join(known_plugins(kind)) or "none"
        hint = " (an import path is written 'package.module:ClassName')" if "." in name else ""
        raise PluginNotFound(
            f"unknown {kind} plugin {name!r}{hint}; known {kind} plugins: {known}"
        ) from None


def _import(kind: str, reference: str) -> object:
    """The object an import path names; raises :class:`PluginNotFound` when there is none."""
    module_name, _, attribute_path = reference.partition(":")
    if not module_name or not attribute_path:
        raise PluginNotFound(f"{kind} plugin {reference!r}: expected 'package.module:ClassName'")
    try:
        found: object = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary module code; all of it is ours to report
        raise PluginNotFound(
            f"{kind} plugin {reference!r}: cannot import {module_name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for attribute in attribute_path.split("."):
        try:
            found = getattr(found, attribute)
        except AttributeError:
            raise PluginNotFound(
                f"{kind} plugin {reference!r}: {module_name!r} has no attribute {attribute_path!r}"
            ) from None
    return found


_BUILTINS: tuple[tuple[str, type[Plugin]], ...] = (
    ("source", CsvSource),
    ("source", JsonlSource),
    ("source", JsonSource),
    ("source", MemorySource),
    ("transform", FieldMapTransform),
    ("transform", ComputeTransform),
    ("transform", FilterTransform),
    ("transform", PassthroughTransform),
    ("aggregation", BatchStatsAggregation),
    ("aggregation", CollectAggregation),
    ("sink", CsvSink),
    ("sink", JsonlSink),
    ("sink", DatabaseSink),
)
for _kind, _class in _BUILTINS:
    register_plugin(_kind, _class)
