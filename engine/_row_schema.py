"""Source schema validation: check a row's fields and coerce them to their declared types.

A :class:`RowSchema` is compiled once from the source's ``schema`` config into one
coercion function per field, then :meth:`RowSchema.validate` runs on every row, so the
per-row work is a dict walk and one call per listed field.

Coercion accepts what CSV (strings) and JSON (numbers, booleans, strings) produce:

======== ===============================================================================
type     accepts
======== ===============================================================================
int      ints, integral floats (``42.0``), decimal strings (``"42"``, ``" -7 "``)
float    ints, finite floats, decimal strings (``"4.2"``, ``"1e3"``); never NaN or infinity
bool     bools, ``0``/``1``, ``true/false/yes/no/1/0`` in any case
str      strings (kept as they are), ints and finite floats (turned into their text)
date     ``date`` objects, ``YYYY-MM-DD`` strings
datetime ``datetime`` objects, ISO 8601 strings
======== ===============================================================================

``None`` and bools are rejected where they are not listed; an empty (or blank) string is
rejected for every type except ``str``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import Any, Literal, get_args

__all__ = ["RowSchema", "RowValidationError", "SchemaMode"]

SchemaMode = Literal["strict", "dynamic"]
Coercer = Callable[[Any], Any]


class RowValidationError(ValueError):
    """A row does not match its source schema; the message names every bad field."""


class _Rejected(Exception):
    """One value could not be coerced; ``str(exc)`` says why, without the field name."""


_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_BOOL_TEXT = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_MAX_SHOWN = 60


def _show(value: Any) -> str:
    """``repr(value)``, shortened so one huge value cannot flood an error message."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else f"{text[: _MAX_SHOWN - 3]}..."


def _not_a(value: Any, type_name: str) -> _Rejected:
    return _Rejected(f"{_show(value)} is not {type_name}")


def _text(value: str, type_name: str) -> str:
    """``value`` without surrounding blanks; rejects an empty or blank string."""
    text = value.strip()
    if not text:
        raise _Rejected(f"value is empty (expected {type_name})")
    return text


def _reject_other(value: Any, type_name: str) -> _Rejected:
    """The rejection for a value of a type the coercer does not take at all."""
    if value is None:
        return _Rejected(f"value is null (expected {type_name})")
    return _not_a(value, type_name)


def _to_int(value: Any) -> int:
    """An int from an int, an integral finite float or a decimal string."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(text := _text(value, "an int")):
        try:
            return int(text)
        except ValueError as exc:  # more digits than Python converts
            raise _not_a(value, "an int") from exc
    raise _reject_other(value, "an int")


def _finite(number: float, original: Any) -> float:
    if not math.isfinite(number):
        raise _Rejected(f"{_show(original)} is not a finite float")
    return number


def _to_float(value: Any) -> float:
    """A finite float from an int, a float or a decimal string."""
    if type(value) is float:
        return _finite(value, value)
    if type(value) is int:
        try:
            return float(value)
        except OverflowError as exc:
            raise _Rejected(f"{_show(value)} is too large for a float") from exc
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(text := _text(value, "a float")):
        return _finite(float(text), value)
    raise _reject_other(value, "a float")


def _to_bool(value: Any) -> bool:
    """A bool from a bool, ``0``/``1`` or one of true/false/yes/no/1/0 (any case)."""
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return value == 1
    if isinstance(value, str):
        found = _BOOL_TEXT.get(_text(value, "a bool").lower())
        if found is not None:
            return found
    raise _reject_other(value, "a bool")


def _to_str(value: Any) -> str:
    """The string itself, or the text of an int or a finite float."""
    if isinstance(value, str):
        return value
    if type(value) is int:
        return str(value)
    if type(value) is float:
        return repr(_finite(value, value))
    raise _reject_other(value, "a str")


def _to_date(value: Any) -> date:
    """A date from a date (not a datetime) or a ``YYYY-MM-DD`` string."""
    if type(value) is date:
        return value
    if isinstance(value, str) and _DATE_TEXT.fullmatch(text := _text(value, "a date")):
        try:
            return date.fromisoformat(text)
        except ValueError as exc:
            raise _Rejected(f"{_show(value)} is not a valid date: {exc}") from exc
    raise _reject_other(value, "a date (YYYY-MM-DD)")


def _to_datetime(value: Any) -> datetime:
    """A datetime from a datetime or an ISO 8601 string."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(_text(value, "a datetime"))
        except ValueError as exc:
            raise _not_a(value, "an ISO 8601 datetime") from exc
    raise _reject_other(value, "an ISO 8601 datetime")


_COERCERS: dict[str, Coercer] = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "str": _to_str,
    "date": _to_date,
    "datetime": _to_datetime,
}


class RowSchema:
    """A compiled source schema.

    ``strict``: a row must have exactly the listed fields, each coerced to its type; the
    result has them in the listed order.  ``dynamic``: a row may have any fields; the
    listed ones must be present and are coerced; the row's field order is kept.
    """

    __slots__ = ("_names", "_plan", "fields", "mode")

    def __init__(self, mode: SchemaMode, fields: Mapping[str, str]) -> None:
        if mode not in get_args(SchemaMode):
            raise ValueError(f"unknown schema mode {mode!r}: expected 'strict' or 'dynamic'")
        self.mode: SchemaMode = mode
        self.fields: Mapping[str, str] = dict(fields)
        self._plan: tuple[tuple[str, Coercer], ...] = tuple(
            (name, _coercer_for(name, type_name)) for name, type_name in fields.items()
        )
        self._names = frozenset(self.fields)

    @classmethod
    def from_config(cls, mode: SchemaMode, fields: Mapping[str, str]) -> RowSchema:
        """Compile a schema; an unknown mode or type name raises :class:`ValueError`."""
        return cls(mode, fields)

    def __repr__(self) -> str:
        return f"RowSchema(mode={self.mode!r}, fields={dict(self.fields)!r})"

    def validate(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A new dict with the listed fields coerced; ``row`` itself is never changed.

        Raises :class:`RowValidationError` naming every missing, unexpected or
        uncoercible field of the row.
        """
        out: dict[str, Any] = {} if self.mode == "strict" else dict(row)
        errors: list[str] = []
        present = 0
        for name, coerce in self._plan:
            if name not in row:
                errors.append(f"missing field {name!r}")
                continue
            present += 1
            try:
                out[name] = coerce(row[name])
            except _Rejected as exc:
                errors.append(f"field {name!r}: {exc}")
        if self.mode == "strict" and len(row) > present:
            errors.extend(f"unexpected field {name!r}" for name in row if name not in self._names)
        if errors:
            raise RowValidationError("; ".join(errors))
        return out


def _coercer_for(field: str, type_name: str) -> Coercer:
    try:
        return _COERCERS[type_name]
    except KeyError:
        known = ", ".join(_COERCERS)
        raise ValueError(
            f"field {field!r}: unknown type {type_name!r} (known types: {known})"
        ) from None
