"""The safe expression language: what it computes, what it refuses, and how it fails."""

from __future__ import annotations

import ast
import operator
import pickle
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import plugins.expressions as expressions
from engine._docs import render_configuration_reference
from plugins.expressions import (
    Expression,
    ExpressionError,
    ExpressionEvaluationError,
    ExpressionSyntaxError,
    compile_expression,
)

ROW: dict[str, Any] = {
    "score": 0.9,
    "count": 3,
    "name": "Ada",
    "tags": ["a", "b", "c"],
    "nested": {"inner": 7},
    "missing_value": None,
    "zero": 0,
    "flag": True,
}
TRIGGER_NAMES = ("row", "batch_count", "batch_age_seconds")


def evaluate(source: str, row: Mapping[str, Any] | None = None, **variables: Any) -> Any:
    names = ("row", *variables)
    expression = compile_expression(source, names=names)
    return expression.evaluate({"row": ROW if row is None else row, **variables})


def test_public_names_are_pinned() -> None:
    assert sorted(expressions.__all__) == [
        "Expression",
        "ExpressionError",
        "ExpressionEvaluationError",
        "ExpressionSyntaxError",
        "FUNCTIONS",
        "Function",
        "GRAMMAR",
        "LIMITS",
        "Limit",
        "compile_expression",
    ]


def test_the_module_docstring_states_every_limit() -> None:
    doc = expressions.__doc__ or ""
    for limit in expressions.LIMITS:
        assert f"{limit.value:,}" in doc, limit.name


def test_the_reference_documents_the_grammar_every_function_and_every_limit() -> None:
    reference = render_configuration_reference()
    assert expressions.GRAMMAR.rstrip() in reference
    for function in expressions.FUNCTIONS:
        assert f"`{function.signature}`" in reference
    for limit in expressions.LIMITS:
        assert f"| {limit.name} | {limit.value:,}" in reference
    assert "`row`, `batch_count`, `batch_age_seconds`" in reference


def test_every_function_is_documented() -> None:
    documented = {function.name for function in expressions.FUNCTIONS}
    assert documented == {*expressions._FUNCTION_ARITY, "get"}


def test_errors_share_one_root() -> None:
    assert issubclass(ExpressionSyntaxError, ExpressionError)
    assert issubclass(ExpressionEvaluationError, ExpressionError)
    assert not issubclass(ExpressionSyntaxError, ExpressionEvaluationError)


