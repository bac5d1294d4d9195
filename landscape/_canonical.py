"""Canonical JSON (RFC 8785) and the SHA-256 hashes the Landscape keys payloads by.

`canonical_json` gives exactly the bytes of :func:`rfc8785.dumps` for the same value, but
takes orjson whenever its output is provably identical (keys that sort
the same in UTF-16 and code-point order, floats Python prints the way ECMAScript does),
which is the common case for rows and several times faster.  Values JSON cannot hold
directly are normalised first: ``date``/``datetime``/``time`` become ISO 8601 strings,
``Decimal`` a float, tuples lists, an ``Enum`` member its value and a ``UUID`` its text.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import uuid
from collections.abc import Mapping
from decimal import Decimal
from enum import Enum
from typing import Any

import orjson
import rfc8785

__all__ = [
    "CanonicalizationError",
    "canonical_bytes",
    "canonical_hash",
    "canonical_json",
    "payload_forms",
    "sha256_hex",
]

_MAX_SAFE_INT = 2**53 - 1
_PLAIN = frozenset({str, bool, type(None)})
_SCALARS = _PLAIN | {int, float}
_NON_FLOAT_SCALARS = _PLAIN | {int}
_SMALLEST_FAST_FLOAT = 1e-5
# Once _normalise has vetted a value (ASCII keys, safe ints, finite non-integral floats),
# orjson prints it exactly as RFC 8785 does; tests/landscape/test_canonical.py checks this
# against the reference encoder on generated values.
_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
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


class CanonicalizationError(ValueError):
    """A value has no canonical JSON form (NaN, infinity, unsupported type, huge int)."""


class _NeedsSlowPath(Exception):
    """Internal: the value holds something only the reference encoder handles."""


def _normalise(value: Any) -> Any:
    """Return a JSON-ready copy of ``value`` the C encoder prints canonically.

    Raises :class:`_NeedsSlowPath` when the fast encoder could differ from RFC 8785.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return value
        raise CanonicalizationError(f"integer {value} is outside the JSON safe range")
    if kind is float:
        return _normalise_float(value)
    if kind is dict:
        return _normalise_dict(value)
    if isinstance(value, Mapping):
        return _normalise_dict(dict(value))
    if isinstance(value, list | tuple):
        return [_normalise(item) for item in value]
    return _normalise_other(value)


def _normalise_dict(value: dict[Any, Any]) -> dict[str, Any]:
    """The hot path for rows: checks run in C where they can, and the dict is copied only
    when a value needs a different form."""
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
        normal = _normalise_float(item) if kind is float else _normalise(item)
        if normal is not item:
            if out is None:
                out = dict(value)
            out[key] = normal
    return value if out is None else out


def _scalars_print_canonically(value: dict[str, Any], kinds: set[type]) -> bool:
    """Whether orjson prints every float of ``value`` as RFC 8785 does.

    orjson agrees with RFC 8785 on every finite float but the integral ones (``2.0``
    against ``2``) and those below 1e-5 (``8e-6`` against ``0.000008``); ints beyond
    2**53 it refuses itself (``OPT_STRICT_INTEGER``).
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
        if abs(value) <= _MAX_SAFE_INT:
            return int(value)
        raise _NeedsSlowPath
    if abs(value) >= _SMALLEST_FAST_FLOAT:
        return value
    raise _NeedsSlowPath


def _normalise_other(value: Any) -> Any:
    # An Enum member is its value even when it is also a str or an int (as orjson and
    # json print it): str() of a ``(str, Enum)`` member is its qualified name.
    if isinstance(value, Enum):
        return _normalise(value.value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return _normalise(int(value))
    if isinstance(value, float):
        return _normalise_float(float(value))
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return _normalise_float(float(value))
    if isinstance(value, uuid.UUID):
        return str(value)
    raise CanonicalizationError(f"value of type {type(value).__name__} is not JSON-serialisable")


def _plain(value: Any) -> Any:
    """Like :func:`_normalise` but never refuses: input for the reference encoder."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def canonical_bytes(value: Any) -> bytes:
    """The RFC 8785 canonical JSON of ``value``, UTF-8 encoded.

    Raises :class:`CanonicalizationError` for values JSON cannot represent exactly.
    """
    return payload_forms(value)[0]


def _exact_canonical_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(_normalise(value), option=_ORJSON_OPTIONS)
    except _NeedsSlowPath:
        pass
    except orjson.JSONEncodeError as exc:
        # A key of a str subclass (an enum member) is the one refusal the slow path mends.
        if "Dict key must be str" not in str(exc):
            raise CanonicalizationError(str(exc)) from exc
    try:
        return bytes(rfc8785.dumps(_plain(value)))
    except rfc8785.CanonicalizationError as exc:
        raise CanonicalizationError(str(exc)) from exc


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

    The hot path for rows: orjson's output is used when it provably is RFC 8785's —
    ASCII keys, and floats orjson prints as RFC 8785 does (see
    :func:`_scalars_print_canonically`).  Integral floats, common in real data
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
    """``(canonical, stored)``: the RFC 8785 bytes that ``value`` is hashed by, and the
    JSON stored under that hash.

    They are the same bytes unless canonicalisation changed a value's type: RFC 8785
    prints ``2.0`` as ``2``, so a row read back from its canonical form would carry an
    ``int`` where it had a ``float``.  Then the stored JSON is orjson's, which keeps
    the ``.0`` (and canonicalises to the same bytes, so the hash still names it).
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
    except (orjson.JSONEncodeError, TypeError):  # e.g. a Decimal: keep the canonical form
        return canonical, canonical
    return canonical, stored


def canonical_json(value: Any) -> str:
    """The RFC 8785 canonical JSON text of ``value`` (see :func:`canonical_bytes`)."""
    return canonical_bytes(value).decode("utf-8")


def sha256_hex(text: str | bytes) -> str:
    """SHA-256 of ``text`` (UTF-8 encoded when a string) as lowercase hex."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def canonical_hash(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value``."""
    return sha256_hex(canonical_json(value))
