"""JSON-schema value generators for the mock LLM server's structured answers.

:func:`compile_schema` turns a schema into a function from a *salt* (bytes) to a value
that validates against the schema.  Every leaf value is taken from a hash of the salt
and the value's path below the schema's root (``/label``, ``/tags/2``), so the same salt
always gives the same document, and a field keeps its value when the object it lives in
is generated elsewhere under the same salt (a batch row, say).

Supported: ``type`` (one or a list; ``null`` is picked only when it is the sole type),
``enum``, ``const``, ``properties``, ``required`` (required names without a schema become
strings), ``items``, ``minItems``/``maxItems``, ``minimum``/``maximum`` and their
exclusive forms, ``minLength``/``maxLength``, the formats ``date``, ``date-time``,
``email``, ``uuid`` and ``uri``, local ``$ref`` (``#/$defs/...``), ``anyOf``/``oneOf``
(the first non-null alternative) and ``allOf`` (merged shallowly).  ``pattern``,
``multipleOf`` and ``uniqueItems`` are ignored.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable, Mapping
from hashlib import blake2b
from typing import Any, TypeAlias

__all__ = ["BadRequest", "ValueGenerator", "compile_schema", "number", "unit", "words"]

ValueGenerator: TypeAlias = Callable[[bytes], Any]

_MAX_DEPTH = 32
_DEFAULT_INTEGER_SPAN = 100
_EPOCH = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
_WORDS = (
    "amber", "basil", "cedar", "delta", "ember", "fable", "glade", "harbor",
    "indigo", "juniper", "kelp", "lantern", "meadow", "nectar", "orbit", "pebble",
    "quartz", "river", "saffron", "timber", "umber", "velvet", "willow", "xenon",
    "yarrow", "zephyr", "acorn", "breeze", "canyon", "dune", "estuary", "fern",
    "granite", "heron", "island", "jasper", "kestrel", "lichen", "maple", "nimbus",
    "onyx", "prairie", "quill", "reed", "summit", "thistle", "upland", "valley",
    "walnut", "yonder", "zinnia", "anchor", "beacon", "comet", "drift", "echo",
    "falcon", "garnet", "hollow", "ivory", "jetty", "kindle", "lagoon", "mosaic",
)  # fmt: skip
_WORD_BITS = 6  # len(_WORDS) == 2**6


class BadRequest(ValueError):
    """A request the mock server cannot answer; its message goes back in a 400."""


def number(salt: bytes) -> int:
    """A 64-bit number drawn from ``salt``."""
    return int.from_bytes(blake2b(salt, digest_size=8).digest(), "little")


def unit(salt: bytes) -> float:
    """A number strictly between 0 and 1 drawn from ``salt``."""
    return ((number(salt) >> 11) + 0.5) / 2**53


def words(salt: bytes, fewest: int, most: int) -> str:
    """Between ``fewest`` and ``most`` (at most 18) words drawn from ``salt``."""
    bits = int.from_bytes(blake2b(salt, digest_size=16).digest(), "little")
    count = fewest + (bits & 0xFF) % (most - fewest + 1)
    bits >>= 8
    mask = len(_WORDS) - 1
    return " ".join(_WORDS[(bits >> (_WORD_BITS * i)) & mask] for i in range(count))


def compile_schema(schema: Any, root: Any = None) -> ValueGenerator:
    """A generator of documents valid against ``schema``; :class:`BadRequest` if unusable.

    ``root`` is the document ``schema`` is part of, which its ``$ref`` resolve in (by
    default ``schema`` itself).
    """
    try:
        return _Compiler(schema if root is None else root).node(schema, 0)
    except BadRequest:
        raise
    except (TypeError, ValueError, AttributeError) as exc:  # a keyword of the wrong type
        raise BadRequest(f"json_schema is unusable: {exc}") from exc


class _Compiler:
    def __init__(self, root: Any) -> None:
        self._root = root

    def node(self, schema: Any, depth: int) -> ValueGenerator:
        if depth > _MAX_DEPTH:
            raise BadRequest("json_schema nests too deep (a recursive $ref?)")
        if schema is True or schema == {}:
            return _string({})
        if not isinstance(schema, dict):
            raise BadRequest(f"json_schema: {schema!r} is not a schema")
        if "$ref" in schema:
            return self.node(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return _constant(schema["const"])
        if "enum" in schema:
            return _choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.node(_first_non_null(schema[key]), depth + 1)
        if "allOf" in schema:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged.update(part if isinstance(part, dict) else {})
            return self.node(merged, depth + 1)
        kind = _type_of(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        build = _LEAVES.get(kind)
        if build is None:
            raise BadRequest(f"json_schema: unknown type {kind!r}")
        return build(schema)

    def _resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise BadRequest(f"json_schema: only local $ref are supported, not {ref!r}")
        target = self._root
        for part in filter(None, ref[1:].split("/")):
            if not isinstance(target, dict) or part not in target:
                raise BadRequest(f"json_schema: $ref {ref!r} points nowhere")
            target = target[part]
        return target

    def _object(self, schema: dict[str, Any], depth: int) -> ValueGenerator:
        properties: Mapping[str, Any] = schema.get("properties") or {}
        names = list(properties)
        names += [name for name in schema.get("required", ()) if name not in properties]
        fields = tuple(
            (name, f"/{name}".encode(), self.node(properties.get(name, {}), depth + 1))
            for name in names
        )

        def generate(salt: bytes) -> dict[str, Any]:
            return {name: field(salt + segment) for name, segment, field in fields}

        return generate

    def _array(self, schema: dict[str, Any], depth: int) -> ValueGenerator:
        item = self.node(schema.get("items", {}), depth + 1)
        fewest = int(schema.get("minItems", min(1, schema.get("maxItems", 1))))
        most = int(schema.get("maxItems", max(fewest, 3)))
        if most < fewest:
            raise BadRequest("json_schema: maxItems is below minItems")
        span = most - fewest + 1

        def generate(salt: bytes) -> list[Any]:
            count = fewest + number(salt + b"#") % span
            return [item(salt + b"/%d" % i) for i in range(count)]

        return generate


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        return next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    return "array" if "items" in schema else "string"


def _first_non_null(alternatives: Any) -> Any:
    if not isinstance(alternatives, list) or not alternatives:
        raise BadRequest("json_schema: anyOf/oneOf needs a non-empty list")
    return next((a for a in alternatives if not _is_null(a)), alternatives[0])


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def _constant(value: Any) -> ValueGenerator:
    return lambda salt: value


def _choice(options: Any) -> ValueGenerator:
    if not isinstance(options, list) or not options:
        raise BadRequest("json_schema: enum needs a non-empty list")
    choices = tuple(options)
    return lambda salt: choices[number(salt) % len(choices)]


def _string(schema: dict[str, Any]) -> ValueGenerator:
    make = _FORMATS.get(schema.get("format", ""), _plain_words)
    shortest = int(schema.get("minLength", 0))
    longest = schema.get("maxLength")
    if longest is not None and int(longest) < shortest:
        raise BadRequest("json_schema: maxLength is below minLength")

    def generate(salt: bytes) -> str:
        text = make(salt)
        if len(text) < shortest:
            text = text.ljust(shortest, "x")
        return text if longest is None else text[: int(longest)]

    return generate


def _plain_words(salt: bytes) -> str:
    return words(salt, 1, 3)


def _date_time(salt: bytes) -> dt.datetime:
    return _EPOCH + dt.timedelta(seconds=number(salt) % (10 * 365 * 86400))


_FORMATS: dict[str, Callable[[bytes], str]] = {
    "date": lambda salt: _date_time(salt).date().isoformat(),
    "date-time": lambda salt: _date_time(salt).isoformat().replace("+00:00", "Z"),
    "email": lambda salt: f"{words(salt, 1, 1)}@example.com",
    "uuid": lambda salt: str(uuid.UUID(bytes=blake2b(salt, digest_size=16).digest())),
    "uri": lambda salt: f"https://example.com/{words(salt, 1, 1)}",
}


def _integer(schema: dict[str, Any]) -> ValueGenerator:
    low = _bound(schema, "minimum", "exclusiveMinimum", math.ceil, +1)
    high = _bound(schema, "maximum", "exclusiveMaximum", math.floor, -1)
    if low is None:
        low = 0 if high is None else high - _DEFAULT_INTEGER_SPAN
    if high is None:
        high = low + _DEFAULT_INTEGER_SPAN
    if high < low:
        raise BadRequest("json_schema: no integer fits the bounds")
    span = high - low + 1
    return lambda salt: low + number(salt) % span


def _bound(
    schema: dict[str, Any],
    inclusive: str,
    exclusive: str,
    rounding: Callable[[float], int],
    step: int,
) -> int | None:
    """The integer bound of ``schema`` on one side, from its inclusive or exclusive limit."""
    limits = []
    if _is_number(schema.get(inclusive)):
        limits.append(rounding(schema[inclusive]))
    if _is_number(schema.get(exclusive)):
        edge = schema[exclusive]
        limits.append(rounding(edge) + step if rounding(edge) == edge else rounding(edge))
    if not limits:
        return None
    return max(limits) if step > 0 else min(limits)


def _number(schema: dict[str, Any]) -> ValueGenerator:
    low = _limit(schema, "minimum", "exclusiveMinimum", max)
    high = _limit(schema, "maximum", "exclusiveMaximum", min)
    bottom = low[0] if low else (high[0] - 1.0 if high else 0.0)
    top = high[0] if high else bottom + 1.0
    if top < bottom or (top == bottom and ((low and low[1]) or (high and high[1]))):
        raise BadRequest("json_schema: no number fits the bounds")

    def fits(value: float) -> bool:
        above = value > bottom or (value == bottom and not (low and low[1]))
        return above and (value < top or (value == top and not (high and high[1])))

    def generate(salt: bytes) -> float:
        value = bottom + (top - bottom) * unit(salt)
        rounded = round(value, 4)
        return rounded if fits(rounded) else value

    return generate


def _limit(
    schema: dict[str, Any], inclusive: str, exclusive: str, tighter: Callable[..., Any]
) -> tuple[float, bool] | None:
    """The tighter of the inclusive and exclusive limits on one side, and whether it is
    exclusive."""
    limits = [
        (float(schema[key]), is_exclusive)
        for key, is_exclusive in ((inclusive, False), (exclusive, True))
        if _is_number(schema.get(key))
    ]
    if not limits:
        return None
    edge = tighter(value for value, _ in limits)
    return edge, any(value == edge and is_exclusive for value, is_exclusive in limits)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_LEAVES: dict[str, Callable[[dict[str, Any]], ValueGenerator]] = {
    "string": _string,
    "integer": _integer,
    "number": _number,
    "boolean": lambda schema: lambda salt: number(salt) & 1 == 1,
    "null": lambda schema: lambda salt: None,
}
