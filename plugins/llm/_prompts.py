"""Prompt templates: Jinja2 in a sandbox, strict about undefined names, bounded in cost.

A template sees ``row`` only, cannot reach attributes outside the sandbox or mutate
anything, and fails on any undefined variable or missing field.  Methods of strings,
lists, dicts and numbers are those of a fixed list (:data:`METHODS`); ``lipsum`` is not
available.

Every render runs under a budget (:func:`limits` lists every limit), so that whatever the
row, a template renders within a few tens of milliseconds of CPU and a few tens of
megabytes, or fails with a PromptError naming the limit — an error of that row, routed by
the node's ``on_error`` like any other:

- **steps**: at most 500,000 per render, a step being a few tens of nanoseconds of work.
  Each node of the template costs 4 each time it runs (a loop body's once per iteration,
  whether its ``if`` lets it run or not; a macro's once per call); a loop iteration 12, a
  value written 24, an operator, comparison, ``~`` or slice 32, a filter or test 64, an
  attribute or item lookup 80 (320 on a ``namespace``), a call 192.  What they read —
  strings, containers, the repr of a value made a string — is measured as expressions
  measure values, the slower filters (``sort``, ``urlize``, ``pprint``...) paying several
  times over.
- **memory**: at most 16 MiB (16,777,216 bytes) of strings and sequences built per
  render: what operators, filters and method calls return, and every piece of text
  written, in macros and ``{% set %}`` blocks too.  An operation whose result could be
  far bigger than what it is given (``*``, ``center``, ``ljust``, ``replace``, ``join``,
  format widths...) is refused before it runs.
- **output**: at most 1,000,000 characters of rendered prompt (rendering stops there).
- ``range()`` at most 100,000 items (Jinja's own limit); ``*``, ``+`` and integer ``**``
  as expressions allow them (1,000,000 items; exponents up to 10,000, results up to
  14,000 bits).

The compiled code pays as it runs: the code generator rewrites each template (each loop's
iterable pays per item, each macro or call block body pays when it starts, comparisons,
``~``, slices and dict keys go through measuring filters), and operators, calls, lookups,
filters, tests and written values go through the sandbox's hooks.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import re
import types
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sized
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn, cast

from jinja2 import StrictUndefined, TemplateError, nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import (
    MAX_RANGE,
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace, _PassArg
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

# The measuring and the bounded operators are the expressions' own (private to plugins).
from plugins.expressions import (
    _ATOMS,
    CHARACTERS_PER_STEP,
    MAX_EXPONENT,
    MAX_INT_BITS,
    MAX_LENGTH,
    Limit,
    Steps,
    _add,
    _allocate,
    _Budget,
    _containment_steps,
    _equality_steps,
    _hash_steps,
    _LimitExceeded,
    _multiply,
    _order_steps,
    _power,
    _size,
    _spend,
)

if TYPE_CHECKING:
    from pathlib import Path

    from jinja2.runtime import Context

__all__ = ["PromptError", "PromptTemplate"]

MAX_STEPS: Final = 500_000
MAX_MEMORY: Final = 16 * 1024 * 1024
MAX_OUTPUT: Final = 1_000_000
# What the pieces of a template cost, in steps of about the same time as those of
# expressions (tens of nanoseconds): measured, not guessed.
NODE_STEPS: Final = 4
LOOP_STEPS: Final = 12
OUTPUT_STEPS: Final = 24
OPERATOR_STEPS: Final = 32
FILTER_STEPS: Final = 64
LOOKUP_STEPS: Final = 80
CALL_STEPS: Final = 192

_POINTER_SIZE: Final = 8
_WIDEST_CHARACTER: Final = 4
_CASE_GROWTH: Final = 3 * _WIDEST_CHARACTER  # one character may become three of 4 bytes
_SPLIT_GROWTH: Final = 24  # bytes per character when a string is split into small ones
_LONGEST_WIDTH: Final = 9  # digits of a width or precision worth reading as a number
_SCOPES: Final = frozenset({"_loop_vars", "_block_vars"})
_FORMATS: Final = frozenset({"format", "format_map"})
_NAMESPACE_LOOKUPS: Final = 4  # times a lookup's steps, measured
_REPR_FACTOR: Final = 12  # str() of a value: up to 12 steps per step of a walk (floats)
_SHORT: Final = 32  # characters taken for str() of a number, say

#: The methods templates may call on strings, lists, tuples, dicts and numbers.
METHODS: Final[Mapping[type, frozenset[str]]] = {
    str: frozenset(
        {
            *("capitalize", "casefold", "center", "count", "endswith", "find", "format"),
            *("format_map", "index", "isalnum", "isalpha", "isascii", "isdecimal"),
            *("isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace"),
            *("istitle", "isupper", "join", "ljust", "lower", "lstrip", "partition"),
            *("removeprefix", "removesuffix", "replace", "rfind", "rindex", "rjust"),
            *("rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith"),
            *("strip", "swapcase", "title", "upper", "zfill"),
        }
    ),
    list: frozenset({"count", "index"}),
    tuple: frozenset({"count", "index"}),
    dict: frozenset({"get", "items", "keys", "values"}),
    int: frozenset({"bit_length", "conjugate"}),
    float: frozenset({"conjugate", "is_integer"}),
}


def limits() -> tuple[Limit, ...]:
    """Every limit of rendering a template, as the reference documents it."""
    return (
        Limit(
            "steps",
            MAX_STEPS,
            "per render",
            f"Work of one render: {NODE_STEPS} per node of the template each time it runs "
            "(a loop body's once per iteration, whether its `if` lets it run or not; a "
            f"macro's once per call), {LOOP_STEPS} per loop iteration, {OUTPUT_STEPS} per "
            f"`{{{{ value }}}}` written, {OPERATOR_STEPS} per operator, comparison, `~` or "
            f"slice, {FILTER_STEPS} per filter or test, {LOOKUP_STEPS} per attribute or item "
            f"lookup ({LOOKUP_STEPS * _NAMESPACE_LOOKUPS} on a `namespace`), {CALL_STEPS} "
            "per call; plus what they read — strings, containers, the repr of a value made "
            "a string — measured as expressions measure values, the slower filters (`sort`, "
            "`urlize`, `pprint`...) paying several times over.",
        ),
        Limit(
            "memory",
            MAX_MEMORY,
            "bytes per render",
            "Strings and sequences one render may build in all: what operators, filters "
            "and method calls return, and every piece of text written (in macros and "
            "`{% set %}` blocks too).",
        ),
        Limit("output", MAX_OUTPUT, "characters", "Longest rendered prompt."),
        Limit("range", MAX_RANGE, "items", "Longest `range()`."),
        Limit("sequence length", MAX_LENGTH, "items", "Longest result of `*` or `+`."),
        Limit("exponent", MAX_EXPONENT, "", "Largest `abs(exponent)` of an integer `**`."),
        Limit("integer size", MAX_INT_BITS, "bits", "Largest result of an integer `*` or `**`."),
    )


class PromptError(ValueError):
    """A template that does not compile, or that cannot be rendered for a row."""


# --------------------------------------------------------------------------- the budget

#: The budget of the render in progress in this thread (or task): ``[steps, bytes, step
#: limit, byte limit]``, as expressions keep theirs.
_CURRENT: ContextVar[_Budget | None] = ContextVar("ledgerflow_prompt_budget", default=None)


def _budget() -> _Budget:
    """The current render's budget; outside a render (a template's code run by other
    means), a fresh one, so that nothing ever runs unbounded."""
    budget = _CURRENT.get()
    return _fresh_budget() if budget is None else budget


def _fresh_budget() -> _Budget:
    return [MAX_STEPS, MAX_MEMORY, MAX_STEPS, MAX_MEMORY]


#: Sized values that are not containers of their own: each item read is a step.
_SIZED_VIEWS: Final[tuple[type, ...]] = (
    range,
    type({}.keys()),
    type({}.values()),
    type({}.items()),
)


def _steps_of(value: Any, limit: int, per_character: int = 0, *, stringified: bool = False) -> int:
    """The steps reading ``value`` takes (a partial count over ``limit``): a string one per
    32 characters, or ``per_character`` per character when that is set; a range or dict
    view one per item; anything else as expressions measure values — ``_REPR_FACTOR``
    times that when it is ``stringified`` (made a string: its repr)."""
    factor = _REPR_FACTOR if stringified else 1
    kind = type(value)  # type(), not isinstance: a jinja Namespace runs Python for that
    if kind in _ATOMS:
        return factor
    if issubclass(kind, str):
        if per_character:
            return 1 + len(value) * per_character
        return 1 + len(value) // CHARACTERS_PER_STEP
    if issubclass(kind, _SIZED_VIEWS):
        return 1 + len(cast("Sized", value)) * factor
    return _size(value, limit // factor) * factor


def _measure_value(budget: _Budget, value: Any, what: str, *, stringified: bool = False) -> None:
    """Pay for reading ``value``, or for making it a string."""
    _spend(budget, _steps_of(value, budget[0], stringified=stringified), what)


def _arguments_size(
    values: tuple[Any, ...], kwargs: Mapping[str, Any], limit: int, *, stringified: bool = False
) -> int:
    """The steps reading ``values`` and ``kwargs`` (or making them strings) takes."""
    total = 0
    for value in (*values, *kwargs.values()):
        total += _steps_of(value, limit - total, stringified=stringified)
        if total > limit:
            break
    return total


def _check_room(budget: _Budget, size: int, what: str) -> None:
    """Refuse an operation whose result would not fit, before it is built."""
    if size > budget[1]:
        _allocate(budget, size, what)


def _bytes_of(value: Any) -> int:
    """What building ``value`` took, roughly: its characters or its item slots."""
    kind = type(value)
    if issubclass(kind, str):
        return len(value) * (1 if value.isascii() else _WIDEST_CHARACTER)
    if kind is bytes or kind is bytearray:
        return len(value)
    if kind is list or kind is tuple or kind is dict or kind is set or kind is frozenset:
        return len(value) * _POINTER_SIZE
    return 0


def _charge_result(budget: _Budget, value: Any, what: str) -> Any:
    """``value``, what building it took paid for."""
    size = _bytes_of(value)
    if size:
        _allocate(budget, size, what)
    return value


def _charge_text(budget: _Budget, text: str, what: str) -> str:
    """``text``, what building it took paid for."""
    _allocate(budget, _text_bytes(text), what)
    return text


def _text_bytes(text: str) -> int:
    return len(text) * (1 if text.isascii() else _WIDEST_CHARACTER)


# --------------------------------------------------------------------------- filters the
# compiled code calls: loops, body costs, comparisons and concatenation


def _loop(iterable: Any, steps: int, size: int = 0) -> Iterator[Any]:
    """``iterable``, paying ``steps`` and ``size`` bytes for each item it yields."""
    budget = _budget()
    for item in iterable:
        _spend(budget, steps, "the loop")
        if size:
            _allocate(budget, size, "the loop's text")
        yield item


def _charge(_: Any, steps: int, size: int) -> str:
    """Pay for one run of a body: its nodes and the text it writes."""
    budget = _budget()
    _spend(budget, steps, "the template")
    _allocate(budget, size, "the template's text")
    return ""


_COMPARISONS: Final[Mapping[str, tuple[Callable[[Any, Any], Any], Steps]]] = {
    "eq": (operator.eq, _equality_steps),
    "ne": (operator.ne, _equality_steps),
    "lt": (operator.lt, _order_steps),
    "lteq": (operator.le, _order_steps),
    "gt": (operator.gt, _order_steps),
    "gteq": (operator.ge, _order_steps),
    "in": (lambda a, b: a in b, _containment_steps),
    "notin": (lambda a, b: a not in b, _containment_steps),
}


def _compare(left: Any, name: str, right: Any, *more: Any) -> Any:
    """``left name right [name2 right2 ...]``, a comparison (chained: ``more``), each pair
    paid for before it is compared."""
    budget = _budget()
    compare, steps = _COMPARISONS[name]
    cost = OPERATOR_STEPS + steps(left, right, budget)
    if type(left) not in _ATOMS or type(right) not in _ATOMS:  # maybe a str subclass
        cost += _subclass_steps(left) + _subclass_steps(right)
    _spend(budget, cost, "comparison")
    result = compare(left, right)
    if more and result:
        return _compare(right, *more)
    return result


def _subclass_steps(value: Any) -> int:
    """Reading a string of a subclass (``Markup``), which expressions do not measure."""
    kind = type(value)
    if kind is not str and issubclass(kind, str):
        return 1 + len(value) // CHARACTERS_PER_STEP
    return 0


def _concat(values: list[Any]) -> str:
    """``a ~ b ~ ...``: each value measured before it is made a string."""
    budget = _budget()
    _spend(budget, OPERATOR_STEPS, "concatenation")
    parts = [_string(budget, value) for value in values]
    _check_room(budget, sum(map(_text_bytes, parts)), "concatenation")
    return _charge_text(budget, "".join(parts), "concatenation")


def _string(budget: _Budget, value: Any) -> str:
    """``str(value)``, its walk paid for first, its text after."""
    if type(value) is str:
        return value
    _measure_value(budget, value, "writing a value", stringified=True)
    return str(value)


@pass_context
def _finalize(context: Context, value: Any) -> str:
    """What ``{{ value }}`` writes (``pass_context``: never folded at compile time)."""
    budget = _budget()
    _spend(budget, OUTPUT_STEPS, "writing")
    text = _string(budget, value)
    _allocate(budget, _text_bytes(text), "writing")
    return text


def _slice(value: Any, start: Any, stop: Any, step: Any) -> Any:
    """``value[start:stop:step]``, the copy paid for before it is made."""
    budget = _budget()
    key = slice(start, stop, step)
    _spend(budget, OPERATOR_STEPS, "slicing")
    if isinstance(value, str | list | tuple):
        try:
            count = len(range(*key.indices(len(value))))
        except (TypeError, ValueError):
            count = 0  # the slicing itself fails, with the same error
        copied = count // CHARACTERS_PER_STEP if isinstance(value, str) else count
        _spend(budget, copied, "slicing")
        _check_room(budget, count * _WIDEST_CHARACTER, "slicing")
    return _charge_result(budget, value[key], "slicing")


def _hashed(key: Any) -> Any:
    """``key`` of a dict display, its hash paid for."""
    budget = _budget()
    _spend(budget, _hash_steps(key, budget), "hashing")
    return key


_LOOP: Final = "ledgerflow_loop"
_CHARGE: Final = "ledgerflow_charge"
_COMPARE: Final = "ledgerflow_compare"
_CONCAT: Final = "ledgerflow_concat"
_SLICE: Final = "ledgerflow_slice"
_HASHED: Final = "ledgerflow_hashed"


# --------------------------------------------------------------------------- compiling


class _Metering(NodeTransformer):
    """Rewrites a template's tree so that its compiled code pays as it runs.

    A loop's iterable is wrapped to pay for each item and, unless the loop is recursive,
    for its body's nodes and text; the other bodies (the template's, a recursive loop's,
    a macro's, a call block's) start by paying for theirs.  Comparisons, ``~``, slices
    and dict display keys become calls of filters that measure their operands.
    """

    def visit_Template(self, node: nodes.Template) -> nodes.Node:
        self.generic_visit(node)
        node.body.insert(0, _charge_statement(node.body))
        return node

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        steps = LOOP_STEPS + NODE_STEPS * _count(node.test)
        if node.recursive:  # its body also runs for the items of loop(...) calls
            node.body.insert(0, _charge_statement(node.body))
            size = 0
        else:  # the body is paid for with each item, whether the test lets it run or not
            body_steps, size = _body_cost(node.body)
            steps += body_steps
        arguments = (nodes.Const(steps), nodes.Const(size))
        node.iter = _filter(node.iter, _LOOP, *arguments, lineno=node.lineno)
        return node

    def visit_Macro(self, node: nodes.Macro) -> nodes.Node:
        return self.metered_body(node)

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.Node:
        return self.metered_body(node)

    def metered_body(self, node: nodes.Macro | nodes.CallBlock) -> nodes.Node:
        self.generic_visit(node)
        node.body.insert(0, _charge_statement(node.body))
        return node

    def visit_Compare(self, node: nodes.Compare) -> nodes.Node:
        self.generic_visit(node)
        arguments: list[nodes.Expr] = []
        for operand in node.ops:
            arguments += [nodes.Const(operand.op), operand.expr]
        return _filter(node.expr, _COMPARE, *arguments, lineno=node.lineno)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _filter(nodes.List(node.nodes), _CONCAT, lineno=node.lineno)

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        """``x[a:b:c]`` (which Jinja compiles to Python's own slicing, past the sandbox)."""
        self.generic_visit(node)
        if not isinstance(node.arg, nodes.Slice):
            return node
        parts = (node.arg.start, node.arg.stop, node.arg.step)
        bounds = [nodes.Const(None) if part is None else part for part in parts]
        return _filter(node.node, _SLICE, *bounds, lineno=node.lineno)

    def visit_Pair(self, node: nodes.Pair) -> nodes.Node:
        """A dict display's key, whose hash is paid for."""
        self.generic_visit(node)
        node.key = _filter(node.key, _HASHED, lineno=node.lineno)
        return node


def _filter(value: nodes.Node, name: str, *arguments: nodes.Node, lineno: int) -> nodes.Filter:
    return nodes.Filter(value, name, list(arguments), [], None, None, lineno=lineno)


#: Bodies of their own: their nodes are paid for when they run, not where they stand.
_OWN_BODIES: Final = (nodes.For, nodes.Macro, nodes.CallBlock)


def _charge_statement(body: list[nodes.Node]) -> nodes.ExprStmt:
    """The statement that starts ``body``, paying for its nodes and its text."""
    steps, size = _body_cost(body)
    arguments = (nodes.Const(steps + NODE_STEPS), nodes.Const(size))
    return nodes.ExprStmt(_filter(nodes.Const(None), _CHARGE, *arguments, lineno=1), lineno=1)


def _body_cost(body: list[nodes.Node]) -> tuple[int, int]:
    """What one run of ``body`` costs by itself: steps for its nodes, bytes of its text."""
    count, size = 0, 0
    stack: list[nodes.Node] = list(body)
    while stack:
        node = stack.pop()
        count += 1
        if isinstance(node, nodes.TemplateData):
            size += _text_bytes(node.data)
        exclude = ("body",) if isinstance(node, _OWN_BODIES) else None
        stack += node.iter_child_nodes(exclude=exclude)
    return NODE_STEPS * count + size // CHARACTERS_PER_STEP, size


def _count(node: nodes.Node | None) -> int:
    return 0 if node is None else 1 + sum(1 for _ in node.find_all(nodes.Node))


class _MeteringCodeGenerator(CodeGenerator):
    """Jinja's code generator, on a tree rewritten by :class:`_Metering` first."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        super().visit_Template(_Metering().visit(node), frame)


# --------------------------------------------------------------------------- the sandbox


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every render's cost bounded.

    Operators go through :meth:`call_binop`, calls through :meth:`call`, lookups through
    :meth:`getattr`/:meth:`getitem`, and ``str.format`` through a formatter that checks
    each field's width: each pays and checks before the work.
    """

    code_generator_class = _MeteringCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%", "-", "/", "//"})

    def __init__(self) -> None:
        super().__init__(
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            optimized=False,  # no constant folding: nothing a template says runs unbounded
            finalize=_finalize,
        )
        del self.globals["lipsum"]
        self.filters = {name: _guarded(name, f, test=False) for name, f in self.filters.items()}
        tests = cast("dict[str, Callable[..., Any]]", self.tests)  # typed by jinja2 as "function"
        self.tests = {name: _guarded(name, f, test=True) for name, f in tests.items()}
        self.filters.update(
            {
                _LOOP: _loop,
                _CHARGE: _charge,
                _COMPARE: _compare,
                _CONCAT: _concat,
                _SLICE: _slice,
                _HASHED: _hashed,
            }
        )

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        _spend(budget, OPERATOR_STEPS, "an operator")
        if operator == "%" and isinstance(left, str):
            return _charge_result(budget, _percent_format(budget, left, right), "formatting")
        if operator in _BOUNDED_OPERATORS:
            result = _BOUNDED_OPERATORS[operator](left, right, budget)
            return _charge_result(budget, result, f"'{operator}'")
        if type(left) not in _ATOMS or type(right) not in _ATOMS:  # dict views' '-', say
            _spend(budget, _arguments_size((left, right), {}, budget[0]), f"'{operator}'")
        return _charge_result(budget, self.binop_table[operator](left, right), f"'{operator}'")

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        _spend(budget, CALL_STEPS, "a call")
        receiver = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        # What the compiled code adds for the context: not the callee's own arguments.
        own = {key: value for key, value in kwargs.items() if key not in _SCOPES}
        if isinstance(receiver, str) and name in _STRING_METHODS:
            result = _STRING_METHODS[name](budget, receiver, *args, **own)
            return result if result is receiver else _charge_result(budget, result, name)
        if isinstance(__obj, Macro):
            return _charge_result(budget, super().call(__context, __obj, *args, **kwargs), name)
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            return super().call(__context, __obj, _loop(args[0], LOOP_STEPS), *args[1:], **kwargs)
        sequence = receiver if type(receiver) in (list, tuple) else None  # count, index
        steps = _arguments_size((sequence, *args), own, budget[0])
        _spend(budget, steps, f"calling {name or 'a function'}")
        if name == "strftime" and args and isinstance(args[0], str):  # a date's
            _check_percent_widths(budget, args[0])
        result = super().call(__context, __obj, *args, **kwargs)
        if type(receiver) in METHODS or any(result is value for value in args):
            return result  # a dict's value or view, an index, a count: nothing built
        return _charge_result(budget, result, name or "a call")

    def handle_exception(self, source: str | None = None) -> NoReturn:
        """Re-raise an error of rendering as it is.  (Jinja rewrites its traceback into
        template frames, compiling code for each: for a macro recursing a few hundred
        levels deep that is slower than the whole render.  Only messages are kept.)"""
        if source is not None:  # a syntax error: its message needs the source
            super().handle_exception(source)
        raise  # Jinja calls this only while an exception is being handled

    def getattr(self, obj: Any, attribute: str) -> Any:
        # A namespace runs Python code for each of the sandbox's many checks of it.
        steps = LOOKUP_STEPS * (_NAMESPACE_LOOKUPS if type(obj) is Namespace else 1)
        _spend(_budget(), steps, "a lookup")
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _budget()
        _spend(budget, LOOKUP_STEPS, "a lookup")
        if issubclass(type(obj), Mapping):
            _spend(budget, _hash_steps(argument, budget), "a lookup")
        return super().getitem(obj, argument)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if not super().is_safe_attribute(obj, attr, value):
            return False
        # A subclass (bool, Markup...) has its base's methods only.
        methods = next((METHODS[k] for k in type(obj).__mro__ if k in METHODS), None)
        return methods is None or not callable(value) or attr in methods

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format``/``format_map`` through a formatter that checks each field."""
        if not isinstance(value, types.BuiltinMethodType) or value.__name__ not in _FORMATS:
            return None
        text, name = value.__self__, value.__name__
        if not isinstance(text, str):
            return None

        def bounded(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            formatter: SandboxedFormatter
            if isinstance(text, Markup):
                formatter = _BoundedEscapeFormatter(self, budget, escape=text.escape)
            else:
                formatter = _BoundedFormatter(self, budget)
            if name == "format_map":
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                return _charge_text(budget, formatter.vformat(text, (), args[0]), name)
            return _charge_text(budget, formatter.vformat(text, args, kwargs), name)

        bounded.__name__ = name
        return bounded


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox, refusing a field whose width would not fit."""

    def __init__(self, env: _BoundedEnvironment, budget: _Budget, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self.budget = budget

    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_room(self.budget, _spec_width(format_spec), "a format field")
        _measure_value(self.budget, value, "a format field", stringified=True)
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    """The same for ``Markup.format``, which escapes what it inserts."""


_WIDTHS: Final = re.compile(r"\d+")


def _spec_width(spec: str) -> int:
    """Bytes a field of this format specification may take: by its largest number."""
    numbers = _WIDTHS.findall(spec)
    if any(len(digits) > _LONGEST_WIDTH for digits in numbers):
        return MAX_MEMORY + 1
    return max((int(digits) for digits in numbers), default=0) * _WIDEST_CHARACTER


#: A printf-style field (and a strftime one: ``_`` and ``^`` are glibc's flags).
_PERCENT_FIELD: Final = re.compile(r"%(?:\([^)]*\))?[#0 +\-_^]*(\*|\d+)?(?:\.(\*|\d+))?")


def _percent_format(budget: _Budget, text: str, values: Any) -> str:
    """``text % values`` (printf-style), refusing fields whose width would not fit."""
    _check_percent_widths(budget, text)
    _measure_value(budget, values, "'%'", stringified=True)
    result: str = text % values
    return result


def _check_percent_widths(budget: _Budget, text: str) -> None:
    """Refuse a printf-style format whose widths or precisions would not fit."""
    for field_match in _PERCENT_FIELD.finditer(text):
        for part in field_match.groups():
            if part == "*":
                raise ValueError("'*' widths and precisions are not allowed in templates")
            if part is not None:
                width = int(part) if len(part) <= _LONGEST_WIDTH else budget[1] + 1
                _check_room(budget, width * _WIDEST_CHARACTER, "a format field")


_BOUNDED_OPERATORS: Final[Mapping[str, Callable[[Any, Any, _Budget], Any]]] = {
    "*": _multiply,
    "+": _add,
    "**": lambda a, b, budget: _power(a, b),
}


# --------------------------------------------------------------------------- str methods
# Those whose result can be much bigger than their input are checked before they run;
# every one is paid for by the size of what it reads.


def _string_method(
    growth: Callable[[str, tuple[Any, ...]], int], per_character: int = 0
) -> Callable[[str], Callable[..., Any]]:
    def make(name: str) -> Callable[..., Any]:
        method = getattr(str, name)

        def run(budget: _Budget, text: str, *args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], Iterator):  # join(): counted, and seen first
                args = (list(_metered_items(budget, args[0])), *args[1:])
            _spend(budget, _steps_of(text, budget[0], per_character), f"{name}()")
            _spend(budget, _arguments_size(args, kwargs, budget[0]), f"{name}()")
            _check_room(budget, growth(text, args), f"{name}()")
            return method(text, *args, **kwargs)

        return run

    return make


def _same_size(text: str, args: tuple[Any, ...]) -> int:
    return _text_bytes(text)


def _case_size(text: str, args: tuple[Any, ...]) -> int:
    return len(text) * (1 if text.isascii() else _CASE_GROWTH)


def _padded_size(text: str, args: tuple[Any, ...]) -> int:
    width = args[0] if args and isinstance(args[0], int) else 0
    return max(width, len(text)) * _WIDEST_CHARACTER


def _split_size(text: str, args: tuple[Any, ...]) -> int:
    return len(text) * _SPLIT_GROWTH


def _replaced_size(text: str, args: tuple[Any, ...]) -> int:
    if len(args) < 2 or not (isinstance(args[0], str) and isinstance(args[1], str)):
        return 0  # the call fails
    old, new = args[0], args[1]
    count = text.count(old) if old else len(text) + 1
    if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
        count = min(count, args[2])
    return (len(text) + count * max(len(new) - len(old), 0)) * _WIDEST_CHARACTER


def _joined_size(text: str, args: tuple[Any, ...]) -> int:
    """Bytes of ``text.join(items)``, non-strings taken as short (the filter's str() of
    each is paid for by their walk)."""
    if not args or not isinstance(args[0], list | tuple | str):
        return 0
    items = args[0]
    if isinstance(items, str) or set(map(type, items)) == {str}:
        total = sum(map(len, items))
    else:  # str() of the others: numbers, mostly
        total = sum(len(item) if isinstance(item, str) else _SHORT for item in items)
    return (total + len(text) * max(len(items) - 1, 0)) * _WIDEST_CHARACTER


def _string_methods() -> dict[str, Callable[..., Any]]:
    growth: dict[str, Callable[[str, tuple[Any, ...]], int]] = dict.fromkeys(
        METHODS[str] - {"format", "format_map"}, _same_size
    )
    growth.update(
        dict.fromkeys(("capitalize", "casefold", "lower", "swapcase", "title", "upper"), _case_size)
    )
    growth.update(dict.fromkeys(("center", "ljust", "rjust", "zfill"), _padded_size))
    growth.update(dict.fromkeys(("split", "rsplit", "splitlines"), _split_size))
    growth.update({"replace": _replaced_size, "join": _joined_size})
    splitting = {"split", "rsplit", "splitlines"}  # a new string object every few characters
    return {
        name: _string_method(size, 1 if name in splitting else 0)(name)
        for name, size in growth.items()
    }


_STRING_METHODS: Final = _string_methods()


# --------------------------------------------------------------------------- filters and tests


def _guarded(name: str, function: Callable[..., Any], *, test: bool) -> Callable[..., Any]:
    """``function`` (a filter, or a ``test``), paying for what it reads and builds.

    Its input and arguments are walked first, unless it only looks at their type or at
    an item or two (``length``, ``default``, ``is defined``...); a one-shot iterator is
    paid for item by item as it is read.  The input is paid for as many times over as
    the filter is slow (:data:`_FILTER_COSTS`); filters whose result can outgrow their
    input are checked first; a new result is paid for.
    """
    passed = 0 if _PassArg.from_obj(function) is None else 1  # context, environment...
    reads = name in _READING_TESTS if test else name not in _GLANCING_FILTERS
    per_character, factor = _FILTER_COSTS.get(name, (0, 1))
    stringified = name in _STRINGIFYING and not test
    check = None if test else _FILTER_CHECKS.get(name)

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        values = args[passed:]
        for value in values:
            if issubclass(type(value), Iterator):
                values = tuple(_metered(budget, value) for value in values)
                if name in _MATERIALIZED:
                    values = (list(values[0]), *values[1:])
                break
        steps = FILTER_STEPS
        if reads:
            steps += _arguments_size(values[1:], kwargs, budget[0], stringified=stringified)
        if reads and values:  # the input: what the filter reads most, some slowly
            steps += factor * _steps_of(
                values[0], budget[0] // factor, per_character, stringified=stringified
            )
        _spend(budget, steps, f"the filter or test {name!r}")
        if check is not None:
            check(budget, values, kwargs)
        result = function(*args[:passed], *values, **kwargs)
        for value in values:
            if result is value:  # nothing built
                return result
        return _charge_result(budget, result, f"{name!r}")

    return guarded


def _metered(budget: _Budget, value: Any) -> Any:
    """``value``, or, for an iterator, an iterator paying for each item it yields."""
    if issubclass(type(value), Iterator):
        return _metered_items(budget, value)
    return value


def _metered_items(budget: _Budget, items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        _spend(budget, LOOP_STEPS, "reading items")
        _measure_value(budget, item, "reading items")
        yield item


#: The filters slower than a walk of their input, measured: ``(steps per character of a
#: string input, or 0 for one per 32 characters; times the walk of the input)``.  Those
#: that iterate their input take a string character by character, slowly: ``str()`` or
#: Python code for each.
_FILTER_COSTS: Final[Mapping[str, tuple[int, int]]] = {
    **dict.fromkeys(("batch", "join", "list", "max", "min", "random"), (8, 1)),
    **dict.fromkeys(("map", "reject", "rejectattr", "select", "selectattr", "slice"), (8, 2)),
    **dict.fromkeys(("reverse", "sum", "items"), (8, 3)),
    **dict.fromkeys(("striptags", "wordcount", "urlencode", "title"), (3, 1)),
    "wordwrap": (6, 1),
    "urlize": (18, 1),
    "unique": (8, 3),
    "tojson": (1, 6),
    "xmlattr": (1, 8),
    "dictsort": (1, 8),
    "groupby": (8, 16),
    "sort": (48, 8),
    "pprint": (2, 64),
}


Check = Callable[[_Budget, tuple[Any, ...], dict[str, Any]], None]


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, key: str) -> Any:
    """A filter's argument, given by position or by keyword (None if not given)."""
    return kwargs.get(key, args[position] if len(args) > position else None)


def _text_of(args: tuple[Any, ...]) -> str:
    return args[0] if args and isinstance(args[0], str) else ""


def _center_check(budget: _Budget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    width = _argument(args, kwargs, 1, "width")
    if isinstance(width, int):
        _check_room(budget, max(width, len(_text_of(args))) * _WIDEST_CHARACTER, "'center'")


def _indent_check(budget: _Budget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    width = _argument(args, kwargs, 1, "width")
    indent = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
    text = _text_of(args)
    size = len(text) + indent * (text.count("\n") + 1)
    _check_room(budget, size * _WIDEST_CHARACTER, "'indent'")


def _wordwrap_check(budget: _Budget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    width, wrap = _argument(args, kwargs, 1, "width"), _argument(args, kwargs, 3, "wrapstring")
    text = _text_of(args)
    lines = len(text) // max(width if isinstance(width, int) else 79, 1) + text.count("\n") + 1
    size = len(text) + lines * (len(wrap) if isinstance(wrap, str) else 1)
    _check_room(budget, size * _WIDEST_CHARACTER, "'wordwrap'")


def _count_check(position: int, key: str) -> Check:
    """A check that the filter's count argument leaves room for as many new items."""

    def check(budget: _Budget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        count = _argument(args, kwargs, position, key)
        if isinstance(count, int):
            _check_room(budget, count * _POINTER_SIZE, "the filter")

    return check


def _replace_check(budget: _Budget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if args and isinstance(args[0], str):
        _check_room(budget, _replaced_size(args[0], args[1:]), "'replace'")


def _format_check(budget: _Budget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if args and isinstance(args[0], str):
        _check_percent_widths(budget, args[0])


def _join_check(budget: _Budget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if args and isinstance(args[0], list | tuple | str):
        separator = _argument(args, kwargs, 1, "d")
        size = _joined_size(separator if isinstance(separator, str) else "", args[:1])
        _check_room(budget, size, "'join'")


def _sum_check(budget: _Budget, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Summing lists or strings copies the total so far each time: pay for that."""
    items = args[0] if args and isinstance(args[0], list | tuple) else ()
    if not all(type(item) in _ATOMS for item in items):
        _spend(budget, len(items) * _steps_of(items, budget[0]), "'sum'")


#: Filters that look at no more of their input and arguments than their type, their
#: length or an item (an iterator is still paid for as it is read).
_GLANCING_FILTERS: Final = frozenset(
    {"abs", "attr", "count", "d", "default", "first", "items", "last", "length", "random"}
)
#: The tests that read their input and arguments (the others look at their type).
_READING_TESTS: Final = frozenset(
    {
        *("eq", "==", "equalto", "ne", "!=", "gt", ">", "greaterthan", "ge", ">="),
        *("lt", "<", "lessthan", "le", "<=", "in", "lower", "upper"),
    }
)

#: Filters that make strings of what they are given (a container: its repr).
_STRINGIFYING: Final = frozenset(
    {
        *("capitalize", "center", "e", "escape", "filesizeformat", "float", "forceescape"),
        *("format", "indent", "int", "join", "lower", "replace", "safe", "string"),
        *("striptags", "title", "trim", "truncate", "upper", "urlencode", "urlize"),
        *("wordcount", "wordwrap"),
    }
)

#: Checks of filters whose result can outgrow their input, made before they run.
_FILTER_CHECKS: Final[Mapping[str, Check]] = {
    "center": _center_check,
    "indent": _indent_check,
    "wordwrap": _wordwrap_check,
    "batch": _count_check(1, "linecount"),
    "slice": _count_check(1, "slices"),
    "replace": _replace_check,
    "format": _format_check,
    "join": _join_check,
    "sum": _sum_check,
}
#: Filters whose input is read into a list first, so that their check can see it.
_MATERIALIZED: Final = frozenset({"join", "sum"})


# --------------------------------------------------------------------------- templates

_ENVIRONMENT = _BoundedEnvironment()


class PromptTemplate:
    """One compiled template; :attr:`sha256` identifies its source in the audit trail.

    Rendering sees ``row`` only, cannot reach attributes outside the sandbox or mutate
    anything, fails on any undefined variable or missing field, and stays within the
    limits of :func:`limits`.
    """

    #: The methods templates may call on strings, lists, tuples, dicts and numbers.
    METHODS: ClassVar[Mapping[type, frozenset[str]]] = METHODS

    @staticmethod
    def limits() -> tuple[Limit, ...]:
        """Every limit of rendering a template, as the reference documents it."""
        return limits()

    def __init__(self, source: str, *, origin: str) -> None:
        self.source = source
        self.origin = origin
        self.sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except TemplateError as exc:
            raise PromptError(f"{origin}: {exc}") from None
        except (RecursionError, MemoryError, SyntaxError) as exc:  # too deeply nested
            raise PromptError(f"{origin}: cannot compile ({type(exc).__name__})") from None
        # Each render copies the template's globals into its context, and walks them
        # again for their names: as Jinja's ChainMap that is 2/3 of a short template's
        # rendering time.  The environment's globals never change, so a flat copy of
        # them is the same mapping.
        self._template.globals = dict(self._template.globals)

    @classmethod
    def load(cls, inline: str | None, path: Path | None, *, origin: str) -> PromptTemplate | None:
        """The template given inline or in the file at ``path``, or ``None``."""
        if inline is not None:
            return cls(inline, origin=origin)
        if path is None:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PromptError(f"{origin}_file: cannot read {path}: {exc.strerror}") from None
        return cls(text, origin=f"{origin}_file")

    def render(self, row: dict[str, Any]) -> str:
        """The prompt for ``row``.

        Raises PromptError when the template fails for this row: an undefined name, an
        error of an operation, or a limit of :func:`limits`.
        """
        token = _CURRENT.set(_fresh_budget())
        try:
            return self._generate(row)
        except TemplateError as exc:
            raise PromptError(f"{self.origin}: {exc}") from None
        except _LimitExceeded as exc:
            raise PromptError(f"{self.origin}: {exc}") from None
        except Exception as exc:
            raise PromptError(f"{self.origin}: {type(exc).__name__}: {exc}") from exc
        finally:
            _CURRENT.reset(token)

    def _generate(self, row: dict[str, Any]) -> str:
        """Render piece by piece, stopping as soon as the output is over its limit."""
        parts: list[str] = []
        length = 0
        stream = cast("Generator[str, None, None]", self._template.generate(row=row))
        try:
            for part in stream:
                length += len(part)
                if length > MAX_OUTPUT:
                    raise _LimitExceeded(
                        f"the prompt would be over the limit of {MAX_OUTPUT:,} characters"
                    )
                parts.append(part)
        finally:
            stream.close()
        return "".join(parts)
