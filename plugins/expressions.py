"""The safe expression language of gates, filters, computed fields and aggregation triggers.

An expression is one Python expression from a small whitelist: literals (numbers, strings,
bytes, ``True``/``False``/``None``, tuples, lists, dicts, sets), the variables it is compiled
with (``row``; triggers also get ``batch_count`` and ``batch_age_seconds``), indexing and
slicing, ``row.get(key)`` / ``row.get(key, default)``, comparisons (chained, ``in``,
``is None``), ``and``/``or``/``not``, arithmetic (``+ - * / // % **``), ``a if c else b``
and the functions ``abs len lower max min round upper``.  Everything else — any other
attribute or call, dunder names, comprehensions, lambdas, ``:=``, f-strings, starred
arguments, keyword arguments, bitwise operators, statements — is refused at compile time.

The source is parsed with :mod:`ast` and compiled once into a tree of closures; nothing is
ever handed to ``eval``, ``exec`` or ``compile``.  Sources are at most 4,000 characters and
50 levels deep.  ``is`` compares only with ``None``, ``True`` or ``False``; ``%`` does not
format strings.  Evaluation is bounded — integer exponents at most 10,000 (unless the base
is a float), integer results at most 14,000 bits, repeated or concatenated sequences at
most 1,000,000 items — so a row can make an expression fail but never hang it.

Errors::

    ExpressionError
    ├── ExpressionSyntaxError       the source does not parse or uses a forbidden construct
    └── ExpressionEvaluationError   one evaluation failed: missing field, type error, limit...
"""

from __future__ import annotations

import ast
import math
import operator
import reprlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "Expression",
    "ExpressionError",
    "ExpressionEvaluationError",
    "ExpressionSyntaxError",
    "compile_expression",
]

Evaluator = Callable[[Mapping[str, Any]], Any]
Operator = Callable[[Any, Any], Any]

_MAX_SOURCE_LENGTH: Final = 4_000
_MAX_DEPTH: Final = 50
_MAX_EXPONENT: Final = 10_000
_MAX_INT_BITS: Final = 14_000  # about 4,200 digits: every result still converts to str
_MAX_LENGTH: Final = 1_000_000
_MAX_ROUND_DIGITS: Final = 1_000
_SEQUENCES: Final = (str, bytes, bytearray, list, tuple)
_SNIPPET_LENGTH: Final = 80
_SINGLETONS: Final = (None, True, False)


# --------------------------------------------------------------------------- errors


class ExpressionError(Exception):
    """Root of this module's errors; ``str(exc)`` is the one-line ``reason``."""

    source: str
    reason: str

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(source, reason)
        self.source = source
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class ExpressionSyntaxError(ExpressionError):
    """The source does not parse, or uses a construct the language forbids."""


class ExpressionEvaluationError(ExpressionError):
    """Evaluating the expression failed for one particular set of variables."""


class _Failure(Exception):
    """Raised inside compiled closures; ``Expression.evaluate`` adds the source."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _LimitExceeded(ValueError):
    """An operation would build a result over the size limits."""


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled expression.

    ``names`` are the variables it was compiled against; :meth:`evaluate` needs a value for
    each one the expression uses.  Two expressions are equal when source and names are.
    """

    source: str
    names: frozenset[str]
    _run: Evaluator = field(repr=False, compare=False)

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """Return the value of the expression for these variables.

        Any failure — a missing variable or field, a type error, a division by zero, a size
        limit, an exception from a value's own methods — is an ExpressionEvaluationError.
        """
        try:
            return self._run(variables)
        except _Failure as exc:
            raise ExpressionEvaluationError(self.source, exc.reason) from exc
        except Exception as exc:
            raise ExpressionEvaluationError(self.source, _describe(exc)) from exc

    def __reduce__(self) -> tuple[Any, ...]:
        return (_recompile, (self.source, tuple(sorted(self.names))))


def compile_expression(source: str, *, names: Iterable[str] = ("row",)) -> Expression:
    """Check and compile ``source``; ``names`` are the variables it may use.

    Raises ExpressionSyntaxError when the source does not parse, is over 4,000 characters,
    nests deeper than 50 levels or uses anything outside the language.
    """
    if isinstance(names, str):
        raise TypeError("names must be an iterable of variable names, not a str")
    allowed = frozenset(names)
    text, tree = _parse(source)
    run = _Compiler(source, text, allowed).visit(tree.body)
    return Expression(source, allowed, run)


