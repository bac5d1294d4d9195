"""Canonical JSON (RFC 8785, exactly extended) and the SHA-256 hashes the Landscape keys
payloads by.

For every value RFC 8785 covers — JSON whose numbers are doubles: ints within
±(2**53 - 1) and finite floats — :func:`canonical_json` gives exactly the bytes of
:func:`rfc8785.dumps`, so hashes of such values never change.  RFC 8785 knows only
doubles; two exact extensions cover the numbers it cannot hold:

- an ``int`` outside ±(2**53 - 1) is written with all its digits (Python's ``str``:
  an optional ``-`` and the decimal digits), never rounded to a double.  Ints of more
  than 4,300 digits, which Python will not turn into text, are refused.
- a :class:`~decimal.Decimal` is written with its exact value in the layout RFC 8785
  gives a double (ECMAScript's ``Number::toString``): its significant digits without
  trailing zeros, then a decimal point, padding zeros or an exponent as that rule
  places them — ``Decimal("1.50")`` is ``1.5``, ``Decimal("-0.00")`` is ``0``,
  ``Decimal("1E+21")`` is ``1e+21``, ``Decimal("0.00000012345678901234567890")`` is
  ``1.234567890123456789e-7``.  Equal Decimals give equal bytes, and a Decimal with
  the digits of a double's shortest form gives that double's bytes: one of at most 15
  significant digits hashes as it did when Decimals were turned into floats.  NaN and
  infinities are refused.

A value nested deeper than :data:`MAX_DEPTH` containers is refused with a
:class:`CanonicalizationError`, and no path recurses more than a bounded depth: the
exact encoder keeps its own stack.

The fast paths take orjson whenever its output provably equals the canonical bytes
(keys that sort the same in UTF-16 and code-point order, floats Python prints the way
ECMAScript does, ints within 64 bits, which orjson prints with all their digits), the
common case for rows and several times faster.  Values JSON cannot hold directly are
normalised first: ``date``/``datetime``/``time`` become ISO 8601 strings, tuples
lists, an ``Enum`` member its value, a ``UUID`` its text, and a ``str`` subclass key
its ``str()``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import uuid
from collections.abc import Iterator, Mapping
from decimal import Decimal
from enum import Enum
from typing import Any

import orjson

__all__ = [
    "MAX_DEPTH",
    "CanonicalizationError",
    "canonical_bytes",
    "canonical_hash",
    "canonical_json",
    "payload_forms",
    "sha256_hex",
]

MAX_DEPTH = 256
"""The deepest nesting of objects and arrays a canonical value may have."""

_MAX_SAFE_INT = 2**53 - 1
#: The ints orjson prints itself, with all their digits (as the extension writes them).
_ORJSON_INTS = range(-(2**63), 2**64)
#: How deep :func:`_normalise` recurses; a deeper value is left to the exact encoder,
#: which keeps its own stack (two Python frames per level stay far below the limit).
_NORMALISE_DEPTH = 32
_PLAIN = frozenset({str, bool, type(None)})
_SCALARS = _PLAIN | {int, float}
_NON_FLOAT_SCALARS = _PLAIN | {int}
_SMALLEST_FAST_FLOAT = 1e-5
# Python's repr writes a float without an exponent from 1e-4 up to 1e16.
_SMALLEST_PLAIN_REPR = 1e-4
_LARGEST_PLAIN_REPR = 1e16
# Once _normalise has vetted a value (ASCII keys, 64-bit ints, finite non-integral
# floats), orjson prints it exactly as the canonical form is written;
# tests/landscape/test_canonical.py checks this against the reference encoder on
# generated values.
_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS
# For a nested value, orjson must not print anything itself that _normalise would change:
# subclasses, dates and dataclasses go to ``default``, which refuses them.
_NESTED_OPTIONS = (
    _ORJSON_OPTIONS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
# What orjson prints unlike RFC 8785 shows in its output: an integral float (``2.0``,
# ``-0.0``), an exponent (``1e+16``, ``1e-7``).  A string that merely contains one of
# these only costs the exact path.  (NaN and infinity, which orjson writes as ``null``,
# are caught by reading the output back: see _scanned_bytes.)
_NESTED_HAZARDS = (b".0,", b".0}", b".0]", b"e+", b"e-")
# A 4-byte UTF-8 sequence: such characters sort differently by UTF-16 units (RFC 8785)
# than by code point (orjson).
_ASTRAL = re.compile(rb"[\xf0-\xf4]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# RFC 8785 (3.2.2.2) escapes these, and only these, in strings.
_ESCAPED = re.compile(r'[\x00-\x1f"\\]')
_ESCAPES = {chr(code): f"\\u{code:04x}" for code in range(0x20)} | {
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}


class CanonicalizationError(ValueError):
    """A value has no canonical JSON form (NaN, infinity, a lone surrogate, an
    unsupported type, a non-string key, nesting deeper than :data:`MAX_DEPTH`)."""


class _NeedsSlowPath(Exception):
    """Internal: the value holds something only the exact encoder handles."""


def _too_deep() -> CanonicalizationError:
    return CanonicalizationError(f"value is nested deeper than {MAX_DEPTH} levels")


# -- the fast path: orjson on a vetted copy ------------------------------------------------


def _normalise(value: Any, depth: int = 0) -> Any:
    """Return a JSON-ready copy of ``value`` the C encoder prints canonically.

    Numbers orjson cannot print canonically itself (ints beyond 64 bits, Decimals)
    become :class:`orjson.Fragment` of their canonical text.  Raises
    :class:`_NeedsSlowPath` when the fast encoder could differ from the canonical form,
    and for containers deeper than :data:`_NORMALISE_DEPTH`.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        return value if value in _ORJSON_INTS else orjson.Fragment(_int_text(value))
    if kind is float:
        return _normalise_float(value)
    if kind is dict:
        return _normalise_dict(value, depth)
    if isinstance(value, Mapping):
        return _normalise_dict(dict(value), depth)
    if isinstance(value, list | tuple):
        if depth >= _NORMALISE_DEPTH:
            raise _NeedsSlowPath
        return [_normalise(item, depth + 1) for item in value]
    return _normalise_other(value, depth)


