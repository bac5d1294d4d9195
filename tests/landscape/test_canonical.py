"""canonical_json is byte-for-byte RFC 8785 (the reference encoder, rfc8785.dumps)."""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
import uuid
from decimal import Decimal
from enum import Enum, StrEnum
from typing import Any

import orjson
import pytest
import rfc8785
from hypothesis import example, given
from hypothesis import strategies as st

from landscape._canonical import (
    MAX_DEPTH,
    CanonicalizationError,
    _exact_bytes,
    _scanned_bytes,
    canonical_bytes,
    canonical_hash,
    canonical_json,
    payload_forms,
    sha256_hex,
)

_SAFE = 2**53 - 1

# Every plane, astral ones included; surrogates cannot be encoded and are tested apart.
_chars = st.characters(exclude_categories=("Cs",))
_astral = st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, exclude_categories=("Cs",))
_text = st.text(_chars) | st.text(_astral | _chars, min_size=1)
_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [
        0.0,
        -0.0,
        5e-324,
        1e-7,
        1e-6,
        1e-5,
        1e-4,
        0.1,
        1e15 + 0.5,
        2.0**53,
        1e16,
        1e21,
        1e22,
        1.7976931348623157e308,
    ]
)
_scalars = st.none() | st.booleans() | st.integers(-_SAFE, _SAFE) | _floats | _text
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=30,
)


@given(_json)
@example({"\U0001f600": 1, "\ufb33": 2, "a": 3})  # UTF-16 order differs from code point order
@example({"é": [1e-7, 1e21, -0.0, "\u2028\x7f\x1f"]})
@example({"outer": {"\U0001f600": 1, "\ufb33": 2, "é": 3}})  # nested keys, UTF-16 order
@example([{"b": 2.0}, {"a": "not a hazard: 2.0, 1e-7, null"}, {"c": [1.5, 1e16]}])
def test_matches_reference_encoder(value: Any) -> None:
    assert canonical_json(value).encode("utf-8") == rfc8785.dumps(value)


@given(st.dictionaries(st.text(_astral, min_size=1), _scalars, min_size=2, max_size=6))
def test_astral_keys_sort_by_utf16(value: dict[str, Any]) -> None:
    assert canonical_json(value).encode("utf-8") == rfc8785.dumps(value)


@given(_floats)
def test_floats_of_every_magnitude(value: float) -> None:
    assert canonical_json(value) == rfc8785.dumps(value).decode()
    assert canonical_json([value, {"k": value}]) == rfc8785.dumps([value, {"k": value}]).decode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "wrap",
    [
        lambda v: v,
        lambda v: [1, v],
        lambda v: {"a": {"b": v}},
        lambda v: {"é": v},  # a non-ASCII key takes the reference encoder's path
        lambda v: {"answer": {"logprobs": None, "score": [v]}},
    ],
)
def test_nan_and_infinity_are_refused(bad: float, wrap: Any) -> None:
    with pytest.raises(CanonicalizationError):
        canonical_json(wrap(bad))


@pytest.mark.parametrize(
    "number", [2**53, -(2**53), 2**53 + 1, 2**63, 2**64 - 1, 2**64 + 1, -(2**64) - 1, 10**30]
)
@pytest.mark.parametrize(
    "wrap",
    [
        lambda v: {"n": v},  # a flat row
        lambda v: {"n": v, "x": 1e-7},  # a flat row the fast path leaves
        lambda v: [v, {"k": [v]}],  # nested
        lambda v: {"é": v, "\U0001f600": [v, 2.0]},  # keys only the exact encoder sorts
        lambda v: v,
    ],
)
def test_integers_beyond_double_precision_keep_all_their_digits(number: int, wrap: Any) -> None:
    value = wrap(number)
    assert str(number) in canonical_json(value)
    canonical, stored = payload_forms(value)
    assert json.loads(stored) == value  # stored exactly, read back as ints
    assert canonical == canonical_bytes(json.loads(canonical))


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(CanonicalizationError):
        canonical_json({"text": "\ud800"})


@pytest.mark.parametrize("value", [{1: "a"}, {None: 1}, object(), {1, 2}, b"bytes"])
def test_non_json_values_are_refused(value: Any) -> None:
    with pytest.raises(CanonicalizationError):
        canonical_json(value)


class Colour(StrEnum):
    RED = "red"


class Shade(str, Enum):  # noqa: UP042 - str() of a member is "Shade.DARK", JSON "dark"
    DARK = "dark"


class Tag(str):
    pass