def _recompile(source: str, names: tuple[str, ...]) -> Expression:
    return compile_expression(source, names=names)


# --------------------------------------------------------------------------- parsing


def _parse(source: object) -> tuple[str, ast.Expression]:
    if not isinstance(source, str):
        reason = f"an expression must be a string, not {type(source).__name__}"
        raise ExpressionSyntaxError(repr(source), reason)
    if len(source) > _MAX_SOURCE_LENGTH:
        reason = f"expression is {len(source):,} characters long; the limit is 4,000"
        raise ExpressionSyntaxError(source, reason)
    text = source.strip()
    if not text:
        raise ExpressionSyntaxError(source, "expression is empty")
    tree = _parse_text(source, text)
    _check_depth(source, tree)
    return text, tree


def _parse_text(source: str, text: str) -> ast.Expression:
    try:
        tree = _ast_parse(text, "eval")
    except SyntaxError as exc:
        raise ExpressionSyntaxError(source, _syntax_reason(text, exc)) from exc
    except (RecursionError, MemoryError, ValueError) as exc:
        reason = f"expression cannot be parsed ({type(exc).__name__}: {_one_line(str(exc))})"
        raise ExpressionSyntaxError(source, reason) from exc
    assert isinstance(tree, ast.Expression)
    return tree


def _ast_parse(text: str, mode: str) -> ast.AST:
    # Invalid escape sequences warn while parsing; they keep Python's meaning instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(text, mode=mode)


def _syntax_reason(text: str, exc: SyntaxError) -> str:
    statement = _statement_kind(text)
    if statement is not None:
        return f"{statement} is not allowed: an expression is expected"
    line = f"line {exc.lineno}, " if "\n" in text else ""
    where = f"{line}column {exc.offset}" if exc.offset else "end of input"
    detail = "" if exc.msg == "invalid syntax" else f": {_one_line(exc.msg)}"
    return f"invalid syntax at {where}{detail}"


_STATEMENT_KINDS: Final[Mapping[type[ast.AST], str]] = {
    ast.Import: "import statement",
    ast.ImportFrom: "import statement",
    ast.Assign: "assignment",
    ast.AugAssign: "assignment",
    ast.AnnAssign: "assignment",
    ast.FunctionDef: "function definition",
    ast.AsyncFunctionDef: "function definition",
    ast.ClassDef: "class definition",
}


def _statement_kind(text: str) -> str | None:
    """Name the statement in ``text`` when it is one (or more) statements."""
    try:
        module = _ast_parse(text, "exec")
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        return None
    assert isinstance(module, ast.Module)
    for statement in module.body:
        if not isinstance(statement, ast.Expr):
            kind = type(statement)
            return _STATEMENT_KINDS.get(kind, f"{kind.__name__.lower()} statement")
    return "more than one statement" if len(module.body) > 1 else None


def _check_depth(source: str, tree: ast.Expression) -> None:
    """Refuse trees nesting more than ``_MAX_DEPTH`` expressions (iteratively, no recursion)."""
    stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            reason = f"expression is nested too deeply (more than {_MAX_DEPTH} levels)"
            raise ExpressionSyntaxError(source, reason)
        for child in ast.iter_child_nodes(node):
            stack.append((child, depth + isinstance(child, ast.expr)))


# --------------------------------------------------------------------------- compiling

_FUNCTION_ARITY: Final[Mapping[str, tuple[int, int | None]]] = {
    "abs": (1, 1),
    "len": (1, 1),
    "lower": (1, 1),
    "max": (1, None),
    "min": (1, None),
    "round": (1, 2),
    "upper": (1, 1),
}

_FORBIDDEN_CONSTRUCTS: Final[Mapping[type[ast.AST], str]] = {
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.Lambda: "lambda",
    ast.NamedExpr: "assignment expression ':='",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.Starred: "starred expression '*'",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield from",
}

_OPERATOR_SYMBOLS: Final[Mapping[type[ast.AST], str]] = {
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
    ast.Invert: "~",
}


