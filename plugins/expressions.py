"""The safe expression language of gates, filters, computed fields and aggregation triggers.

An expression is one Python expression from a small whitelist: literals (numbers, strings,
bytes, ``True``/``False``/``None``, tuples, lists, dicts, sets), the variables it is compiled
with (``row``; aggregation triggers also get ``batch_count`` and ``batch_age_seconds``),
indexing and slicing, ``row.get(key)`` / ``row.get(key, default)``, comparisons (chained,
``in``, ``is None``), ``and``/``or``/``not``, arithmetic (``+ - * / // % **``),
``a if c else b`` and the functions ``abs len lower max min round upper``.  Everything
else — any other attribute or call, dunder names, comprehensions, lambdas, ``:=``,
f-strings, starred arguments, keyword arguments, bitwise operators, statements — is
refused at compile time.  ``is`` compares only with ``None``, ``True`` or ``False``; ``%``
does not format strings.  :data:`GRAMMAR` and :data:`FUNCTIONS` spell the language out.

The source is parsed with :mod:`ast` and compiled once into a tree of closures; nothing is
ever handed to ``eval``, ``exec`` or ``compile``.  Sources are at most 4,000 characters and
50 levels deep.

Evaluation runs under a budget (:data:`LIMITS` lists every limit), so that no expression
and no row can make one evaluation hang, or take more than a few tens of milliseconds of
CPU and a few tens of megabytes:

- **steps**: at most 250,000 per evaluation.  Each node of the expression costs 32 up
  front.  Comparing, testing membership in, hashing, and taking ``min``/``max`` of strings
  and containers costs what the operation may walk: 16 steps per list, tuple, set or dict,
  one per item (nested items included, a value shared by several containers counted each
  time) and one per 32 characters.  The value of the expression is measured the same
  way, since the caller walks it to record it.  The walk that measures stops as soon as
  the budget is spent, and it happens before the operation it pays for.
- **memory**: at most 32 MiB (33,554,432 bytes) of new strings and sequences per
  evaluation (concatenation, repetition, slicing, ``lower``/``upper``; each node's first
  KiB is paid up front), and at most 1,000,000 items in any one sequence made by
  concatenation or repetition.
- **nesting**: a value compared, hashed, searched or returned nests at most 200 levels.
- **integers**: exponents at most 10,000 (unless the base is a float), integer products
  and powers at most 14,000 bits; ``round()`` digits within ±1,000.

Going over a limit is an ExpressionEvaluationError whose reason names the limit: an error
of that row, routed by the node's ``on_error`` like any other.

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
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any, Final

Evaluator = Callable[[Mapping[str, Any], list[int]], Any]
Operator = Callable[[Any, Any], Any]
#: An operator that charges the evaluation's budget (its third argument) for its work.
ChargedOperator = Callable[[Any, Any, list[int]], Any]
#: The steps an operation on these two operands costs (any walk made to know is charged).
Steps = Callable[[Any, Any, list[int]], int]

__all__ = [
    "FUNCTIONS",
    "GRAMMAR",
    "LIMITS",
    "Expression",
    "ExpressionError",
    "ExpressionEvaluationError",
    "ExpressionSyntaxError",
    "Function",
    "Limit",
    "compile_expression",
]

# --------------------------------------------------------------------------- limits

MAX_SOURCE_LENGTH: Final = 4_000
MAX_DEPTH: Final = 50
MAX_STEPS: Final = 250_000
CHARACTERS_PER_STEP: Final = 32
CONTAINER_STEPS: Final = 16
MAX_MEMORY: Final = 32 * 1024 * 1024
MAX_LENGTH: Final = 1_000_000
MAX_EXPONENT: Final = 10_000
MAX_INT_BITS: Final = 14_000  # about 4,200 digits: every result still converts to str
MAX_ROUND_DIGITS: Final = 1_000
MAX_NESTING: Final = 200  # well within the recursion Python's comparisons and hashes allow


@dataclass(frozen=True, slots=True)
class Limit:
    """One bound on compiling or evaluating, as the reference documents it."""

    name: str
    value: int
    unit: str
    meaning: str


#: Every node of an expression is charged these up front, at compile time: they pay for
#: its own small operations, which then need no accounting at all.
_NODE_STEPS: Final = 32
_NODE_BYTES: Final = 1024

LIMITS: Final[tuple[Limit, ...]] = (
    Limit("source length", MAX_SOURCE_LENGTH, "characters", "Longest expression source."),
    Limit("nesting depth", MAX_DEPTH, "levels", "Deepest nesting of sub-expressions."),
    Limit(
        "steps",
        MAX_STEPS,
        "per evaluation",
        f"Work of one evaluation. Each node of the expression costs {_NODE_STEPS} up "
        "front. Comparisons, `in`, hashing (set items, dict keys, lookups with a computed "
        "key) and `min`/`max` cost what they may walk: "
        f"{CONTAINER_STEPS} per list, tuple, set or dict, one per item (nested items "
        "included, a value shared by several containers counted each time) and one per "
        f"{CHARACTERS_PER_STEP} characters of a string or bytes. The value of the "
        "expression is measured the same way.",
    ),
    Limit(
        "memory",
        MAX_MEMORY,
        "bytes per evaluation",
        "New strings and sequences one evaluation may build in all (concatenation, "
        "repetition, slicing, `lower`, `upper`): 8 bytes per list or tuple item, 1 per "
        "ASCII character or byte, 4 per other character (12 for `lower`/`upper`, which "
        f"may turn one into three). Each node's first {_NODE_BYTES:,} bytes are paid up "
        "front.",
    ),
    Limit(
        "sequence length",
        MAX_LENGTH,
        "items",
        "Longest string, bytes, list or tuple one concatenation or repetition may build.",
    ),
    Limit(
        "exponent",
        MAX_EXPONENT,
        "",
        "Largest `abs(exponent)` of an integer `**`, unless the base is a float.",
    ),
    Limit("integer size", MAX_INT_BITS, "bits", "Largest result of an integer `*` or `**`."),
    Limit("round digits", MAX_ROUND_DIGITS, "", "Largest `abs(digits)` of `round(x, digits)`."),
    Limit(
        "value nesting",
        MAX_NESTING,
        "levels",
        "Deepest nesting of lists, tuples, sets and dicts in a value that is compared, "
        "hashed, searched, passed to `min`/`max` or returned.",
    ),
)

_SNIPPET_LENGTH: Final = 80
_SHOWN_BITS: Final = 128  # integers up to this size are shown in full in messages
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
    """An operation would go over one of the evaluation limits."""


# --------------------------------------------------------------------------- budget

_ATOMS: Final[frozenset[type]] = frozenset({bool, int, float, complex, type(None)})
_TEXTS: Final[frozenset[type]] = frozenset({str, bytes, bytearray})
_SETS: Final[frozenset[type]] = frozenset({set, frozenset})
_COLLECTIONS: Final[frozenset[type]] = frozenset({list, tuple, dict, set, frozenset})
_MEASURED: Final[frozenset[type]] = _TEXTS | _COLLECTIONS
_SMALL_CONTAINER: Final = 16  # up to this size, a plain loop beats C iterator pipelines
_POINTER_SIZE: Final = 8
_WIDEST_CHARACTER: Final = 4
# An ASCII string keeps its size in lower/upper case; another may grow to three
# characters of 4 bytes each per character.
_CASE_GROWTH: Final = 3 * _WIDEST_CHARACTER
_SMALL_TEXT: Final = _NODE_BYTES // _WIDEST_CHARACTER
_SMALL_CASE: Final = _NODE_BYTES // _CASE_GROWTH


#: What one evaluation may still spend, and its limits: ``[steps, bytes, step limit, byte
#: limit]`` — a list, not an object, as one is made per evaluation and a list is the
#: cheapest to make.  Every charge is made before the work it pays for, and raises
#: _LimitExceeded instead of going below zero.  Prompt templates keep theirs the same way
#: and share the measuring below.
_Budget = list[int]
_STEPS: Final = 0
_MEMORY: Final = 1
_STEP_LIMIT: Final = 2
_MEMORY_LIMIT: Final = 3


def _spend(budget: _Budget, cost: int, what: str) -> None:
    """Take ``cost`` steps, or raise when fewer are left."""
    if cost > budget[_STEPS]:
        raise _LimitExceeded(f"{what} would exceed the limit of {budget[_STEP_LIMIT]:,} steps")
    budget[_STEPS] -= cost


def _measure(budget: _Budget, value: Any, what: str) -> int:
    """Walk ``value`` (no further than the steps left) and spend the walk's size."""
    cost = _size(value, budget[_STEPS])
    _spend(budget, cost, what)
    return cost