class Size(Enum):
    SMALL = 1.5
    LARGE = 2.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"d": dt.date(2024, 1, 2)}, '{"d":"2024-01-02"}'),
        ({"t": dt.datetime(2024, 1, 2, 3, 4, 5)}, '{"t":"2024-01-02T03:04:05"}'),
        ({"x": Decimal("1.5")}, '{"x":1.5}'),
        ({"tuple": (1, 2)}, '{"tuple":[1,2]}'),
        ({Colour.RED: Colour.RED}, '{"red":"red"}'),
        ({"e": Size.LARGE, "nested": [Size.SMALL]}, '{"e":2,"nested":[1.5]}'),
        ({"flat": Shade.DARK, "nested": [Shade.DARK]}, '{"flat":"dark","nested":["dark"]}'),
        ({"x": 2.0, "e": Shade.DARK}, '{"e":"dark","x":2}'),  # the exact path agrees
        (
            {"id": uuid.UUID(int=1), "ids": [uuid.UUID(int=2)]},
            '{"id":"00000000-0000-0000-0000-000000000001",'
            '"ids":["00000000-0000-0000-0000-000000000002"]}',
        ),
        ({"b": True, "a": None}, '{"a":null,"b":true}'),
    ],
)
def test_python_values_are_normalised(value: Any, expected: str) -> None:
    assert canonical_json(value) == expected


def test_hash_is_sha256_of_canonical_text() -> None:
    value = {"b": 1, "a": [1.0, "x"]}
    assert canonical_json(value) == '{"a":[1,"x"],"b":1}'
    assert canonical_hash(value) == sha256_hex('{"a":[1,"x"],"b":1}')
    assert sha256_hex(b"abc") == sha256_hex("abc")
    assert sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    "number",
    [
        8.0378274697208e-06,
        1e-5,
        9.99e-6,
        1e-6,
        1e-7,
        1.5e-7,
        123456789.123,
        4503599627370495.5,
        1e-320,
        2.5e-5,
        -3.3e-6,
        0.1,
        1e15 + 0.5,
    ],
)
def test_floats_at_the_formatting_boundaries_match_the_reference(number: float) -> None:
    for value in (number, {"x": number}, {"x": number, "s": "t"}, [number]):
        assert canonical_json(value) == rfc8785.dumps(value).decode()


@pytest.mark.parametrize(
    "row",
    [
        {"a": 2.0, "b": "x"},
        {"a": 0.5, "note": "version 2.0, build 3e"},
        {"a": 8.0378274697208e-06},
        {"a": 1e16, "b": 1.25},
        {"a": -0.0, "b": True, "c": None},
        {"a": 0.1, "b": 7, "c": "plain"},
        {"a": 3.0, "b": 1e-7, "c": 0.25},
        {"a": 1.0, "b": 2.0**60},
        {"a": -0.0, "b": 100.0, "c": 12.5, "d": "x"},
    ],
)
def test_flat_rows_match_the_reference_whichever_path_they_take(row: dict[str, Any]) -> None:
    assert canonical_json(row) == rfc8785.dumps(row).decode()


@pytest.mark.parametrize("row", [{"a": math.nan}, {"a": math.inf, "b": 1.5}, {"a": 10**5000}])
def test_flat_rows_without_a_canonical_form_are_refused(row: dict[str, Any]) -> None:
    with pytest.raises(CanonicalizationError):
        canonical_json(row)