def _normalise_dict(value: dict[Any, Any], depth: int) -> dict[str, Any]:
    """The hot path for rows: checks run in C where they can, and the dict is copied only
    when a value needs a different form."""
    if depth >= _NORMALISE_DEPTH:
        raise _NeedsSlowPath
    try:
        ascii_keys = "".join(value).isascii()
    except TypeError:
        bad = next(key for key in value if not isinstance(key, str))
        raise CanonicalizationError(f"object key {bad!r} is not a string") from None
    if not ascii_keys:
        raise _NeedsSlowPath
    kinds = set(map(type, value.values()))
    if kinds <= _PLAIN or (kinds <= _SCALARS and _scalars_print_canonically(value, kinds)):
        return value
    out: dict[str, Any] | None = None
    for key, item in value.items():
        kind = type(item)
        if kind in _PLAIN:
            continue
        normal = _normalise_float(item) if kind is float else _normalise(item, depth + 1)
        if normal is not item:
            if out is None:
                out = dict(value)
            out[key] = normal
    return value if out is None else out


def _scalars_print_canonically(value: dict[str, Any], kinds: set[type]) -> bool:
    """Whether orjson prints every number of ``value`` as the canonical form has it.

    orjson agrees with RFC 8785 on every finite float but the integral ones (``2.0``
    against ``2``) and those below 1e-5 (``8e-6`` against ``0.000008``), and prints
    every int within 64 bits with all its digits (a longer one it refuses, which sends
    the value to the exact encoder).
    """
    if float not in kinds:
        return True
    # One pass that stops at the first misfit: for a row's few floats (and still at
    # fifty) this is about three times faster than separate map()/filter() passes in C,
    # whose set-up costs more than the items.  NaN fails the range test, as infinity does.
    for item in value.values():
        if type(item) is float and (
            item.is_integer() or not _SMALLEST_FAST_FLOAT <= abs(item) < math.inf
        ):
            return False
    return True


def _normalise_float(value: float) -> float | int:
    if value != value or value in (float("inf"), float("-inf")):
        raise CanonicalizationError(f"{value!r} has no JSON representation")
    if value.is_integer():
        # Beyond 2**53 RFC 8785 prints a double's shortest digits padded with zeros
        # (2.0**60 is 1152921504606847000), which the int's own digits are not.
        if abs(value) <= _MAX_SAFE_INT:
            return int(value)
        raise _NeedsSlowPath
    if abs(value) >= _SMALLEST_FAST_FLOAT:
        return value
    raise _NeedsSlowPath