def _allocate(budget: _Budget, size: int, what: str) -> None:
    """Take ``size`` bytes of new strings or sequences, or raise when fewer are left."""
    if size > budget[_MEMORY]:
        limit = budget[_MEMORY_LIMIT]
        raise _LimitExceeded(f"{what} would exceed the limit of {limit:,} bytes built")
    budget[_MEMORY] -= size


def _allocate_over(budget: _Budget, size: int, what: str) -> None:
    """Allocate ``size`` bytes unless the node's own share covers them."""
    if size > _NODE_BYTES:
        _allocate(budget, size, what)


#: Passed through expressions that never charge anything (their every operation is
#: bounded by the source's size); empty, so that a charge made by mistake fails loudly.
_IDLE: Final[_Budget] = [0, 0, MAX_STEPS, MAX_MEMORY]


def _size(value: Any, limit: int) -> int:
    """The steps a walk through ``value`` takes, or a partial count over ``limit``.

    ``CONTAINER_STEPS`` for each list, tuple, set or dict in it, one for each of their
    items (a dict's keys and values both count), one per ``CHARACTERS_PER_STEP``
    characters of the strings and bytes values; a value found several times counts each
    time, as a comparison would visit it each time.  The walk goes level by level (no
    recursion) and returns as soon as the count passes ``limit``: it never costs more.
    Raises _LimitExceeded when containers nest more than ``MAX_NESTING`` levels deep.
    """
    kind = type(value)
    if kind in _TEXTS:
        return 1 + len(value) // CHARACTERS_PER_STEP
    if kind not in _COLLECTIONS:
        return 1  # a number, None, or another object (a date, say)
    total = 1
    level = [value]
    for _ in range(MAX_NESTING):
        below: list[Any] = []
        for item in level:
            if type(item) is dict:
                total += CONTAINER_STEPS + 2 * len(item)
                if total <= limit:
                    total += _push_nested(item, below) + _push_nested(item.values(), below)
            else:
                total += CONTAINER_STEPS + len(item)
                if total <= limit:
                    total += _push_nested(item, below)
            if total > limit:
                return total
        if not below:
            return total
        level = below
    raise _LimitExceeded(f"a value nested more than {MAX_NESTING} levels deep is over the limit")