# --------------------------------------------------------------------------- allowed


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # literals
        ("1", 1),
        ("-2.5", -2.5),
        ("1_000", 1000),
        ("2j", 2j),
        ("'text'", "text"),
        ("b'raw'", b"raw"),
        ("True", True),
        ("None", None),
        ("(1, 'a')", (1, "a")),
        ("()", ()),
        ("[1, [2]]", [1, [2]]),
        ("{'a': 1, 'b': [2]}", {"a": 1, "b": [2]}),
        ("{1, 2, 2}", {1, 2}),
        ("'\\d'", "\\d"),
        # variables, indexing, slicing, get
        ("row['score']", 0.9),
        ("row['nested']['inner']", 7),
        ("row['tags'][0]", "a"),
        ("row['tags'][-1]", "c"),
        ("row['tags'][1:]", ["b", "c"]),
        ("row['tags'][::-1]", ["c", "b", "a"]),
        ("row['name'][:2]", "Ad"),
        ("(1, 2, 3)[1]", 2),
        ("{'k': 5}['k']", 5),
        ("row.get('score')", 0.9),
        ("row.get('absent')", None),
        ("row.get('absent', 42)", 42),
        ("row.get('count', 42)", 3),
        # comparisons
        ("row['score'] > 0.8", True),
        ("row['score'] <= 0.8", False),
        ("row['count'] == 3", True),
        ("row['count'] != 3", False),
        ("0 < row['count'] < 10", True),
        ("0 < row['count'] < 2", False),
        ("1 < 2 > 3", False),
        ("'b' in row['tags']", True),
        ("'z' not in row['tags']", True),
        ("'score' in row", True),
        ("row['missing_value'] is None", True),
        ("row['count'] is not None", True),
        ("row['flag'] is True", True),
        # boolean logic
        ("row['flag'] and row['count']", 3),
        ("row['zero'] and row['count']", 0),
        ("row['zero'] or 'default'", "default"),
        ("row['count'] or 1 / 0", 3),
        ("not row['zero']", True),
        ("not row['tags']", False),
        # arithmetic
        ("row['count'] + 1", 4),
        ("row['count'] - 5", -2),
        ("row['count'] * 2", 6),
        ("row['count'] / 2", 1.5),
        ("row['count'] // 2", 1),
        ("row['count'] % 2", 1),
        ("row['count'] ** 2", 9),
        ("2 ** -1", 0.5),
        ("2 ** 10_000 > 0", True),
        ("-row['count']", -3),
        ("+row['count']", 3),
        ("'ab' * 3", "ababab"),
        ("[0] * 3", [0, 0, 0]),
        ("row['name'] + '!'", "Ada!"),
        ("row['tags'] + ['d']", ["a", "b", "c", "d"]),
        ("(1 + 2) * 3 - 4 / 2", 7.0),
        # conditional expressions
        ("'high' if row['score'] > 0.5 else 'low'", "high"),
        ("1 / 0 if row['zero'] else 'safe'", "safe"),
        # functions
        ("len(row['tags'])", 3),
        ("len(row)", len(ROW)),
        ("abs(-4)", 4),
        ("min(3, 1, 2)", 1),
        ("max(row['tags'])", "c"),
        ("round(2.567, 2)", 2.57),
        ("round(2.5)", 2),
        ("round(1234, -2)", 1200),
        ("lower(row['name'])", "ada"),
        ("upper(row['name'])", "ADA"),
        # whitespace around the expression is not part of it
        ("  row['count']\n", 3),
        ("(row['count']\n + 1)", 4),
    ],
)
def test_allowed_construct_has_its_python_value(source: str, expected: Any) -> None:
    result = evaluate(source)
    assert result == expected
    assert type(result) is type(expected)


def test_trigger_variables() -> None:
    expression = compile_expression(
        "batch_count >= 50 and row['flag'] or batch_age_seconds > 10", names=TRIGGER_NAMES
    )
    assert expression.evaluate({"row": ROW, "batch_count": 50, "batch_age_seconds": 0.0})
    assert expression.evaluate({"row": ROW, "batch_count": 1, "batch_age_seconds": 11.0})
    assert not expression.evaluate({"row": ROW, "batch_count": 1, "batch_age_seconds": 1.0})


def test_get_works_on_any_variable_holding_a_mapping() -> None:
    assert evaluate("meta.get('k', 0) + 1", meta={"k": 4}) == 5


def test_get_guards_short_circuit_lookups_of_absent_fields() -> None:
    source = "row.get('price') is not None and row['price'] > 10"
    assert evaluate(source, {"other": 1}) is False
    assert evaluate(source, {"price": 11}) is True


