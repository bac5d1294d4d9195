"""Strict structured outputs: the part of JSON Schema a provider accepts with
``"strict": true``, a checker for it, and the strict form of a user's schema.

OpenAI, Azure OpenAI (the same subset as OpenAI) and OpenRouter (which hands the schema
to the model's provider) refuse a strict schema, with a 400, unless:

* the root is an object schema, not an ``anyOf``;
* every object schema has ``additionalProperties: false`` and lists every one of its
  ``properties`` in ``required`` (a value that may be absent is a union with null:
  ``{"type": ["string", "null"]}``), and requires nothing it does not describe;
* every array schema has ``items``;
* a schema uses only the keywords in :data:`STRICT_KEYWORDS`; ``format`` is one of
  :data:`STRICT_FORMATS`; ``$defs`` (or ``definitions``) sit at the root and ``$ref``
  points into them, alone in its schema;
* ``type`` names JSON types only.

Size limits (OpenAI: 5,000 properties and 10 levels of nesting; Azure: 100 properties
and 5 levels; enum values and name lengths) are the provider's to enforce: its refusal
is the call's error.

:func:`strict_problems` lists where a schema breaks these rules; :func:`strict_schema`
turns a user's schema into the one sent (see there), or refuses it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LOCAL_ONLY_KEYWORDS",
    "STRICT_FORMATS",
    "STRICT_KEYWORDS",
    "strict_problems",
    "strict_schema",
]

#: The keywords a strict schema may use.
STRICT_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "enum",
        "const", "anyOf", "$ref", "$defs", "definitions", "description", "title",
        "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
    }
)  # fmt: skip

#: The ``format`` values a strict schema may name.
STRICT_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
)

#: Keywords that only narrow the values a schema accepts, or only annotate it: the
#: sent schema leaves them out, and the answer is still validated against them locally.
LOCAL_ONLY_KEYWORDS = frozenset(
    {
        "minLength", "maxLength", "uniqueItems", "minProperties", "maxProperties",
        "contains", "minContains", "maxContains", "default", "examples", "$comment",
        "$schema", "$id", "deprecated", "readOnly", "writeOnly", "contentEncoding",
        "contentMediaType",
    }
)  # fmt: skip

_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_DEFS = ("$defs", "definitions")
_HINTS = {
    "oneOf": "use anyOf",
    "allOf": "write the merged schema out",
    "patternProperties": "name the properties",
}


def strict_problems(schema: Any) -> list[str]:
    """Where ``schema`` breaks the strict rules (see the module), one message each,
    as ``/json/pointer: what is wrong``; empty when a provider accepts it."""
    problems: list[str] = []
    if not isinstance(schema, dict):
        return ["(root): a schema must be an object"]
    if "anyOf" in schema:
        problems.append("(root): the root cannot be an anyOf")
    if not _is_object(schema):
        problems.append('(root): the root must be an object schema ("type": "object")')
    for key in _DEFS:
        definitions = schema.get(key, {})
        if not isinstance(definitions, dict):
            problems.append(f"/{key}: must map names to schemas")
            continue
        for name, sub in definitions.items():
            _check(sub, f"/{key}/{name}", schema, problems)
    _check(schema, "", schema, problems, root=True)
    return problems


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` as it is sent with ``"strict": true``: every object schema that does
    not say otherwise gets ``additionalProperties: false``, and the
    :data:`LOCAL_ONLY_KEYWORDS` (and ``format`` values a provider does not know) are
    left out — the answer is validated against ``schema`` itself, so they still hold.

    Raises ``ValueError`` naming what cannot be made strict (an optional property, a
    keyword such as ``oneOf``, a root that is not an object).
    """
    sent: dict[str, Any] = _strict_copy(schema)
    problems = strict_problems(sent)
    if problems:
        raise ValueError(
            "json_schema cannot be sent as a strict structured output: " + "; ".join(problems)
        )
    return sent


# -- checking ------------------------------------------------------------------------------