class _Compiler:
    """Turns a checked AST into closures; every refusal is an ExpressionSyntaxError."""

    def __init__(self, source: str, text: str, names: frozenset[str]) -> None:
        self.source = source
        self.text = text
        self.names = names

    def visit(self, node: ast.expr) -> Evaluator:
        match node:
            case ast.Constant():
                return _constant(self.constant(node))
            case ast.Name():
                return _variable(self.name(node))
            case ast.Subscript():
                return self.subscript(node)
            case ast.Slice():
                return self.slice(node)
            case ast.Call():
                return self.call(node)
            case ast.Attribute():
                raise self.error(self.attribute_reason(node))
            case ast.BinOp():
                return self.binary(node)
            case ast.UnaryOp():
                return self.unary(node)
            case ast.BoolOp():
                combine = _all_of if isinstance(node.op, ast.And) else _any_of
                return combine(self.visit_all(node.values))
            case ast.Compare():
                return self.compare(node)
            case ast.IfExp():
                return self.choice(node)
            case ast.Tuple() | ast.List() | ast.Set():
                return _CONTAINERS[type(node)](self.visit_all(node.elts), self.snippet(node))
            case ast.Dict():
                return self.dict(node)
        raise self.error(f"{self.construct(node)} is not allowed")

    def choice(self, node: ast.IfExp) -> Evaluator:
        return _choose(self.visit(node.test), self.visit(node.body), self.visit(node.orelse))

    def slice(self, node: ast.Slice) -> Evaluator:
        lower, upper = self.optional(node.lower), self.optional(node.upper)
        return _slice(lower, upper, self.optional(node.step))

    def visit_all(self, nodes: Iterable[ast.expr]) -> list[Evaluator]:
        return [self.visit(node) for node in nodes]

    def optional(self, node: ast.expr | None) -> Evaluator:
        return _constant(None) if node is None else self.visit(node)

    def error(self, reason: str) -> ExpressionSyntaxError:
        return ExpressionSyntaxError(self.source, reason)

    def snippet(self, node: ast.AST) -> str:
        segment = ast.get_source_segment(self.text, node) or ast.unparse(node)
        return _clip(_one_line(segment))

    def construct(self, node: ast.AST) -> str:
        return _FORBIDDEN_CONSTRUCTS.get(type(node), f"{type(node).__name__} expression")

    def constant(self, node: ast.Constant) -> Any:
        if node.value is Ellipsis:
            raise self.error("'...' (Ellipsis) is not allowed")
        return node.value

    def name(self, node: ast.Name) -> str:
        if node.id.startswith("__"):
            raise self.error(f"name {node.id!r} is not allowed: dunder names are forbidden")
        if node.id in self.names:
            return node.id
        if node.id in _FUNCTION_ARITY:
            raise self.error(f"function {node.id!r} must be called, as {node.id}(...)")
        available = ", ".join(sorted(self.names)) or "none"
        raise self.error(f"unknown name {node.id!r} (variables: {available})")

    def attribute_reason(self, node: ast.Attribute) -> str:
        if node.attr.startswith("__"):
            return f"attribute access '.{node.attr}' is not allowed"
        if node.attr == "get" and isinstance(node.value, ast.Name):
            name = node.value.id
            return f"'{name}.get' must be called, as {name}.get(key) or {name}.get(key, default)"
        return f"attribute access '.{node.attr}' is not allowed (only row.get(...) is)"

    def subscript(self, node: ast.Subscript) -> Evaluator:
        if isinstance(node.value, ast.Name) and isinstance(node.slice, ast.Constant):
            return _field(self.name(node.value), self.constant(node.slice))
        container, key = self.visit(node.value), self.visit(node.slice)
        if isinstance(node.value, ast.Name):
            return _index(container, key, node.value.id, "field")
        return _index(container, key, f"`{self.snippet(node.value)}`", "key")

    def call(self, node: ast.Call) -> Evaluator:
        if isinstance(node.func, ast.Name):
            return self.function_call(node.func, node)
        if isinstance(node.func, ast.Attribute):
            return self.method_call(node.func, node)
        target = self.snippet(node.func)
        raise self.error(f"calling `{target}` is not allowed (only the named functions are)")

    def arguments(self, node: ast.Call, name: str) -> list[Evaluator]:
        if node.keywords:
            raise self.error(f"keyword arguments are not allowed in calls of {name}()")
        return self.visit_all(node.args)

    def function_call(self, func: ast.Name, node: ast.Call) -> Evaluator:
        name = func.id
        if name.startswith("__"):
            raise self.error(f"name {name!r} is not allowed: dunder names are forbidden")
        if name in self.names:
            raise self.error(f"{name!r} is a variable, not a function: it cannot be called")
        if name not in _FUNCTION_ARITY:
            functions = ", ".join(_FUNCTION_ARITY)
            raise self.error(f"call of {name!r} is not allowed (functions: {functions})")
        arguments = self.arguments(node, name)
        self.check_arity(name, len(arguments), _FUNCTION_ARITY[name])
        return _call(_FUNCTIONS[name], arguments, self.snippet(node))

    def method_call(self, func: ast.Attribute, node: ast.Call) -> Evaluator:
        if func.attr.startswith("__"):
            raise self.error(f"attribute access '.{func.attr}' is not allowed")
        if func.attr != "get" or not isinstance(func.value, ast.Name):
            hint = f"; use {func.attr}(x)" if func.attr in _FUNCTION_ARITY else ""
            raise self.error(f"method call '.{func.attr}()' is not allowed{hint}")
        variable = self.name(func.value)
        arguments = self.arguments(node, f"{variable}.get")
        self.check_arity(f"{variable}.get", len(arguments), (1, 2))
        return _get(variable, arguments[0], arguments[1] if len(arguments) == 2 else None)

    def check_arity(self, name: str, count: int, arity: tuple[int, int | None]) -> None:
        low, high = arity
        if count < low or (high is not None and count > high):
            expected = f"{low}" if low == high else f"{low} or {high}" if high else f"{low}+"
            raise self.error(f"{name}() takes {expected} argument(s), {count} given")

    def binary(self, node: ast.BinOp) -> Evaluator:
        operation = _BINARY_OPERATORS.get(type(node.op))
        if operation is None:
            raise self.error(f"operator '{_OPERATOR_SYMBOLS[type(node.op)]}' is not allowed")
        left, right = self.visit(node.left), self.visit(node.right)
        return _binary(operation, left, right, self.snippet(node))

    def unary(self, node: ast.UnaryOp) -> Evaluator:
        operation = _UNARY_OPERATORS.get(type(node.op))
        if operation is None:
            raise self.error(f"operator '{_OPERATOR_SYMBOLS[type(node.op)]}' is not allowed")
        return _unary(operation, self.visit(node.operand), self.snippet(node))

    def compare(self, node: ast.Compare) -> Evaluator:
        self.check_identity(node)
        operations = [_COMPARISONS[type(op)] for op in node.ops]
        left, operands = self.visit(node.left), self.visit_all(node.comparators)
        text = self.snippet(node)
        if len(operations) > 1:
            return _compare_chain(left, list(zip(operations, operands, strict=True)), text)
        if isinstance(node.comparators[0], ast.Constant):
            return _compare_constant(operations[0], left, node.comparators[0].value, text)
        return _compare(operations[0], left, operands[0], text)

    def check_identity(self, node: ast.Compare) -> None:
        lefts = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, lefts, node.comparators, strict=False):
            if isinstance(op, ast.Is | ast.IsNot) and not (_singleton(left) or _singleton(right)):
                word = "is" if isinstance(op, ast.Is) else "is not"
                reason = f"'{word}' is only allowed with None, True or False (use '==' for values)"
                raise self.error(reason)

    def dict(self, node: ast.Dict) -> Evaluator:
        if any(key is None for key in node.keys):
            raise self.error("dict unpacking '**' is not allowed")
        keys = self.visit_all(key for key in node.keys if key is not None)
        return _dict(keys, self.visit_all(node.values), self.snippet(node))


