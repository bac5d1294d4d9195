"""Source schema validation: field checks per mode and coercion per type."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine._row_schema import RowSchema, RowValidationError


def coerce(type_name: str, value: Any) -> Any:
    return RowSchema.from_config("dynamic", {"v": type_name}).validate({"v": value})["v"]


def rejection(type_name: str, value: Any) -> str:
    with pytest.raises(RowValidationError) as caught:
        coerce(type_name, value)
    return str(caught.value)


# -- modes --------------------------------------------------------------------------------


def test_strict_returns_listed_fields_coerced_in_schema_order() -> None:
    schema = RowSchema.from_config("strict", {"id": "int", "name": "str"})
    row = {"name": "a", "id": "7"}
    assert list(schema.validate(row).items()) == [("id", 7), ("name", "a")]


def test_strict_rejects_extra_and_missing_fields_naming_each() -> None:
    schema = RowSchema.from_config("strict", {"id": "int", "amount": "float"})
    with pytest.raises(RowValidationError) as caught:
        schema.validate({"amount": "abc", "x": 1, "y": 2})
    message = str(caught.value)
    assert "missing field 'id'" in message
    assert "field 'amount': 'abc' is not a float" in message
    assert "unexpected field 'x'" in message
    assert "unexpected field 'y'" in message


def test_strict_with_a_bad_value_and_no_extra_field_reports_only_the_value() -> None:
    schema = RowSchema.from_config("strict", {"id": "int"})
    with pytest.raises(RowValidationError, match=r"^field 'id': 'x' is not an int$"):
        schema.validate({"id": "x"})


def test_dynamic_keeps_unlisted_fields_and_row_order() -> None:
    schema = RowSchema.from_config("dynamic", {"id": "int"})
    assert list(schema.validate({"a": "x", "id": "1", "b": None}).items()) == [
        ("a", "x"),
        ("id", 1),
        ("b", None),
    ]


def test_dynamic_rejects_a_missing_listed_field() -> None:
    schema = RowSchema.from_config("dynamic", {"id": "int"})
    with pytest.raises(RowValidationError, match="missing field 'id'"):
        schema.validate({"other": 1})


def test_validate_returns_a_new_dict_and_leaves_the_row_alone() -> None:
    schema = RowSchema.from_config("dynamic", {"id": "int"})
    row = {"id": "1"}
    out = schema.validate(row)
    assert out is not row
    assert row == {"id": "1"}


def test_row_validation_error_is_a_value_error() -> None:
    assert issubclass(RowValidationError, ValueError)


def test_unknown_type_name_is_a_value_error_naming_field_and_known_types() -> None:
    with pytest.raises(ValueError, match=r"field 'x': unknown type 'integer'.*int, float"):
        RowSchema.from_config("strict", {"x": "integer"})


def test_unknown_mode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown schema mode 'loose'"):
        RowSchema.from_config("loose", {})  # type: ignore[arg-type]


# -- coercion -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("42", 42), (" 42 ", 42), ("-7", -7), ("+3", 3), (42, 42), (42.0, 42), (-0.0, 0)],
)
def test_int_accepts(value: Any, expected: int) -> None:
    result = coerce("int", value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize("value", ["4.2", "1e3", "1_000", "abc", 4.2, True, [1], "٤٢", math.inf])
def test_int_rejects(value: Any) -> None:
    assert "is not an int" in rejection("int", value)


@pytest.mark.parametrize(
    ("value", "expected"), [("4.2", 4.2), (4, 4.0), ("1e3", 1000.0), (" .5 ", 0.5), (2.5, 2.5)]
)
def test_float_accepts(value: Any, expected: float) -> None:
    result = coerce("float", value)
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "abc", True, "1,5"])
def test_float_rejects(value: Any) -> None:
    assert "is not a float" in rejection("float", value)


@pytest.mark.parametrize("value", [math.nan, math.inf, "1e999"])
def test_float_rejects_non_finite_values(value: Any) -> None:
    assert "is not a finite float" in rejection("float", value)


def test_float_rejects_an_int_too_large_for_a_float() -> None:
    assert "too large" in rejection("float", 10**400)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("FALSE", False),
        ("Yes", True),
        ("no", False),
        ("1", True),
        (" 0 ", False),
        (True, True),
        (False, False),
        (1, True),
        (0, False),
    ],
)
def test_bool_accepts(value: Any, expected: bool) -> None:
    assert coerce("bool", value) is expected


@pytest.mark.parametrize("value", ["y", "on", 2, 1.0, "maybe"])
def test_bool_rejects(value: Any) -> None:
    assert "is not a bool" in rejection("bool", value)


@pytest.mark.parametrize(
    ("value", "expected"), [("abc", "abc"), ("", ""), (" x ", " x "), (42, "42"), (4.5, "4.5")]
)
def test_str_accepts(value: Any, expected: str) -> None:
    assert coerce("str", value) == expected


@pytest.mark.parametrize("value", [True, [1], {"a": 1}, math.nan])
def test_str_rejects(value: Any) -> None:
    message = rejection("str", value)
    assert "is not a str" in message or "is not a finite float" in message


def test_date_accepts_iso_strings_and_dates() -> None:
    assert coerce("date", "2024-02-29") == date(2024, 2, 29)
    assert coerce("date", date(2024, 1, 1)) == date(2024, 1, 1)


@pytest.mark.parametrize("value", ["2024-02-30", "20240101", "2024-W01-1", "01/02/2024", 20240101])
def test_date_rejects(value: Any) -> None:
    assert "date" in rejection("date", value)


def test_date_rejects_a_datetime() -> None:
    assert "is not a date" in rejection("date", datetime(2024, 1, 1))


def test_datetime_accepts_iso_8601() -> None:
    assert coerce("datetime", "2024-01-02T03:04:05") == datetime(2024, 1, 2, 3, 4, 5)
    assert coerce("datetime", "2024-01-02T03:04:05Z") == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    offset = timezone(timedelta(hours=2))
    expected = datetime(2024, 1, 2, 3, 4, tzinfo=offset)
    assert coerce("datetime", "2024-01-02 03:04+02:00") == expected
    assert coerce("datetime", expected) is expected


@pytest.mark.parametrize("value", ["yesterday", "2024-13-01T00:00", 1700000000])
def test_datetime_rejects(value: Any) -> None:
    assert "is not an ISO 8601 datetime" in rejection("datetime", value)


@pytest.mark.parametrize("type_name", ["int", "float", "bool", "date", "datetime"])
@pytest.mark.parametrize("value", ["", "   "])
def test_empty_string_is_rejected_for_non_str_types(type_name: str, value: str) -> None:
    assert "is empty" in rejection(type_name, value)


@pytest.mark.parametrize("type_name", ["int", "float", "bool", "str", "date", "datetime"])
def test_null_is_rejected_for_every_type(type_name: str) -> None:
    assert "is null" in rejection(type_name, None)


def test_long_values_are_shortened_in_messages() -> None:
    message = rejection("int", "x" * 10_000)
    assert len(message) < 200
    assert "..." in message


# -- properties ---------------------------------------------------------------------------


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_int_round_trips_through_text(number: int) -> None:
    assert coerce("int", str(number)) == number


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_round_trips_through_text(number: float) -> None:
    assert coerce("float", repr(number)) == number


@given(st.dates())
def test_date_round_trips_through_text(day: date) -> None:
    assert coerce("date", day.isoformat()) == day


@given(st.datetimes(timezones=st.none() | st.just(UTC)))
def test_datetime_round_trips_through_text(moment: datetime) -> None:
    assert coerce("datetime", moment.isoformat()) == moment