def _check(
    schema: Any, where: str, document: dict[str, Any], problems: list[str], *, root: bool = False
) -> None:
    """Add to ``problems`` where ``schema``, at ``where`` in ``document``, breaks a rule."""
    here = where or "(root)"
    if not isinstance(schema, dict):
        problems.append(f"{here}: a schema must be an object (not {schema!r})")
        return
    for key in schema:
        if key not in STRICT_KEYWORDS:
            hint = _HINTS.get(key)
            problems.append(
                f"{here}: keyword {key!r} is not supported" + (f" ({hint})" if hint else "")
            )
    if "$ref" in schema:
        _check_ref(schema, here, document, problems)
        return
    if not root and any(key in schema for key in _DEFS):
        problems.append(f"{here}: $defs belong at the root")
    if not any(key in schema for key in ("type", "enum", "const", "anyOf", *_HINTS)):
        problems.append(f"{here}: a schema needs a type (or enum, const, anyOf)")
    _check_type(schema.get("type"), here, problems)
    fmt = schema.get("format")
    if fmt is not None and not _known_format(fmt):
        problems.append(f"{here}: format {fmt!r} is not supported")
    if _is_object(schema):
        _check_object(schema, where, document, problems)
    if _is_array(schema):
        if "items" not in schema:
            problems.append(f"{here}: an array schema needs items")
        else:
            _check(schema["items"], f"{where}/items", document, problems)
    alternatives = schema.get("anyOf")
    if alternatives is not None:
        if not isinstance(alternatives, list) or not alternatives:
            problems.append(f"{here}: anyOf must be a non-empty list")
        else:
            for i, sub in enumerate(alternatives):
                _check(sub, f"{where}/anyOf/{i}", document, problems)


def _check_object(
    schema: dict[str, Any], where: str, document: dict[str, Any], problems: list[str]
) -> None:
    """An object schema is closed, requires exactly its properties, and they are strict."""
    here = where or "(root)"
    if schema.get("additionalProperties") is not False:
        problems.append(f"{here}: an object schema needs additionalProperties: false")
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(properties, dict) or not isinstance(required, list):
        problems.append(f"{here}: properties must be an object and required a list")
        return
    for name in properties:
        if name not in required:
            problems.append(
                f"{here}: property {name!r} is not in required "
                '(make it required and nullable, e.g. "type": ["string", "null"])'
            )
    for name in required:
        if not isinstance(name, str) or name not in properties:
            problems.append(f"{here}: required {name!r} is not among the properties")
    for name, sub in properties.items():
        _check(sub, f"{where}/properties/{name}", document, problems)


def _check_ref(
    schema: dict[str, Any], here: str, document: dict[str, Any], problems: list[str]
) -> None:
    """A ``$ref`` stands alone and points at a definition of the root."""
    ref = schema["$ref"]
    if len(schema) > 1:
        others = ", ".join(sorted(k for k in schema if k != "$ref"))
        problems.append(f"{here}: $ref cannot have sibling keywords ({others})")
    parts = ref.split("/") if isinstance(ref, str) else []
    if len(parts) != 3 or parts[0] != "#" or parts[1] not in _DEFS:
        problems.append(f"{here}: $ref {ref!r} must point into the root's $defs")
    elif not isinstance(document.get(parts[1]), dict) or parts[2] not in document[parts[1]]:
        problems.append(f"{here}: $ref {ref!r} points nowhere")


def _check_type(kind: Any, here: str, problems: list[str]) -> None:
    """``type`` (one name or a list) names JSON types only."""
    kinds = kind if isinstance(kind, list) else [kind]
    for name in kinds:
        if name is not None and not (isinstance(name, str) and name in _TYPES):
            problems.append(f"{here}: type {name!r} is not a JSON type")


def _types(schema: dict[str, Any]) -> set[str]:
    """The type names ``schema`` gives (none when it gives none)."""
    kind = schema.get("type")
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    return {kind} if isinstance(kind, str) else set()


def _is_object(schema: dict[str, Any]) -> bool:
    """Whether ``schema`` describes objects (by its type, or by describing properties)."""
    return "object" in _types(schema) or "properties" in schema or "additionalProperties" in schema


def _is_array(schema: dict[str, Any]) -> bool:
    """Whether ``schema`` describes arrays (by its type, or by describing items)."""
    return "array" in _types(schema) or "items" in schema


def _known_format(value: Any) -> bool:
    """Whether ``value`` is a ``format`` a strict schema may name."""
    return isinstance(value, str) and value in STRICT_FORMATS


# -- making a schema strict ----------------------------------------------------------------


def _strict_copy(schema: Any) -> Any:
    """``schema`` (a subschema, recursively) without local-only keywords, its object
    schemas closed unless they say otherwise; anything not a schema is kept as is."""
    if not isinstance(schema, dict):
        return schema
    sent: dict[str, Any] = {}
    for key, value in schema.items():
        if key in LOCAL_ONLY_KEYWORDS or (key == "format" and not _known_format(value)):
            continue
        if key in ("properties", *_DEFS) and isinstance(value, dict):
            sent[key] = {name: _strict_copy(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            sent[key] = _strict_copy(value)
        elif key == "anyOf" and isinstance(value, list):
            sent[key] = [_strict_copy(sub) for sub in value]
        else:
            sent[key] = value
    if not any(key in sent for key in ("$ref", "type", "enum", "const", "anyOf")):
        if _is_object(sent):
            sent["type"] = "object"
        elif "items" in sent:
            sent["type"] = "array"
    if "$ref" not in sent and _is_object(sent) and "additionalProperties" not in sent:
        sent["additionalProperties"] = False
    return sent