def _normalise_other(value: Any, depth: int) -> Any:
    # An Enum member is its value even when it is also a str or an int (as orjson and
    # json print it): str() of a ``(str, Enum)`` member is its qualified name.
    if isinstance(value, Enum):
        return _normalise(value.value, depth)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return _normalise(int(value), depth)
    if isinstance(value, float):
        return _normalise_float(float(value))
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return orjson.Fragment(_decimal_text(value))
    if isinstance(value, uuid.UUID):
        return str(value)
    raise CanonicalizationError(f"value of type {type(value).__name__} is not JSON-serialisable")


# -- the exact encoder -----------------------------------------------------------------


def _exact_bytes(value: Any) -> bytes:
    """The canonical bytes of ``value``, written by this module's own encoder.

    The reference for every value the fast paths cannot vouch for (astral keys, huge
    ints beside awkward floats, surrogates, deep nesting).  It keeps its own stack of
    open containers, so its Python recursion is nil whatever the nesting; a value
    nested deeper than :data:`MAX_DEPTH` raises :class:`CanonicalizationError`.
    """
    parts: list[str] = []
    # One iterator of ("separator and key", member) pairs per open container, with the
    # bracket that closes it; the root is a pseudo-container of one member.
    pending: list[Iterator[tuple[str, Any]]] = [iter((("", value),))]
    closers = [""]
    while pending:
        for prefix, member in pending[-1]:
            parts.append(prefix)
            opened = _opened(member)
            if isinstance(opened, str):
                parts.append(opened)
                continue
            if len(pending) > MAX_DEPTH:
                raise _too_deep()
            opening, members, closing = opened
            parts.append(opening)
            pending.append(members)
            closers.append(closing)
            break
        else:
            pending.pop()
            parts.append(closers.pop())
    return "".join(parts).encode("utf-8")


_Opened = tuple[str, Iterator[tuple[str, Any]], str]


def _opened(member: Any) -> str | _Opened:
    """A scalar's canonical text, or how a container opens: its bracket, its members
    (see :func:`_members`, :func:`_elements`) and the bracket that closes it."""
    kind = type(member)
    if kind is str:
        return _string_text(member)
    if kind is dict:
        return "{", _members(member), "}"
    if kind is list:
        return "[", _elements(member), "]"
    if kind in _SCALARS:
        return _scalar_text(member)
    item = _json_form(member)
    if isinstance(item, Mapping):
        return "{", _members(item), "}"
    if isinstance(item, list | tuple):
        return "[", _elements(item), "]"
    return _scalar_text(item)


def _json_form(value: Any) -> Any:
    """``value`` as one of the types the exact encoder writes: the JSON types, a
    ``Decimal``, a ``Mapping``, a list or a tuple (anything else is refused later)."""
    while True:
        kind = type(value)
        if kind in _SCALARS or kind is dict or kind is list:
            return value
        if isinstance(value, Enum):
            value = value.value
            continue
        if isinstance(value, Mapping | list | tuple | Decimal):
            return value
        if isinstance(value, str):
            return str.__str__(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, dt.date | dt.time):
            return value.isoformat()
        if isinstance(value, uuid.UUID):
            return str(value)
        return value


def _members(value: Mapping[Any, Any]) -> Iterator[tuple[str, Any]]:
    """An object's members as ``(separator, "key":)`` text and value, sorted by the
    UTF-16 code units of their keys (RFC 8785 3.2.3)."""
    named: dict[str, Any] = {}
    for key, member in value.items():
        if not isinstance(key, str):
            raise CanonicalizationError(f"object key {key!r} is not a string")
        named[str(key)] = member
    # _string_text refuses a lone surrogate first, so every key has a UTF-16 form.
    keyed = [(_string_text(key), key) for key in named]
    keyed.sort(key=lambda entry: entry[1].encode("utf-16-be"))
    for index, (text, key) in enumerate(keyed):
        yield f"{',' if index else ''}{text}:", named[key]