def _push_nested(items: Collection[Any], stack: list[Any]) -> int:
    """Push the containers among ``items`` onto ``stack``; return their strings' steps."""
    if len(items) <= _SMALL_CONTAINER:
        extra = 0
        for item in items:
            kind = type(item)
            if kind in _TEXTS:
                extra += len(item)
            elif kind in _COLLECTIONS:
                stack.append(item)
        return extra // CHARACTERS_PER_STEP
    # A big one at C speed (``map``, ``compress``): this runs for every item walked.
    values = items if isinstance(items, list | tuple) else list(items)
    kinds = set(map(type, values))
    if kinds <= _ATOMS:
        return 0
    extra = 0
    if not kinds.isdisjoint(_TEXTS):
        texts = values if kinds <= _TEXTS else _of_kinds(values, _TEXTS)
        extra = sum(map(len, texts)) // CHARACTERS_PER_STEP
    if not kinds.isdisjoint(_COLLECTIONS):
        stack.extend(_of_kinds(values, _COLLECTIONS))
    return extra


def _of_kinds(items: Sequence[Any], kinds: frozenset[type]) -> Iterable[Any]:
    return compress(items, map(kinds.__contains__, map(type, items)))


def _charge_pair(a: Any, b: Any, budget: _Budget) -> int:
    """Charge comparing ``a`` and ``b`` item by item: at most the smaller one's size.

    The operand with fewer top-level items is walked first; the other only as far.
    Returns 0: nothing is left to charge.
    """
    first, second = (a, b) if len(a) <= len(b) else (b, a)
    size = _measure(budget, first, "comparison")
    _spend(budget, min(_size(second, size), size), "comparison")
    return 0


# Each ``*_steps`` function returns the steps an operation on these operands still costs,
# having charged any walk it made to find out.


def _equality_steps(a: Any, b: Any, budget: _Budget) -> int:
    """``a == b`` (or ``!=``): nothing when types or lengths differ, the answer is immediate."""
    kind, other = type(a), type(b)
    if kind not in _MEASURED or other not in _MEASURED:
        return 0
    if kind is not other and not (kind in _SETS and other in _SETS):
        return 0
    if len(a) != len(b):
        return 0
    if kind in _TEXTS:
        return 1 + len(a) // CHARACTERS_PER_STEP
    return _charge_pair(a, b, budget)


def _order_steps(a: Any, b: Any, budget: _Budget) -> int:
    """``a < b`` (and ``<=``, ``>``, ``>=``): lexicographic, up to the smaller size."""
    if type(a) not in _MEASURED or type(b) not in _MEASURED:
        return 0
    if type(a) in _TEXTS and type(b) in _TEXTS:
        return 1 + min(len(a), len(b)) // CHARACTERS_PER_STEP
    return _charge_pair(a, b, budget)


def _containment_steps(item: Any, container: Any, budget: _Budget) -> int:
    """``item in container``: a hash for dicts and sets, a scan for the others."""
    kind = type(container)
    if kind is list or kind is tuple:
        item_kind = type(item)
        if item_kind in _ATOMS or (item_kind is str and len(item) < CHARACTERS_PER_STEP):
            return 1 + len(container)  # comparing such an item takes one step
        _measure(budget, container, "comparison")
        return 0
    if kind in _TEXTS:
        if type(item) not in _TEXTS:
            return 0
        return 1 + (len(container) + len(item)) // CHARACTERS_PER_STEP
    if kind in _ATOMS:
        return 0
    return _hash_steps(item, budget)  # dicts, sets and other containers hash the item


def _hash_steps(key: Any, budget: _Budget) -> int:
    """Hashing ``key`` (a set item, a dict key, a lookup); lists and dicts cannot be."""
    kind = type(key)
    if kind in _TEXTS:
        return 1 + len(key) // CHARACTERS_PER_STEP
    if kind is tuple or kind is frozenset:
        _measure(budget, key, "hashing")
    return 0


def _charge_hash(key: Any, budget: _Budget) -> None:
    steps = _hash_steps(key, budget)
    if steps > _NODE_STEPS:
        _spend(budget, steps, "hashing")


