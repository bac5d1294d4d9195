"""Generates ``docs/configuration.md`` and ``docs/cli.md`` from the code itself.

``python -m engine._docs`` rewrites both; ``tests/test_docs.py`` fails when they are
stale, so the reference never drifts from the models and the parser.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from plugins import expressions, known_plugins, llm, resolve_plugin

from . import _config as config
from ._graph import TRIGGER_NAMES
from .cli import build_parser

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

__all__ = ["render_cli_reference", "render_configuration_reference", "write_docs"]

_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("Top level", config.PipelineSettings),
    ("`landscape`", config.LandscapeSettings),
    ("`runtime`", config.RuntimeSettings),
    ("`budget`", config.BudgetSettings),
    ("`endpoints.<name>`", llm.EndpointSettings),
    ("`endpoints.<name>.backoff`", llm.BackoffSettings),
    ("`endpoints.<name>.circuit_breaker`", llm.BreakerSettings),
    ("`endpoints.<name>.prices.<model>`", llm.ModelPrice),
    ("`source`", config.SourceSettings),
    ("`source.schema`", config.SchemaSettings),
    ("`transforms[]`", config.TransformSettings),
    ("`gates[]`", config.GateSettings),
    ("`coalesce[]`", config.CoalesceSettings),
    ("`aggregations[]`", config.AggregationSettings),
    ("`aggregations[].trigger`", config.TriggerSettings),
    ("`sinks[]`", config.SinkSettings),
]


def _cell(text: str) -> str:
    """``text`` made safe for a Markdown table cell."""
    return text.replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    text = re.sub(r"\b(?:\w+\.)+(?=[A-Z]\w*)", "", text)  # module paths of our own models
    return text.replace("NoneType", "None")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        return "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
    return f"`{field.default!r}`"


def _model_table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        annotation = _cell(_type_name(field.annotation))
        description = _cell(field.description or "")
        lines.append(f"| `{key}` | `{annotation}` | {_default(field)} | {description} |")
    return lines


def _plugin_sections() -> list[str]:
    lines = ["## Built-in plugins", ""]
    for kind in ("source", "transform", "aggregation", "sink"):
        for name in known_plugins(kind):
            cls = resolve_plugin(kind, name)
            lines += [f"### {kind} `{name}`", "", (cls.__doc__ or "").strip().splitlines()[0], ""]
            if cls.Options is not None:
                lines += [*_model_table(cls.Options), ""]
            else:
                lines += ["No options.", ""]
    return lines


def render_configuration_reference() -> str:
    """The configuration reference as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the configuration models by `python -m engine._docs`; do not edit.",
        "Every key is checked: an unknown key, a wrong type or a broken reference is",
        "refused before anything runs, with its key path (e.g. `transforms[1].input`).",
        "",
    ]
    for title, model in _SECTIONS:
        doc = (model.__doc__ or "").strip()
        lines += [f"## {title}", "", doc, "", *_model_table(model), ""]
    lines += _plugin_sections()
    lines += _expression_sections()
    lines += _template_sections()
    return "\n".join(lines).rstrip() + "\n"


#: Where expressions appear, and the variables each place offers.
_EXPRESSION_PLACES: list[tuple[str, tuple[str, ...]]] = [
    ("`gates[].condition`", ("row",)),
    ("transform `filter`: `keep`", ("row",)),
    ("transform `compute`: each of `fields`", ("row",)),
    ("`aggregations[].group_by` (a bare field name means `row['name']`)", ("row",)),
    ("`aggregations[].trigger.condition`", TRIGGER_NAMES),
]


def _limit_table(limits: tuple[expressions.Limit, ...]) -> list[str]:
    lines = ["| limit | value | meaning |", "|---|---|---|"]
    for limit in limits:
        value = f"{limit.value:,} {limit.unit}".strip()
        lines.append(f"| {limit.name} | {_cell(value)} | {_cell(limit.meaning)} |")
    return lines


def _expression_sections() -> list[str]:
    """The expression language: grammar, variables, functions and limits, from the code."""
    lines = [
        "## Expressions",
        "",
        "Conditions, filters, computed fields and group keys are safe expressions: one",
        "Python expression from a small whitelist, compiled once (no `eval`). Anything else",
        "is refused when the pipeline is built, with its key path. An evaluation that fails",
        "— a missing field, a type error, a limit below — is that row's error: it goes to",
        "the node's `on_error`, or the row ends `failed`, with the reason recorded.",
        "",
        "### Grammar",
        "",
        "```",
        expressions.GRAMMAR.rstrip(),
        "```",
        "",
        "`is` compares only with `None`, `True` or `False`; `%` does not format strings; no",
        "attribute but `.get` and no dunder name is reachable.",
        "",
        "### Variables",
        "",
        "| where | variables |",
        "|---|---|",
    ]
    for place, names in _EXPRESSION_PLACES:
        lines.append(f"| {place} | {', '.join(f'`{name}`' for name in names)} |")
    lines += ["", "### Functions", "", "| function | meaning |", "|---|---|"]
    for function in expressions.FUNCTIONS:
        lines.append(f"| `{_cell(function.signature)}` | {_cell(function.meaning)} |")
    lines += [
        "",
        "### Limits",
        "",
        "Every evaluation is bounded, so that none takes more than a few tens of",
        "milliseconds or a few tens of megabytes, whatever the row:",
        "",
        *_limit_table(expressions.LIMITS),
        "",
    ]
    return lines


def _template_sections() -> list[str]:
    """What prompt templates may do and every limit of a render, from the code."""
    template = llm.PromptTemplate
    lines = [
        "## Prompt templates",
        "",
        "`prompt` and `system` of the `llm` plugins (and their `_file` forms) are Jinja2",
        "templates rendered in an immutable sandbox with one variable, `row`; an undefined",
        "name or field is an error. A render that fails — an error, a limit below — is that",
        "row's error. `lipsum` is not available, and the methods of these types are the",
        "only ones a template may call on them:",
        "",
        "| type | methods |",
        "|---|---|",
    ]
    for kind, methods in template.METHODS.items():
        lines.append(f"| `{kind.__name__}` | {', '.join(f'`{m}`' for m in sorted(methods))} |")
    lines += [
        "",
        "### Limits",
        "",
        "Every render is bounded, so that none takes more than a few tens of milliseconds",
        "or a few tens of megabytes, whatever the row:",
        "",
        *_limit_table(template.limits()),
        "",
    ]
    return lines


def _parser_lines(parser: argparse.ArgumentParser, title: str) -> list[str]:
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    usage = formatter.format_help().strip()
    lines = [f"## `{title}`", "", parser.description or "", "", "```", usage, "```", ""]
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        flags = ", ".join(action.option_strings) or action.metavar or action.dest
        help_text = _cell(action.help or "")
        rows.append(f"| `{flags}` | {help_text} |")
    if rows:
        lines += ["| argument | meaning |", "|---|---|", *rows, ""]
    return lines


def render_cli_reference() -> str:
    """The CLI reference as Markdown."""
    parser = build_parser()
    lines = [
        "# Command line reference",
        "",
        "Generated from the argument parser by `python -m engine._docs`; do not edit.",
        "",
    ]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        lines += _parser_lines(sub, f"ledgerflow {name}")
    return "\n".join(lines).rstrip() + "\n"


def write_docs(root: Path) -> list[Path]:
    """Write both references under ``root/docs``; return the paths written."""
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    written = []
    for name, text in (
        ("configuration.md", render_configuration_reference()),
        ("cli.md", render_cli_reference()),
    ):
        path = docs / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_docs(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()):
        print(f"wrote {path}")