def _elements(value: list[Any] | tuple[Any, ...]) -> Iterator[tuple[str, Any]]:
    for index, element in enumerate(value):
        yield ("," if index else ""), element


def _scalar_text(value: Any) -> str:
    """The canonical text of a value that is not a container."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    kind = type(value)
    if kind is str:
        return _string_text(value)
    if kind is int:
        return _int_text(value)
    if kind is float:
        return _float_text(value)
    if isinstance(value, Decimal):
        return _decimal_text(value)
    raise CanonicalizationError(f"value of type {kind.__name__} is not JSON-serialisable")


def _check_unicode(text: str) -> None:
    """Refuse a string holding a lone surrogate: it has no UTF-8 (nor UTF-16) form."""
    if not text.isascii() and (found := _LONE_SURROGATE.search(text)) is not None:
        raise CanonicalizationError(
            f"a string holds a lone surrogate (U+{ord(found.group()):04X}), which has no UTF-8 form"
        )


def _string_text(text: str) -> str:
    _check_unicode(text)
    return f'"{_ESCAPED.sub(_escape, text)}"'


def _escape(match: re.Match[str]) -> str:
    return _ESCAPES[match.group()]


def _int_text(value: int) -> str:
    """All the digits of ``value`` (the extension beyond ±(2**53 - 1))."""
    try:
        return int.__repr__(value)
    except ValueError as exc:  # more digits than Python turns into text
        raise CanonicalizationError(f"integer too long to write: {exc}") from None


def _float_text(value: float) -> str:
    """RFC 8785's text of a double: its shortest round-trip digits (Python's ``repr``
    has the same ones) in ECMAScript's layout."""
    if not math.isfinite(value):
        raise CanonicalizationError(f"{value!r} has no JSON representation")
    if value.is_integer():
        if abs(value) <= _MAX_SAFE_INT:
            return int.__repr__(int(value))  # -0.0 too
    elif _SMALLEST_PLAIN_REPR <= abs(value) < _LARGEST_PLAIN_REPR:
        return float.__repr__(value)  # no exponent in it: ECMAScript's text
    return _decimal_text(Decimal(repr(value)))


def _decimal_text(value: Decimal) -> str:
    """The exact value of ``value`` in the layout RFC 8785 gives a double."""
    if not value.is_finite():
        raise CanonicalizationError(f"{value!r} has no JSON representation")
    sign, digit_tuple, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    written = "".join(map(str, digit_tuple))
    digits = written.rstrip("0")
    if not digits:
        return "0"  # -0 too: RFC 8785 writes a negative zero as 0
    point = len(digits) + exponent + len(written) - len(digits)
    return ("-" if sign else "") + _ecmascript_layout(digits, point)


def _ecmascript_layout(digits: str, point: int) -> str:
    """ECMA-262 ``Number::toString`` for the number ``0.digits * 10**point``.

    ``digits`` has no leading or trailing zeros (``k`` of them); ``point`` is the
    position of the decimal point relative to their start (``n`` in the standard).
    """
    count = len(digits)
    if count <= point <= 21:
        return digits + "0" * (point - count)
    if 0 < point <= 21:
        return f"{digits[:point]}.{digits[point:]}"
    if -6 < point <= 0:
        return f"0.{'0' * -point}{digits}"
    exponent = point - 1
    mantissa = digits if count == 1 else f"{digits[0]}.{digits[1:]}"
    return f"{mantissa}e{'+' if exponent >= 0 else '-'}{abs(exponent)}"


# -- entry points -----------------------------------------------------------------------


def canonical_bytes(value: Any) -> bytes:
    """The canonical JSON of ``value`` (RFC 8785, with the exact extensions for long ints
    and Decimals), UTF-8 encoded.

    Raises :class:`CanonicalizationError` for values JSON cannot represent exactly.
    """
    return payload_forms(value)[0]


def _exact_canonical_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(_normalise(value), option=_ORJSON_OPTIONS)
    except _NeedsSlowPath:
        pass
    except orjson.JSONEncodeError:
        # A key of a str subclass (an enum member), a lone surrogate: the exact encoder
        # writes the one and names the other.
        pass
    return _exact_bytes(value)