def _width(value: Any) -> int | None:
    """Bytes per item of a new sequence like ``value``; None when it is not a sequence."""
    kind = type(value)
    if kind is str:
        return 1 if value.isascii() else _WIDEST_CHARACTER
    if kind is list or kind is tuple:
        return _POINTER_SIZE
    if kind is bytes or kind is bytearray:
        return 1
    return None


def _check_length(count: int, what: str) -> None:
    if count > MAX_LENGTH:
        shown = f"{count:,}" if count.bit_length() <= _SHOWN_BITS else _short(count)
        raise _LimitExceeded(f"{what} would have {shown} items ({_length_limit()})")


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
    #: The budget left for the operations once every node has had its share.
    _steps: int = field(default=MAX_STEPS, repr=False, compare=False)
    _memory: int = field(default=MAX_MEMORY, repr=False, compare=False)
    #: Whether any operation charges the budget (else the idle one is passed).
    _accounted: bool = field(default=True, repr=False, compare=False)

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """Return the value of the expression for these variables.

        Any failure — a missing variable or field, a type error, a division by zero, a
        limit (:data:`LIMITS`), an exception from a value's own methods — is an
        ExpressionEvaluationError.  Within the limits, one evaluation takes a few tens of
        milliseconds at most, whatever the expression and the variables.
        """
        budget = [self._steps, self._memory, MAX_STEPS, MAX_MEMORY] if self._accounted else _IDLE
        try:
            value = self._run(variables, budget)
            if value is not True and value is not False:  # a condition's value: nothing to do
                kind = type(value)
                if kind not in _ATOMS and (kind is not str or len(value) >= CHARACTERS_PER_STEP):
                    self._measure_value(value, budget)
        except _Failure as exc:
            raise ExpressionEvaluationError(self.source, exc.reason) from exc
        except Exception as exc:
            raise ExpressionEvaluationError(self.source, _describe(exc)) from exc
        return value

    def _measure_value(self, value: Any, budget: _Budget) -> None:
        """Charge the value of the expression: the caller walks it to record, hash or
        print it.  (A number or a short string is covered by the nodes' own steps.)"""
        if budget is _IDLE:
            budget = [self._steps, self._memory, MAX_STEPS, MAX_MEMORY]
        _measure(budget, value, "the value of the expression")

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
    compiler = _Compiler(source, text, allowed)
    run = compiler.visit(tree.body)
    steps = MAX_STEPS - compiler.nodes * _NODE_STEPS
    memory = MAX_MEMORY - compiler.nodes * _NODE_BYTES
    return Expression(source, allowed, run, steps, memory, compiler.accounted)


def _recompile(source: str, names: tuple[str, ...]) -> Expression:
    return compile_expression(source, names=names)


# --------------------------------------------------------------------------- parsing