def _singleton(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and any(node.value is value for value in _SINGLETONS)


# --------------------------------------------------------------------------- closures
# Each builder returns the function that evaluates one node.  Operands are evaluated
# outside ``try`` so that an error is reported by the innermost node that caused it.


def _constant(value: Any) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        return value

    return run


def _variable(name: str) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        try:
            return variables[name]
        except KeyError:
            raise _Failure(f"variable {name!r} was not provided") from None

    return run


def _field(name: str, key: Any) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        try:
            return variables[name][key]
        except (LookupError, TypeError) as exc:
            if name not in variables:
                raise _Failure(f"variable {name!r} was not provided") from None
            raise _Failure(_index_reason(exc, variables[name], key, name, "field")) from exc

    return run


def _index(container: Evaluator, key: Evaluator, text: str, noun: str) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        value, index = container(variables), key(variables)
        try:
            return value[index]
        except (LookupError, TypeError) as exc:
            raise _Failure(_index_reason(exc, value, index, text, noun)) from exc

    return run


def _index_reason(exc: Exception, value: Any, key: Any, text: str, noun: str) -> str:
    if isinstance(exc, KeyError):
        return f"{text} has no {noun} {_short(key)}"
    if isinstance(exc, IndexError):
        return f"index {_short(key)} is out of range for {text} ({_describe(exc)})"
    return f"cannot index {text} ({type(value).__name__}) with {_short(key)}: {_describe(exc)}"


def _get(name: str, key: Evaluator, default: Evaluator | None) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        mapping = _variable_value(variables, name)
        field_name = key(variables)
        fallback = None if default is None else default(variables)
        if type(mapping) is not dict and not isinstance(mapping, Mapping):
            raise _Failure(f"{name}.get() needs a mapping, but {name} is {type(mapping).__name__}")
        try:
            return mapping.get(field_name, fallback)
        except TypeError as exc:
            raise _Failure(f"cannot look up {_short(field_name)} in {name}: {exc}") from exc

    return run


def _variable_value(variables: Mapping[str, Any], name: str) -> Any:
    try:
        return variables[name]
    except KeyError:
        raise _Failure(f"variable {name!r} was not provided") from None


def _slice(lower: Evaluator, upper: Evaluator, step: Evaluator) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        return slice(lower(variables), upper(variables), step(variables))

    return run


def _call(function: Callable[..., Any], arguments: Sequence[Evaluator], text: str) -> Evaluator:
    if len(arguments) == 1:
        return _call_one(function, arguments[0], text)

    def run(variables: Mapping[str, Any]) -> Any:
        values = [argument(variables) for argument in arguments]
        try:
            return function(*values)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _call_one(function: Callable[[Any], Any], argument: Evaluator, text: str) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        value = argument(variables)
        try:
            return function(value)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _binary(operation: Operator, left: Evaluator, right: Evaluator, text: str) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        a, b = left(variables), right(variables)
        try:
            return operation(a, b)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _unary(operation: Callable[[Any], Any], operand: Evaluator, text: str) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        value = operand(variables)
        try:
            return operation(value)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _compare_constant(operation: Operator, left: Evaluator, constant: Any, text: str) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        value = left(variables)
        try:
            return operation(value, constant)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _compare(operation: Operator, left: Evaluator, right: Evaluator, text: str) -> Evaluator:
    return _binary(operation, left, right, text)


def _compare_chain(
    first: Evaluator, rest: Sequence[tuple[Operator, Evaluator]], text: str
) -> Evaluator:
    """``a < b < c``: each operand evaluated at most once, stopping at the first false."""

    def run(variables: Mapping[str, Any]) -> Any:
        left, result = first(variables), True
        for operation, operand in rest:
            right = operand(variables)
            try:
                result = operation(left, right)
            except Exception as exc:
                raise _Failure(_located(exc, text)) from exc
            if not result:
                return result
            left = right
        return result

    return run


def _all_of(operands: Sequence[Evaluator]) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        result = True
        for operand in operands:
            result = operand(variables)
            if not result:
                return result
        return result

    return run


def _any_of(operands: Sequence[Evaluator]) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        result = False
        for operand in operands:
            result = operand(variables)
            if result:
                return result
        return result

    return run


def _choose(test: Evaluator, body: Evaluator, orelse: Evaluator) -> Evaluator:
    def run(variables: Mapping[str, Any]) -> Any:
        return body(variables) if test(variables) else orelse(variables)

    return run


def _container(build: Callable[[list[Any]], Any]) -> Callable[[list[Evaluator], str], Evaluator]:
    def make(items: list[Evaluator], text: str) -> Evaluator:
        def run(variables: Mapping[str, Any]) -> Any:
            values = [item(variables) for item in items]
            try:
                return build(values)
            except Exception as exc:
                raise _Failure(_located(exc, text)) from exc

        return run

    return make


def _dict(keys: Sequence[Evaluator], values: Sequence[Evaluator], text: str) -> Evaluator:
    pairs = list(zip(keys, values, strict=True))

    def run(variables: Mapping[str, Any]) -> Any:
        result: dict[Any, Any] = {}
        for key, value in pairs:
            item_key, item_value = key(variables), value(variables)
            try:
                result[item_key] = item_value
            except Exception as exc:
                raise _Failure(_located(exc, text)) from exc
        return result

    return run


_CONTAINERS: Final[Mapping[type[ast.AST], Callable[[list[Evaluator], str], Evaluator]]] = {
    ast.Tuple: _container(tuple),
    ast.List: _container(list),
    ast.Set: _container(set),
}


# --------------------------------------------------------------------------- operations
# Bounded versions of the operators and functions that can build huge results.


def _add(a: Any, b: Any) -> Any:
    result = a + b
    if isinstance(result, _SEQUENCES) and len(result) > _MAX_LENGTH:
        raise _LimitExceeded(f"concatenation would have {len(result):,} items ({_length_limit()})")
    return result


def _multiply(a: Any, b: Any) -> Any:
    if isinstance(b, int):
        _check_product(a, b)
    if isinstance(a, int):
        _check_product(b, a)
    return a * b


def _check_product(value: Any, count: int) -> None:
    if isinstance(value, int):
        if value.bit_length() + count.bit_length() > _MAX_INT_BITS:
            raise _LimitExceeded(f"integer product would be too large ({_int_limit()})")
    elif isinstance(value, _SEQUENCES) and len(value) * count > _MAX_LENGTH:
        raise _LimitExceeded(
            f"repetition would have {_short(len(value) * count)} items ({_length_limit()})"
        )


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(exponent, int) and not isinstance(base, float | complex):
        _check_power(base, exponent)
    return base**exponent


def _check_power(base: Any, exponent: int) -> None:
    if abs(exponent) > _MAX_EXPONENT:
        raise _LimitExceeded(f"exponent {_short(exponent)} is over the limit of {_MAX_EXPONENT:,}")
    if isinstance(base, int) and abs(base) > 1 and math.log2(abs(base)) * exponent > _MAX_INT_BITS:
        raise _LimitExceeded(f"power would be too large ({_int_limit()})")


def _modulo(a: Any, b: Any) -> Any:
    if isinstance(a, str | bytes | bytearray):
        raise TypeError("string formatting with '%' is not allowed")
    return a % b


def _round(number: Any, digits: Any = None) -> Any:
    if digits is None:
        return round(number)
    if isinstance(digits, int) and abs(digits) > _MAX_ROUND_DIGITS:
        raise _LimitExceeded(f"round() digits must be within ±{_MAX_ROUND_DIGITS:,}")
    return round(number, digits)


def _lower(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"lower() needs a string, not {type(text).__name__}")
    return text.lower()


def _upper(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"upper() needs a string, not {type(text).__name__}")
    return text.upper()


def _is_in(item: Any, container: Any) -> bool:
    return item in container


def _is_not_in(item: Any, container: Any) -> bool:
    return item not in container


def _length_limit() -> str:
    return f"the limit is {_MAX_LENGTH:,}"


def _int_limit() -> str:
    return f"the limit is {_MAX_INT_BITS:,} bits"


_FUNCTIONS: Final[Mapping[str, Callable[..., Any]]] = {
    "abs": abs,
    "len": len,
    "lower": _lower,
    "max": max,
    "min": min,
    "round": _round,
    "upper": _upper,
}

_BINARY_OPERATORS: Final[Mapping[type[ast.AST], Operator]] = {
    ast.Add: _add,
    ast.Sub: operator.sub,
    ast.Mult: _multiply,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: _modulo,
    ast.Pow: _power,
}

_UNARY_OPERATORS: Final[Mapping[type[ast.AST], Callable[[Any], Any]]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Not: operator.not_,
}

_COMPARISONS: Final[Mapping[type[ast.AST], Operator]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: _is_in,
    ast.NotIn: _is_not_in,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


# --------------------------------------------------------------------------- messages

_REPR: Final = reprlib.Repr()
_REPR.maxstring = 40
_REPR.maxother = 40


def _short(value: Any) -> str:
    """A bounded repr: never huge, never raising (huge ints have no decimal repr)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<int of {value.bit_length():,} bits>"
    try:
        return _REPR.repr(value)
    except Exception as exc:  # a value's own __repr__ may fail; describe it instead
        return f"<{type(value).__name__} object (repr failed: {type(exc).__name__})>"


def _describe(exc: BaseException) -> str:
    text = _one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, OverflowError):
        text = f"numeric overflow ({_one_line(str(exc.args[-1]))})" if exc.args else "overflow"
    elif isinstance(exc, RecursionError | MemoryError):
        text = f"{type(exc).__name__}: {text}"
    return _clip(text)


def _located(exc: Exception, text: str) -> str:
    return f"{_describe(exc)} in `{text}`"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str) -> str:
    if len(text) <= _SNIPPET_LENGTH:
        return text
    return text[: _SNIPPET_LENGTH - 3] + "..."