def _same_types(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_types(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_types, a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


@given(_json)
@example({"amount": 1154.0, "nested": [2.0, {"x": 0.0}]})
@example({"amount": 1154.0, "score": 0.37, "id": 7, "note": "flat"})
def test_stored_payloads_hash_canonically_and_read_back_with_their_types(value: Any) -> None:
    canonical, stored = payload_forms(value)
    assert canonical == rfc8785.dumps(value)
    read_back = orjson.loads(stored)
    assert rfc8785.dumps(read_back) == canonical  # the hash still names what is stored
    assert _same_types(value, read_back)  # a 2.0 comes back a float, not an int


_REQUEST = {
    "model": "m",
    "messages": [{"role": "user", "content": "Classify: I cannot log in"}],
    "response_format": {"type": "json_schema", "json_schema": {"strict": True, "schema": {}}},
    "temperature": 0.2,
}


_ANSWER = {
    "id": "chatcmpl-1",
    "choices": [{"index": 0, "message": {"content": "{}"}, "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5},
}


@pytest.mark.parametrize("value", [_REQUEST, _ANSWER], ids=["request", "answer-with-nulls"])
def test_a_nested_request_takes_the_single_pass(value: dict[str, Any]) -> None:
    """The fast path for requests and answers is taken (not only correct when skipped)."""
    assert _scanned_bytes(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "value",
    [
        {"a": [2.0]},
        {"a": {"b": 1e-7}},
        {"a": [math.nan]},
        {"a": None, "b": [math.inf]},  # a null of its own does not hide one for a number
        {"a": [None, -math.inf]},
        {"a": {"\U0001f600": 1}},
        {"a": Tag("x")},
        {"a": [dt.date(2024, 1, 2)]},
    ],
)
def test_the_single_pass_leaves_what_orjson_prints_differently_to_the_exact_path(
    value: Any,
) -> None:
    assert _scanned_bytes(value) is None


# -- the exact encoder, long ints, Decimals and nesting (issue 19) --------------------------


@given(_json)
@example({"\U0001f600": 1, "\ufb33": [2.0, 1e-7, -0.0], "a": {"b": '\x00\u2028\\"'}})
def test_the_exact_encoder_is_rfc8785_on_its_domain(value: Any) -> None:
    """The encoder the fast paths fall back to writes what the reference does."""
    assert _exact_bytes(value) == rfc8785.dumps(value)


# Hashes recorded before the extensions: values that had a canonical form keep it.
_KNOWN_HASHES = [
    ({"amount": 1154.0, "id": 7, "note": "flat"}, '{"amount":1154,"id":7,"note":"flat"}'),
    ({"x": Decimal("1.5"), "y": Decimal("0.1")}, '{"x":1.5,"y":0.1}'),
    ([Decimal("-12.340"), Decimal("1E-7"), Decimal("2E+21")], "[-12.34,1e-7,2e+21]"),
    ({"big": 9007199254740991, "f": 2.0**60}, '{"big":9007199254740991,"f":1152921504606847000}'),
]


@pytest.mark.parametrize(("value", "text"), _KNOWN_HASHES)
def test_values_valid_before_keep_their_canonical_bytes(value: Any, text: str) -> None:
    assert canonical_json(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0.1000000000000000055511151231257827021181583404541015625"), None),
        (Decimal("1.23456789012345678901234567890"), "1.2345678901234567890123456789"),
        (Decimal("-0.00"), "0"),
        (Decimal("100"), "100"),
        (Decimal("1E+21"), "1e+21"),
        (Decimal("123456789012345678901234"), "1.23456789012345678901234e+23"),
        (Decimal("0.00000012345678901234567890"), "1.234567890123456789e-7"),
        (Decimal("0.000001"), "0.000001"),
        (Decimal("1E+400"), "1e+400"),
        (Decimal("-5E-400"), "-5e-400"),
    ],
)
def test_decimals_are_written_exactly_never_as_floats(value: Decimal, text: str | None) -> None:
    expected = text if text is not None else str(value)
    for wrap, written in ((value, expected), ({"d": value}, f'{{"d":{expected}}}')):
        assert canonical_json(wrap) == written
        assert canonical_json([wrap, "\U0001f600"]) == f'[{written},"\U0001f600"]'


_decimals = st.decimals(allow_nan=False, allow_infinity=False)


@given(_decimals, st.integers(0, 30))
def test_equal_decimals_give_equal_bytes(value: Decimal, zeros: int) -> None:
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    padded = Decimal((sign, digits + (0,) * zeros, exponent - zeros))  # trailing zeros
    assert padded == value
    assert canonical_json(padded) == canonical_json(value)


@given(_floats)
def test_a_decimal_with_a_doubles_digits_hashes_as_that_double(number: float) -> None:
    assert canonical_json(Decimal(repr(number))) == rfc8785.dumps(number).decode()


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("sNaN"), Decimal("-Infinity")])
def test_decimals_without_a_value_are_refused(bad: Decimal) -> None:
    with pytest.raises(CanonicalizationError):
        canonical_json({"d": bad})


def _nested(depth: int, leaf: Any = 1, *, key: str | None = None) -> Any:
    """``depth`` containers around ``leaf`` (objects under ``key``, else arrays), built
    without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value] if key is None else {key: value}
    return value


@pytest.mark.parametrize("key", [None, "a", "\U0001f600"])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_too_deep_a_value_is_a_canonicalisation_error(key: str | None, depth: int) -> None:
    for value in (_nested(depth, key=key), {"row": _nested(depth, key=key)}):
        with pytest.raises(CanonicalizationError, match="nested deeper than"):
            payload_forms(value)


@pytest.mark.parametrize("key", [None, "a", "\U0001f600"])
def test_the_deepest_allowed_value_is_written_without_recursion(key: str | None) -> None:
    value = _nested(MAX_DEPTH, 2.0, key=key)
    expected = rfc8785.dumps(value)
    # Allow a few dozen frames beyond the caller's: canonicalising must not need one
    # (or two) per level of nesting.
    frames = len(__import__("inspect").stack())
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(frames + 80)
    try:
        canonical, stored = payload_forms(value)
    finally:
        sys.setrecursionlimit(limit)
    assert canonical == expected
    assert canonical_bytes(json.loads(stored)) == expected


@pytest.mark.parametrize(
    "value",
    [{"\udfff": 1}, {"a": {"\ud800x": 1}}, {"\U0001f600": {"\udc00": 2}}, ["\ud83d"], "\udfff"],
)
def test_a_lone_surrogate_anywhere_is_a_canonicalisation_error(value: Any) -> None:
    with pytest.raises(CanonicalizationError, match=r"lone surrogate|surrogates"):
        payload_forms(value)


def test_an_int_too_long_to_write_is_a_canonicalisation_error() -> None:
    with pytest.raises(CanonicalizationError, match="too long"):
        canonical_json([10**5000, "\U0001f600"])