def _parse(source: object) -> tuple[str, ast.Expression]:
    if not isinstance(source, str):
        reason = f"an expression must be a string, not {type(source).__name__}"
        raise ExpressionSyntaxError(repr(source), reason)
    if len(source) > MAX_SOURCE_LENGTH:
        reason = (
            f"expression is {len(source):,} characters long; the limit is {MAX_SOURCE_LENGTH:,}"
        )
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
    """Refuse trees nesting more than ``MAX_DEPTH`` expressions (iteratively, no recursion)."""
    stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            reason = f"expression is nested too deeply (more than {MAX_DEPTH} levels)"
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
    """Turns a checked AST into closures; every refusal is an ExpressionSyntaxError.

    ``nodes`` counts the closures built (each is one step of every evaluation);
    ``accounted`` tells whether any of them charges the evaluation's budget.
    """

    def __init__(self, source: str, text: str, names: frozenset[str]) -> None:
        self.source = source
        self.text = text
        self.names = names
        self.nodes = 0
        self.accounted = False

    def visit(self, node: ast.expr) -> Evaluator:
        self.nodes += 1
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
            case ast.Tuple() | ast.List():
                build = tuple if isinstance(node, ast.Tuple) else list
                return _sequence(build, self.visit_all(node.elts))
            case ast.Set():
                return self.charged(_set(self.visit_all(node.elts), self.snippet(node)))
            case ast.Dict():
                return self.dict(node)
        raise self.error(f"{self.construct(node)} is not allowed")

    def charged(self, run: Evaluator) -> Evaluator:
        """``run``, noting that it charges the budget."""
        self.accounted = True
        return run

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
            self.nodes += 2
            return _field(self.name(node.value), self.constant(node.slice))
        container, key = self.visit(node.value), self.visit(node.slice)
        if isinstance(node.value, ast.Name):
            return self.charged(_index(container, key, node.value.id, "field"))
        return self.charged(_index(container, key, f"`{self.snippet(node.value)}`", "key"))

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
        text = self.snippet(node)
        if name in _CHARGED_FUNCTIONS:
            return self.charged(_charged_call(_CHARGED_FUNCTIONS[name], arguments, text))
        return _call(_PLAIN_FUNCTIONS[name], arguments, text)

    def method_call(self, func: ast.Attribute, node: ast.Call) -> Evaluator:
        if func.attr.startswith("__"):
            raise self.error(f"attribute access '.{func.attr}' is not allowed")
        if func.attr != "get" or not isinstance(func.value, ast.Name):
            hint = f"; use {func.attr}(x)" if func.attr in _FUNCTION_ARITY else ""
            raise self.error(f"method call '.{func.attr}()' is not allowed{hint}")
        variable = self.name(func.value)
        arguments = self.arguments(node, f"{variable}.get")
        self.check_arity(f"{variable}.get", len(arguments), (1, 2))
        default = arguments[1] if len(arguments) == 2 else None
        if isinstance(node.args[0], ast.Constant):
            return _get(variable, arguments[0], default, hashed=False)
        return self.charged(_get(variable, arguments[0], default, hashed=True))

    def check_arity(self, name: str, count: int, arity: tuple[int, int | None]) -> None:
        low, high = arity
        if count < low or (high is not None and count > high):
            expected = f"{low}" if low == high else f"{low} or {high}" if high else f"{low}+"
            raise self.error(f"{name}() takes {expected} argument(s), {count} given")

    def binary(self, node: ast.BinOp) -> Evaluator:
        kind = type(node.op)
        left, right = self.visit(node.left), self.visit(node.right)
        text = self.snippet(node)
        if kind in _CHARGED_OPERATORS and not _numeric_operand(node):
            return self.charged(_charged_binary(_CHARGED_OPERATORS[kind], left, right, text))
        operation = _BINARY_OPERATORS.get(kind)
        if operation is None:
            raise self.error(f"operator '{_OPERATOR_SYMBOLS[kind]}' is not allowed")
        return _binary(operation, left, right, text)

    def unary(self, node: ast.UnaryOp) -> Evaluator:
        operation = _UNARY_OPERATORS.get(type(node.op))
        if operation is None:
            raise self.error(f"operator '{_OPERATOR_SYMBOLS[type(node.op)]}' is not allowed")
        return _unary(operation, self.visit(node.operand), self.snippet(node))

    def compare(self, node: ast.Compare) -> Evaluator:
        self.check_identity(node)
        comparisons = [_COMPARISONS[type(op)] for op in node.ops]
        left, operands = self.visit(node.left), self.visit_all(node.comparators)
        text = self.snippet(node)
        if len(comparisons) > 1:
            steps = [(operation, cost, operand) for (operation, cost), operand in
                     zip(comparisons, operands, strict=True)]  # fmt: skip
            return self.charged(_compare_chain(left, steps, text))
        (operation, cost), right = comparisons[0], node.comparators[0]
        if _is_static(right):
            # Bounded by the constant's size, whatever the other operand: nothing to charge.
            return _compare_constant(operation, left, _static_value(right), text)
        if cost is None:
            return _binary(operation, left, operands[0], text)
        return self.charged(_compare(operation, cost, left, operands[0], text))

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
        return self.charged(_dict(keys, self.visit_all(node.values), self.snippet(node)))


def _numeric_operand(node: ast.BinOp) -> bool:
    """Whether a constant operand makes ``+``, ``-`` or ``*`` plain arithmetic.

    With a number on either side, ``+`` and ``-`` never concatenate nor take set
    differences; with a float or complex one, ``*`` never repeats a sequence nor
    multiplies integers.
    """
    kinds = (float, complex) if isinstance(node.op, ast.Mult) else (int, float, complex)
    return any(
        isinstance(operand, ast.Constant) and type(operand.value) in kinds
        for operand in (node.left, node.right)
    )


def _is_static(node: ast.expr) -> bool:
    """Whether ``node`` is a number, string or bytes constant, a set display of such
    constants, or a tuple or list display of static nodes."""
    if isinstance(node, ast.Tuple | ast.List):
        return all(_is_static(item) for item in node.elts)
    if isinstance(node, ast.Set):
        return all(_is_constant(item) for item in node.elts)
    return _is_constant(node)