class CountingVariables(Mapping[str, Any]):
    """Variables that count how often each one is read."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.data = values
        self.reads: dict[str, int] = dict.fromkeys(values, 0)

    def __getitem__(self, key: str) -> Any:
        self.reads[key] += 1
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def test_chained_comparison_evaluates_each_operand_once() -> None:
    expression = compile_expression("0 < x < 10 < y", names=("x", "y"))
    variables = CountingVariables({"x": 5, "y": 20})
    assert expression.evaluate(variables) is True
    assert variables.reads == {"x": 1, "y": 1}


def test_short_circuit_skips_the_right_operand() -> None:
    expression = compile_expression("x or y", names=("x", "y"))
    variables = CountingVariables({"x": 1, "y": 2})
    assert expression.evaluate(variables) == 1
    assert variables.reads == {"x": 1, "y": 0}


def test_each_evaluation_builds_fresh_containers() -> None:
    expression = compile_expression("[1, {'a': 2}]")
    first, second = expression.evaluate({}), expression.evaluate({})
    assert first == second
    assert first is not second
    assert first[1] is not second[1]


def test_expression_records_source_and_names() -> None:
    expression = compile_expression("row['a']", names=TRIGGER_NAMES)
    assert isinstance(expression, Expression)
    assert expression.source == "row['a']"
    assert expression.names == frozenset(TRIGGER_NAMES)
    assert compile_expression("row['a']").names == frozenset({"row"})


def test_expressions_compare_by_source_and_names() -> None:
    assert compile_expression("row['a']") == compile_expression("row['a']")
    assert hash(compile_expression("1")) == hash(compile_expression("1"))
    assert compile_expression("row['a']") != compile_expression("row['a']", names=TRIGGER_NAMES)
    assert "row['a']" in repr(compile_expression("row['a']"))


def test_expression_is_frozen() -> None:
    expression = compile_expression("1")
    with pytest.raises(AttributeError):
        expression.source = "2"  # type: ignore[misc]


def test_expression_pickles_by_recompiling() -> None:
    expression = compile_expression("row['count'] * k", names=("row", "k"))
    restored = pickle.loads(pickle.dumps(expression))
    assert restored == expression
    assert restored.evaluate({"row": ROW, "k": 2}) == 6


def test_names_must_not_be_a_bare_string() -> None:
    with pytest.raises(TypeError, match="not a str"):
        compile_expression("row", names="row")


def test_errors_pickle_with_source_and_reason() -> None:
    error = pickle.loads(pickle.dumps(ExpressionEvaluationError("1/0", "division by zero")))
    assert (error.source, error.reason, str(error)) == (
        "1/0",
        "division by zero",
        "division by zero",
    )


def test_module_never_hands_source_to_eval_exec_or_compile() -> None:
    tree = ast.parse(Path(expressions.__file__).read_text(encoding="utf-8"))
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not called & {"eval", "exec", "compile", "__import__", "getattr"}


# --------------------------------------------------------------------------- forbidden


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("row.__class__", "attribute access '.__class__' is not allowed"),
        ("().__class__.__bases__", "attribute access '.__bases__' is not allowed"),
        ("().__class__.__bases__[0].__subclasses__()", "'.__subclasses__' is not allowed"),
        ("row.get.__self__", "attribute access '.__self__' is not allowed"),
        ("row.keys", "attribute access '.keys' is not allowed"),
        ("row['name'].upper", "attribute access '.upper' is not allowed"),
        ("row.get", "'row.get' must be called, as row.get(key) or row.get(key, default)"),
        ("row.keys()", "method call '.keys()' is not allowed"),
        ("row['name'].lower()", "method call '.lower()' is not allowed; use lower(x)"),
        ("row['nested'].get('inner')", "method call '.get()' is not allowed"),
        ("__import__('os')", "name '__import__' is not allowed"),
        ("__builtins__", "name '__builtins__' is not allowed"),
        ("__name__", "dunder names are forbidden"),
        ("open('x')", "call of 'open' is not allowed"),
        ("eval('1')", "call of 'eval' is not allowed"),
        ("getattr(row, 'get')", "call of 'getattr' is not allowed"),
        ("str(1)", "call of 'str' is not allowed"),
        ("row['f']()", "calling `row['f']` is not allowed"),
        ("(lambda: 1)()", "calling `lambda: 1` is not allowed"),
        ("row()", "'row' is a variable, not a function"),
        ("len", "function 'len' must be called"),
        ("unknown", "unknown name 'unknown' (variables: row)"),
        ("batch_count > 1", "unknown name 'batch_count'"),
        ("[x for x in row]", "list comprehension is not allowed"),
        ("{x for x in row}", "set comprehension is not allowed"),
        ("{x: 1 for x in row}", "dict comprehension is not allowed"),
        ("sum(x for x in row)", "call of 'sum' is not allowed"),
        ("len(x for x in row)", "generator expression is not allowed"),
        ("lambda: 1", "lambda is not allowed"),
        ("(y := 1)", "assignment expression ':=' is not allowed"),
        ("f'{row}'", "f-string is not allowed"),
        ("f'plain'", "f-string is not allowed"),
        ("[*row['tags']]", "starred expression '*' is not allowed"),
        ("len(*row['tags'])", "starred expression '*' is not allowed"),
        ("{**row}", "dict unpacking '**' is not allowed"),
        ("max(1, 2, key=abs)", "keyword arguments are not allowed"),
        ("max(**row)", "keyword arguments are not allowed"),
        ("await row", "await is not allowed"),
        ("(yield)", "yield is not allowed"),
        ("...", "Ellipsis"),
        ("row['count'] & 1", "operator '&' is not allowed"),
        ("row['count'] | 1", "operator '|' is not allowed"),
        ("row['count'] ^ 1", "operator '^' is not allowed"),
        ("1 << 100", "operator '<<' is not allowed"),
        ("1 >> 1", "operator '>>' is not allowed"),
        ("row @ row", "operator '@' is not allowed"),
        ("~1", "operator '~' is not allowed"),
        ("row['count'] is 3", "'is' is only allowed with None, True or False"),
        ("1 is not row", "'is not' is only allowed with None, True or False"),
        ("len()", "len() takes 1 argument(s), 0 given"),
        ("len(1, 2)", "len() takes 1 argument(s), 2 given"),
        ("round(1, 2, 3)", "round() takes 1 or 2 argument(s), 3 given"),
        ("max()", "max() takes 1+ argument(s), 0 given"),
        ("row.get()", "row.get() takes 1 or 2 argument(s), 0 given"),
        ("import os", "import statement is not allowed"),
        ("from os import path", "import statement is not allowed"),
        ("x = 1", "assignment is not allowed"),
        ("row['a'] += 1", "assignment is not allowed"),
        ("def f(): pass", "function definition is not allowed"),
        ("del row", "delete statement is not allowed"),
        ("1; 2", "more than one statement is not allowed"),
        ("row[", "invalid syntax"),
        ("1 +", "invalid syntax at end of input"),
        ("(1", "'(' was never closed"),
        ("", "expression is empty"),
        ("   \n", "expression is empty"),
    ],
)
def test_forbidden_construct_is_refused_with_a_message(source: str, message: str) -> None:
    with pytest.raises(ExpressionSyntaxError) as info:
        compile_expression(source)
    assert message in str(info.value)
    assert info.value.source == source
    assert info.value.reason == str(info.value)
    assert "\n" not in str(info.value)


def test_dunder_names_are_refused_even_when_offered_as_variables() -> None:
    with pytest.raises(ExpressionSyntaxError, match="dunder"):
        compile_expression("__row__", names=("__row__",))


def test_dunder_strings_are_only_data() -> None:
    assert evaluate("row.get('__class__', 'absent')") == "absent"
    with pytest.raises(ExpressionEvaluationError, match="row has no field '__class__'"):
        evaluate("row['__class__']")


def test_source_must_be_a_string() -> None:
    with pytest.raises(ExpressionSyntaxError, match="must be a string, not int"):
        compile_expression(5)  # type: ignore[arg-type]


def test_source_over_4000_characters_is_refused() -> None:
    compile_expression("1" + " " * 3999)
    with pytest.raises(ExpressionSyntaxError, match="4,001 characters long; the limit is 4,000"):
        compile_expression("1" + " " * 4000)


@pytest.mark.parametrize(
    "source",
    [
        "-" * 51 + "1",
        "[" * 60 + "]" * 60,
        "not " * 60 + "1",
        "+".join(["1"] * 60),
        "row" + "['a']" * 60,
    ],
)
def test_deep_nesting_is_refused(source: str) -> None:
    with pytest.raises(ExpressionSyntaxError, match="nested too deeply"):
        compile_expression(source)


def test_moderate_nesting_is_fine() -> None:
    assert evaluate("-" * 40 + "1") == 1
    assert evaluate("+".join(["1"] * 40)) == 40


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("-" * 3999 + "1", "cannot be parsed (RecursionError"),
        ("(" * 1000, "too many nested parentheses"),
        ("'a\x00b'", "null bytes"),
        ("1 +\x00", "null bytes"),
    ],
)
def test_pathological_source_is_a_syntax_error(source: str, message: str) -> None:
    with pytest.raises(ExpressionSyntaxError) as info:
        compile_expression(source)
    assert message in str(info.value)


# --------------------------------------------------------------------------- runtime errors


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("row['score_x'] > 1", "row has no field 'score_x'"),
        ("row['nested']['absent']", "`row['nested']` has no key 'absent'"),
        ("row['tags'][5]", "index 5 is out of range for `row['tags']`"),
        ("row['tags']['a']", "cannot index `row['tags']` (list) with 'a'"),
        ("row['count']['a']", "'int' object is not subscriptable"),
        ("row['count'] / row['zero']", "division by zero in `row['count'] / row['zero']`"),
        ("row['count'] // 0", "by zero"),
        ("row['count'] % 0", "by zero"),
        ("0.0 ** -1", "in `0.0 ** -1`"),
        ("row['name'] + 1", "can only concatenate str"),
        ("row['name'] - 1", "unsupported operand type(s) for -"),
        ("row['name'] > 1", "'>' not supported between instances of 'str' and 'int'"),
        ("0 < row['name'] < 1", "'<' not supported"),
        ("-row['name']", "bad operand type for unary -"),
        ("1 in 5", "is not iterable"),
        ("len(5)", "object of type 'int' has no len() in `len(5)`"),
        ("lower(5)", "lower() needs a string, not int"),
        ("upper(None)", "upper() needs a string, not NoneType"),
        ("max([])", "empty"),
        ("abs('x')", "bad operand type for abs()"),
        ("round('x')", "round"),
        ("{[1]: 2}", "unhashable type: 'list'"),
        ("{[1]}", "unhashable type: 'list'"),
        ("row.get([1])", "cannot look up [1] in row"),
        ("'%s' % row['name']", "string formatting with '%' is not allowed"),
        ("2.0 ** 10_000", "numeric overflow"),
        ("round(1e308 * 10)", "numeric overflow"),
        ("(10 ** 400) / 1.0", "numeric overflow"),
    ],
)
def test_runtime_failure_names_the_problem(source: str, message: str) -> None:
    with pytest.raises(ExpressionEvaluationError) as info:
        evaluate(source)
    assert message in str(info.value)
    assert info.value.source == source
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("10 ** 10 ** 10", "exponent 10000000000 is over the limit of 10,000"),
        ("2 ** 10_001", "over the limit of 10,000"),
        ("2 ** -100_000", "over the limit of 10,000"),
        ("7 ** 10_000", "power would be too large"),
        ("(2 ** 9_000) * (2 ** 9_000)", "integer product would be too large"),
        ("'a' * 10 ** 9", "repetition would have 1,000,000,000 items"),
        ("10 ** 9 * 'a'", "repetition would have 1,000,000,000 items"),
        ("[0] * 10 ** 9", "the limit is 1,000,000"),
        ("(0,) * 1_000_001", "the limit is 1,000,000"),
        ("b'ab' * 600_000", "the limit is 1,000,000"),
        ("'a' * 600_000 + 'b' * 600_000", "concatenation would have 1,200,000 items"),
        ("round(5, -10 ** 9)", "round() digits must be within"),
    ],
)
def test_runtime_limits_fail_fast(source: str, message: str) -> None:
    with pytest.raises(ExpressionEvaluationError) as info:
        evaluate(source)
    assert message in str(info.value)


def test_values_just_under_the_limits_are_computed() -> None:
    assert len(evaluate("'a' * 1_000_000")) == 1_000_000
    assert evaluate("1 ** 10_000") == 1
    assert evaluate("(-1) ** 9_999") == -1
    assert evaluate("2.0 ** 0.5") == pytest.approx(1.41421356)


def test_missing_variable_is_an_evaluation_error() -> None:
    expression = compile_expression("batch_count > 1 and row['a']", names=TRIGGER_NAMES)
    with pytest.raises(ExpressionEvaluationError, match="variable 'batch_count' was not provided"):
        expression.evaluate({"row": {}})
    with pytest.raises(ExpressionEvaluationError, match="variable 'row' was not provided"):
        compile_expression("row['a']").evaluate({})


def test_get_on_a_non_mapping_is_an_evaluation_error() -> None:
    with pytest.raises(ExpressionEvaluationError, match="needs a mapping, but n is int"):
        evaluate("n.get('a')", n=5)


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def test_deeply_nested_row_data_is_an_evaluation_error() -> None:
    # Deeper than the limit, long before Python's own comparison would recurse too deep.
    row = {"a": _nested(5_000), "b": _nested(5_000)}
    with pytest.raises(ExpressionEvaluationError, match="nested more than 200 levels"):
        evaluate("row['a'] == row['b']", row)
    assert evaluate("row['a'] == row['b']", {"a": _nested(199), "b": _nested(199)})


class Hostile:
    """A row value whose own methods fail in unexpected ways."""

    def __bool__(self) -> bool:
        raise RuntimeError("no truth value")

    def __eq__(self, other: object) -> bool:
        raise LookupError("cannot compare")

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    "source", ["row['h'] and 1", "not row['h']", "row['h'] == 1", "1 if row['h'] else 2"]
)
def test_exceptions_from_row_values_become_evaluation_errors(source: str) -> None:
    with pytest.raises(ExpressionEvaluationError, match=r"no truth value|cannot compare"):
        evaluate(source, {"h": Hostile()})


def test_evaluation_error_chains_the_original_exception() -> None:
    with pytest.raises(ExpressionEvaluationError) as info:
        evaluate("1 / row['zero']")
    assert isinstance(_root_cause(info.value), ZeroDivisionError)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


# --------------------------------------------------------------------------- fuzzing

FUZZ_NAMES = ("row", "batch_count", "x")
FUZZ_TOKENS = [
    *FUZZ_NAMES,
    *("unknown", "get", "lower", "upper", "len", "abs", "min", "max", "round", "open", "eval"),
    *("__class__", "__import__", "__builtins__", "__dict__", "_", "self"),
    *("(", ")", "[", "]", "{", "}", ",", ":", ".", ";", "=", ":=", "*", "**"),
    *("+", "-", "/", "//", "%", "<", "<=", "==", "!=", ">", ">=", "&", "|", "~", "@"),
    *("in", "not", "is", "and", "or", "if", "else", "for", "lambda", "yield", "await"),
    *("import", "None", "True", "False", "..."),
    *("0", "1", "2", "10", "9999", "1.5", "1e308", "1j", "0x10"),
    *("'a'", "'score'", "'__class__'", "''", "b'x'", "f'{row}'", "'", '"', "\\", "\n", "#"),
]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.sampled_from(["a", "score", "__class__"])
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["a", "score", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_rows = st.dictionaries(st.sampled_from(["a", "score", "__class__", "x"]), _values, max_size=4)
_token_soup = st.builds(
    str.join,
    st.sampled_from([" ", ""]),
    st.lists(st.sampled_from(FUZZ_TOKENS), max_size=25),
)
_grammar_leaves = st.sampled_from(
    [
        *FUZZ_NAMES,
        *("unknown", "__class__", "0", "2", "9999", "-1", "1.5", "1e308", "None", "True"),
        *("'a'", "'score'", "'__class__'", "''", "b'x'", "[]", "()", "{}"),
    ]
)


def _grammar_extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    operators = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "&", "|", "<<"])
    comparisons = st.sampled_from(["<", "==", "!=", ">=", "in", "not in", "is", "is not"])
    functions = st.sampled_from(["len", "abs", "min", "max", "round", "lower", "upper", "open"])
    attributes = st.sampled_from(["get", "lower", "__class__", "__dict__", "keys", "__self__"])
    return st.one_of(
        st.builds("{} {} {}".format, inner, operators, inner),
        st.builds("({} {} {})".format, inner, comparisons, inner),
        st.builds("({} {} {})".format, inner, st.sampled_from(["and", "or"]), inner),
        st.builds("(not {})".format, inner) | st.builds("(-{})".format, inner),
        st.builds("({} if {} else {})".format, inner, inner, inner),
        st.builds("{}({})".format, functions, inner),
        st.builds("{}({}, {})".format, functions, inner, inner),
        st.builds("{}.{}".format, inner, attributes),
        st.builds("{}.{}({})".format, inner, attributes, inner),
        st.builds("{}[{}]".format, inner, inner),
        st.builds("{}[{}:{}]".format, inner, inner, inner),
        st.builds("[{}, {}]".format, inner, inner) | st.builds("({},)".format, inner),
        st.builds("{{{}: {}}}".format, inner, inner) | st.builds("{{{}}}".format, inner),
        st.builds("[v for v in {}]".format, inner) | st.builds("(lambda: {})".format, inner),
    )


_grammar = st.recursive(_grammar_leaves, _grammar_extend, max_leaves=10)
_sources = _grammar | _token_soup | st.text(max_size=30)

FUZZ_SETTINGS = settings(
    max_examples=400,
    deadline=timedelta(milliseconds=300),
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ_SETTINGS
@given(source=_sources, row=_rows, batch_count=st.integers(), x=_values)
def test_fuzzed_source_compiles_or_is_refused_and_evaluates_or_fails_cleanly(
    source: str, row: dict[str, Any], batch_count: int, x: Any
) -> None:
    failure: ExpressionError | None = None
    try:
        expression = compile_expression(source, names=FUZZ_NAMES)
        expression.evaluate({"row": row, "batch_count": batch_count, "x": x})
    except (ExpressionSyntaxError, ExpressionEvaluationError) as error:
        failure = error
    if failure is not None:
        assert failure.reason
        assert "\n" not in failure.reason


# Well-formed arithmetic and comparisons, checked against Python itself as the oracle.

ORACLE_NAMES = ("a", "b", "c")
ORACLE_FUNCTIONS = {"abs": abs, "min": min, "max": max, "round": round}

_numbers = st.integers(-1000, 1000) | st.floats(allow_subnormal=False)
_literals = (
    st.integers(0, 1000).map(str)
    | st.floats(min_value=0, allow_infinity=False, allow_nan=False).map(repr)
    | st.sampled_from(["True", "False"])
)
_leaves = st.sampled_from(ORACLE_NAMES) | _literals


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.sampled_from(["+", "-", "*", "/", "//", "%"])
    comparison = st.sampled_from(["<", "<=", "==", "!=", ">", ">="])
    return st.one_of(
        st.builds("({} {} {})".format, inner, binary, inner),
        st.builds("({} ** {})".format, inner, st.sampled_from(["0", "1", "2", "3", "-1", "0.5"])),
        st.builds("({} {} {})".format, inner, comparison, inner),
        st.builds("({} {} {} {} {})".format, inner, comparison, inner, comparison, inner),
        st.builds("({} {} {})".format, inner, st.sampled_from(["and", "or"]), inner),
        st.builds("(not {})".format, inner),
        st.builds("(-{})".format, inner),
        st.builds("({} if {} else {})".format, inner, inner, inner),
        st.builds("abs({})".format, inner),
        st.builds("{}({}, {})".format, st.sampled_from(["min", "max"]), inner, inner),
        st.builds("round({})".format, inner),
        st.builds("round({}, {})".format, inner, st.integers(-3, 3)),
    )


_oracle_sources = st.recursive(_leaves, _extend, max_leaves=12)


def _python_eval(source: str, variables: dict[str, Any]) -> Any:
    return eval(source, {"__builtins__": {}, **ORACLE_FUNCTIONS}, variables)


@settings(max_examples=400, deadline=timedelta(milliseconds=300))
@given(source=_oracle_sources, a=_numbers, b=_numbers, c=_numbers)
def test_arithmetic_agrees_with_python(source: str, a: Any, b: Any, c: Any) -> None:
    variables = {"a": a, "b": b, "c": c}
    expression = compile_expression(source, names=ORACLE_NAMES)
    try:
        ours = expression.evaluate(variables)
    except ExpressionEvaluationError as error:
        assume("limit" not in error.reason)
        with pytest.raises(type(_root_cause(error))):
            _python_eval(source, variables)
        return
    assert repr(ours) == repr(_python_eval(source, variables))


@pytest.mark.parametrize(
    ("source", "op"),
    [("a < b", operator.lt), ("a == b", operator.eq), ("a + b", operator.add)],
)
@given(a=_numbers, b=_numbers)
def test_single_operations_agree_with_operator_module(source: str, op: Any, a: Any, b: Any) -> None:
    assert repr(compile_expression(source, names=("a", "b")).evaluate({"a": a, "b": b})) == repr(
        op(a, b)
    )