def _scanned_bytes(value: dict[Any, Any] | list[Any]) -> bytes | None:
    """orjson's output for a nested value when it shows none of the :data:`_NESTED_HAZARDS`,
    else ``None``: a request or an answer then costs one pass in C instead of a walk of
    every level in Python."""
    try:
        out = orjson.dumps(value, default=_refuse, option=_NESTED_OPTIONS)
    except orjson.JSONEncodeError:
        return None
    for hazard in _NESTED_HAZARDS:
        if hazard in out:
            return None
    if not out.isascii() and _ASTRAL.search(out) is not None:
        return None
    # orjson prints NaN and infinities as null, like None.  Answers carry nulls (OpenAI's
    # "logprobs": null), so rather than send them all the slow way, read the output back:
    # it equals the value unless a null stood for a number.
    if b"null" in out and orjson.loads(out) != value:
        return None
    return out


def _refuse(value: Any) -> Any:
    raise TypeError(type(value).__name__)


def _flat_row_forms(row: dict[Any, Any]) -> tuple[bytes, bytes] | None:
    """:func:`payload_forms` of a flat row of plain values, or ``None`` to take the
    general path.

    The hot path for rows: orjson's output is used when it provably is the canonical
    form — ASCII keys, ints within 64 bits, and floats orjson prints as RFC 8785 does
    (see :func:`_scalars_print_canonically`).  Integral floats, common in real data
    (``100.0``), are printed as ints for the canonical form here too, so such a row
    does not fall to the general path.
    """
    # One pass over the values: are they plain scalars, and do the floats print as
    # RFC 8785's (see _scalars_print_canonically, which checks the same per float)?
    floats_print_canonically = True
    for value in row.values():
        kind = type(value)
        if kind is float:
            if value.is_integer() or not _SMALLEST_FAST_FLOAT <= abs(value) < math.inf:
                floats_print_canonically = False
        elif kind not in _NON_FLOAT_SCALARS:
            return None
    try:
        stored = orjson.dumps(row, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:  # a key that is not a str, an int beyond 64 bits
        return None
    # ASCII output has ASCII keys, which sort alike by UTF-16 unit and by code point;
    # only output with other characters needs its keys looked at.
    if not stored.isascii() and not "".join(row).isascii():
        return None
    if floats_print_canonically:
        return stored, stored
    try:
        canonical_row = {k: _normalise_float(v) if type(v) is float else v for k, v in row.items()}
        return orjson.dumps(canonical_row, option=_ORJSON_OPTIONS), stored
    except (_NeedsSlowPath, CanonicalizationError, orjson.JSONEncodeError):
        return None


def payload_forms(value: Any) -> tuple[bytes, bytes]:
    """``(canonical, stored)``: the canonical bytes that ``value`` is hashed by, and the
    JSON stored under that hash.

    They are the same bytes unless canonicalisation changed a value's type: RFC 8785
    prints ``2.0`` as ``2``, so a row read back from its canonical form would carry an
    ``int`` where it had a ``float``.  Then the stored JSON is orjson's, which keeps
    the ``.0`` (and canonicalises to the same bytes, so the hash still names it).  Ints
    are stored with all their digits either way; a Decimal is stored as its canonical
    text (read it with ``parse_float=Decimal`` to have it back exactly).
    """
    kind = type(value)
    # A row or a nested value orjson prints canonically takes one pass in C; anything
    # else (or anything these cannot prove canonical) the exact path decides.
    if kind is dict:
        forms = _flat_row_forms(value)
        if forms is not None:
            return forms
    if kind is dict or kind is list:
        scanned = _scanned_bytes(value)
        if scanned is not None:
            return scanned, scanned
    canonical = _exact_canonical_bytes(value)
    try:
        stored = orjson.dumps(value, option=_ORJSON_OPTIONS)
    except (orjson.JSONEncodeError, TypeError):  # a Decimal, a long int: keep the canonical
        return canonical, canonical
    return canonical, stored


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value`` (see :func:`canonical_bytes`)."""
    return canonical_bytes(value).decode("utf-8")


def sha256_hex(text: str | bytes) -> str:
    """SHA-256 of ``text`` (UTF-8 encoded when a string) as lowercase hex."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def canonical_hash(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value``."""
    return sha256_hex(canonical_json(value))