def _is_constant(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in _ATOMS | _TEXTS


def _static_value(node: ast.expr) -> Any:
    """The value of a static node, built once: it is only ever compared with, never returned
    (a set is frozen so that it hashes what it is compared with as a set would)."""
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        build = {ast.Tuple: tuple, ast.List: list, ast.Set: frozenset}[type(node)]
        return build(_static_value(item) for item in node.elts)
    assert isinstance(node, ast.Constant)
    return node.value


def _singleton(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and any(node.value is value for value in _SINGLETONS)


# --------------------------------------------------------------------------- closures
# Each builder returns the function that evaluates one node.  Operands are evaluated
# outside ``try`` so that an error is reported by the innermost node that caused it;
# every charge is made inside it, before the operation it pays for.


def _constant(value: Any) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        return value

    return run


def _variable(name: str) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        try:
            return variables[name]
        except KeyError:
            raise _Failure(f"variable {name!r} was not provided") from None

    return run


def _field(name: str, key: Any) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        try:
            return variables[name][key]
        except (LookupError, TypeError) as exc:
            if name not in variables:
                raise _Failure(f"variable {name!r} was not provided") from None
            raise _Failure(_index_reason(exc, variables[name], key, name, "field")) from exc

    return run


def _index(container: Evaluator, key: Evaluator, text: str, noun: str) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        value, index = container(variables, budget), key(variables, budget)
        try:
            _charge_index(value, index, budget)
        except _LimitExceeded as exc:
            raise _Failure(_located(exc, text)) from exc
        try:
            return value[index]
        except (LookupError, TypeError) as exc:
            raise _Failure(_index_reason(exc, value, index, text, noun)) from exc

    return run


def _charge_index(value: Any, index: Any, budget: _Budget) -> None:
    """Charge ``value[index]``: the hash of a computed key, or the copy a slice makes."""
    if type(index) is slice:
        width = _width(value)
        if width is not None:
            try:
                count = len(range(*index.indices(len(value))))
            except (TypeError, ValueError):
                return  # the indexing itself fails, with the same error
            _allocate_over(budget, count * width, "slicing")
    elif type(index) not in _ATOMS:
        _charge_hash(index, budget)


def _index_reason(exc: Exception, value: Any, key: Any, text: str, noun: str) -> str:
    if isinstance(exc, KeyError):
        return f"{text} has no {noun} {_short(key)}"
    if isinstance(exc, IndexError):
        return f"index {_short(key)} is out of range for {text} ({_describe(exc)})"
    return f"cannot index {text} ({type(value).__name__}) with {_short(key)}: {_describe(exc)}"


def _get(name: str, key: Evaluator, default: Evaluator | None, *, hashed: bool) -> Evaluator:
    """``name.get(key[, default])``; ``hashed``: the key is computed, its hash is charged."""

    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        mapping = _variable_value(variables, name)
        field_name = key(variables, budget)
        fallback = None if default is None else default(variables, budget)
        if type(mapping) is not dict and not isinstance(mapping, Mapping):
            raise _Failure(f"{name}.get() needs a mapping, but {name} is {type(mapping).__name__}")
        try:
            if hashed:
                _charge_hash(field_name, budget)
            return mapping.get(field_name, fallback)
        except (TypeError, _LimitExceeded) as exc:
            raise _Failure(f"cannot look up {_short(field_name)} in {name}: {exc}") from exc

    return run


def _variable_value(variables: Mapping[str, Any], name: str) -> Any:
    try:
        return variables[name]
    except KeyError:
        raise _Failure(f"variable {name!r} was not provided") from None


def _slice(lower: Evaluator, upper: Evaluator, step: Evaluator) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        return slice(lower(variables, budget), upper(variables, budget), step(variables, budget))

    return run


def _call(function: Callable[..., Any], arguments: Sequence[Evaluator], text: str) -> Evaluator:
    if len(arguments) == 1:
        return _call_one(function, arguments[0], text)

    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        values = [argument(variables, budget) for argument in arguments]
        try:
            return function(*values)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _call_one(function: Callable[[Any], Any], argument: Evaluator, text: str) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        value = argument(variables, budget)
        try:
            return function(value)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _charged_call(
    function: Callable[..., Any], arguments: Sequence[Evaluator], text: str
) -> Evaluator:
    """A call of a function that charges the budget (its first argument) for its work."""
    if len(arguments) == 1:
        return _charged_call_one(function, arguments[0], text)

    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        values = [argument(variables, budget) for argument in arguments]
        try:
            return function(budget, *values)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _charged_call_one(
    function: Callable[[_Budget, Any], Any], argument: Evaluator, text: str
) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        value = argument(variables, budget)
        try:
            return function(budget, value)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _binary(operation: Operator, left: Evaluator, right: Evaluator, text: str) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        a, b = left(variables, budget), right(variables, budget)
        try:
            return operation(a, b)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _charged_binary(
    operation: ChargedOperator, left: Evaluator, right: Evaluator, text: str
) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        a, b = left(variables, budget), right(variables, budget)
        try:
            return operation(a, b, budget)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _unary(operation: Callable[[Any], Any], operand: Evaluator, text: str) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        value = operand(variables, budget)
        try:
            return operation(value)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _compare_constant(operation: Operator, left: Evaluator, constant: Any, text: str) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        value = left(variables, budget)
        try:
            return operation(value, constant)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _compare(
    operation: Operator, cost: Steps, left: Evaluator, right: Evaluator, text: str
) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        a, b = left(variables, budget), right(variables, budget)
        try:
            steps = cost(a, b, budget)
            if steps > _NODE_STEPS:  # else covered by the node's own steps
                _spend(budget, steps, "comparison")
            return operation(a, b)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _compare_chain(
    first: Evaluator, rest: Sequence[tuple[Operator, Steps | None, Evaluator]], text: str
) -> Evaluator:
    """``a < b < c``: each operand evaluated at most once, stopping at the first false."""

    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        left, result = first(variables, budget), True
        for operation, cost, operand in rest:
            right = operand(variables, budget)
            try:
                steps = 0 if cost is None else cost(left, right, budget)
                if steps > _NODE_STEPS:  # else covered by the node's own steps
                    _spend(budget, steps, "comparison")
                result = operation(left, right)
            except Exception as exc:
                raise _Failure(_located(exc, text)) from exc
            if not result:
                return result
            left = right
        return result

    return run


def _all_of(operands: Sequence[Evaluator]) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        result = True
        for operand in operands:
            result = operand(variables, budget)
            if not result:
                return result
        return result

    return run


def _any_of(operands: Sequence[Evaluator]) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        result = False
        for operand in operands:
            result = operand(variables, budget)
            if result:
                return result
        return result

    return run


def _choose(test: Evaluator, body: Evaluator, orelse: Evaluator) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        return body(variables, budget) if test(variables, budget) else orelse(variables, budget)

    return run


def _sequence(build: Callable[[list[Any]], Any], items: list[Evaluator]) -> Evaluator:
    """A tuple or list display: as many items as the source has, nothing to charge."""

    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        return build([item(variables, budget) for item in items])

    return run


def _set(items: list[Evaluator], text: str) -> Evaluator:
    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        values = [item(variables, budget) for item in items]
        try:
            for value in values:
                _charge_hash(value, budget)
            return set(values)
        except Exception as exc:
            raise _Failure(_located(exc, text)) from exc

    return run


def _dict(keys: Sequence[Evaluator], values: Sequence[Evaluator], text: str) -> Evaluator:
    pairs = list(zip(keys, values, strict=True))

    def run(variables: Mapping[str, Any], budget: _Budget) -> Any:
        result: dict[Any, Any] = {}
        for key, value in pairs:
            item_key, item_value = key(variables, budget), value(variables, budget)
            try:
                _charge_hash(item_key, budget)
                result[item_key] = item_value
            except Exception as exc:
                raise _Failure(_located(exc, text)) from exc
        return result

    return run


# --------------------------------------------------------------------------- operations
# The operators and functions that can build big results or do work in proportion to
# their operands' size, each charging the budget before it does that work.


def _add(a: Any, b: Any, budget: _Budget) -> Any:
    kind = type(a)
    if kind in _ATOMS or (kind is str and type(b) is str and len(a) + len(b) <= _SMALL_TEXT):
        return a + b
    width, other = _width(a), _width(b)
    if width is not None and other is not None:
        count = len(a) + len(b)
        _check_length(count, "concatenation")
        _allocate_over(budget, count * max(width, other), "concatenation")
    return a + b


def _subtract(a: Any, b: Any, budget: _Budget) -> Any:
    if type(a) in _SETS and type(b) in _SETS:
        _charge_pair(a, b, budget)
    return a - b


def _multiply(a: Any, b: Any, budget: _Budget) -> Any:
    if isinstance(b, int):
        _check_product(a, b, budget)
    if isinstance(a, int):
        _check_product(b, a, budget)
    return a * b


def _check_product(value: Any, count: int, budget: _Budget) -> None:
    if isinstance(value, int):
        if value.bit_length() + count.bit_length() > MAX_INT_BITS:
            raise _LimitExceeded(f"integer product would be too large ({_int_limit()})")
        return
    width = _width(value)
    if width is not None:
        items = len(value) * max(count, 0)
        _check_length(items, "repetition")
        _allocate_over(budget, items * width, "repetition")


def _power(base: Any, exponent: Any) -> Any:
    if isinstance(exponent, int) and not isinstance(base, float | complex):
        _check_power(base, exponent)
    return base**exponent


def _check_power(base: Any, exponent: int) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise _LimitExceeded(f"exponent {_short(exponent)} is over the limit of {MAX_EXPONENT:,}")
    if isinstance(base, int) and abs(base) > 1 and math.log2(abs(base)) * exponent > MAX_INT_BITS:
        raise _LimitExceeded(f"power would be too large ({_int_limit()})")


def _modulo(a: Any, b: Any) -> Any:
    if isinstance(a, str | bytes | bytearray):
        raise TypeError("string formatting with '%' is not allowed")
    return a % b


def _round(number: Any, digits: Any = None) -> Any:
    if digits is None:
        return round(number)
    if isinstance(digits, int) and abs(digits) > MAX_ROUND_DIGITS:
        raise _LimitExceeded(f"round() digits must be within ±{MAX_ROUND_DIGITS:,}")
    return round(number, digits)


def _lower(budget: _Budget, text: Any) -> str:
    if type(text) is not str or len(text) > _SMALL_CASE:
        _charge_case(text, "lower", budget)
    return str.lower(text)


def _upper(budget: _Budget, text: Any) -> str:
    if type(text) is not str or len(text) > _SMALL_CASE:
        _charge_case(text, "upper", budget)
    return str.upper(text)


def _charge_case(text: Any, name: str, budget: _Budget) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name}() needs a string, not {type(text).__name__}")
    expansion = 1 if text.isascii() else _CASE_GROWTH
    _allocate_over(budget, len(text) * expansion, f"{name}()")


def _min(budget: _Budget, *values: Any) -> Any:
    _charge_extreme(values, "min()", budget)
    return min(*values)


def _max(budget: _Budget, *values: Any) -> Any:
    _charge_extreme(values, "max()", budget)
    return max(*values)


def _charge_extreme(values: tuple[Any, ...], what: str, budget: _Budget) -> None:
    """Charge comparing every item of the one argument, or the arguments with each other."""
    if len(values) == 1 and type(values[0]) in _TEXTS:
        if len(values[0]) >= _NODE_STEPS:
            _spend(budget, 1 + len(values[0]), what)  # one new character (or int) per item
    else:
        _measure(budget, values[0] if len(values) == 1 else values, what)


def _is_in(item: Any, container: Any) -> bool:
    return item in container


def _is_not_in(item: Any, container: Any) -> bool:
    return item not in container


def _length_limit() -> str:
    return f"the limit is {MAX_LENGTH:,}"


def _int_limit() -> str:
    return f"the limit is {MAX_INT_BITS:,} bits"


_PLAIN_FUNCTIONS: Final[Mapping[str, Callable[..., Any]]] = {
    "abs": abs,
    "len": len,
    "round": _round,
}

_CHARGED_FUNCTIONS: Final[Mapping[str, Callable[..., Any]]] = {
    "lower": _lower,
    "max": _max,
    "min": _min,
    "upper": _upper,
}

_BINARY_OPERATORS: Final[Mapping[type[ast.AST], Operator]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: _modulo,
    ast.Pow: _power,
}

_CHARGED_OPERATORS: Final[Mapping[type[ast.AST], ChargedOperator]] = {
    ast.Add: _add,
    ast.Sub: _subtract,
    ast.Mult: _multiply,
}

_UNARY_OPERATORS: Final[Mapping[type[ast.AST], Callable[[Any], Any]]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Not: operator.not_,
}

#: Each comparison with what it charges (None: constant time, whatever the operands).
_COMPARISONS: Final[Mapping[type[ast.AST], tuple[Operator, Steps | None]]] = {
    ast.Eq: (operator.eq, _equality_steps),
    ast.NotEq: (operator.ne, _equality_steps),
    ast.Lt: (operator.lt, _order_steps),
    ast.LtE: (operator.le, _order_steps),
    ast.Gt: (operator.gt, _order_steps),
    ast.GtE: (operator.ge, _order_steps),
    ast.In: (_is_in, _containment_steps),
    ast.NotIn: (_is_not_in, _containment_steps),
    ast.Is: (operator.is_, None),
    ast.IsNot: (operator.is_not, None),
}


# --------------------------------------------------------------------------- reference


@dataclass(frozen=True, slots=True)
class Function:
    """A function expressions may call, as the reference documents it."""

    name: str
    signature: str
    meaning: str


FUNCTIONS: Final[tuple[Function, ...]] = (
    Function("abs", "abs(x)", "Absolute value of a number."),
    Function("len", "len(x)", "Number of items of a string, bytes, list, tuple, dict or set."),
    Function("lower", "lower(s)", "The string `s` in lower case."),
    Function(
        "max",
        "max(items) / max(a, b, ...)",
        "The largest item of one string, list, tuple, set or dict (its keys), or the "
        "largest of several arguments.",
    ),
    Function(
        "min",
        "min(items) / min(a, b, ...)",
        "The smallest item of one string, list, tuple, set or dict (its keys), or the "
        "smallest of several arguments.",
    ),
    Function(
        "round",
        "round(x) / round(x, digits)",
        "`x` rounded to an integer, or to `digits` decimals (negative: to tens, hundreds, "
        "...); halves go to the even neighbour.",
    ),
    Function("upper", "upper(s)", "The string `s` in upper case."),
    Function(
        "get",
        "row.get(key) / row.get(key, default)",
        "The value of field `key`, or `default` (`None` if not given) when the mapping "
        "has no such field; works on any variable holding a mapping.",
    ),
)

GRAMMAR: Final = """\
expression  := disjunction ["if" disjunction "else" expression]
disjunction := conjunction {"or" conjunction}
conjunction := inversion {"and" inversion}
inversion   := "not" inversion | comparison
comparison  := sum {compare_op sum}
compare_op  := "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not" "in"
             | "is" ["not"]                  (only with None, True or False)
sum         := term {("+" | "-") term}
term        := factor {("*" | "/" | "//" | "%") factor}
factor      := ("-" | "+") factor | power
power       := primary ["**" factor]
primary     := atom {"[" subscript "]"}
subscript   := expression | [expression] ":" [expression] [":" [expression]]
atom        := VARIABLE | NUMBER | STRING | BYTES | "True" | "False" | "None"
             | FUNCTION "(" expression {"," expression} ")"
             | VARIABLE ".get" "(" expression ["," expression] ")"
             | "(" expression ")"
             | "(" [expression "," [expression {"," expression} [","]]] ")"
             | "[" [expression {"," expression} [","]] "]"
             | "{" expression {"," expression} [","] "}"
             | "{" [expression ":" expression {"," expression ":" expression} [","]] "}"
"""


# --------------------------------------------------------------------------- messages

_REPR: Final = reprlib.Repr()
_REPR.maxstring = 40
_REPR.maxother = 40


def _short(value: Any) -> str:
    """A bounded repr: never huge, never raising (huge ints have no decimal repr)."""
    if isinstance(value, int) and value.bit_length() > _SHOWN_BITS:
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
