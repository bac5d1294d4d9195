"""Prompt templates: Jinja2 in an immutable sandbox, strict about undefined names."""

from __future__ import annotations

import hashlib

import pytest

from plugins.llm._prompts import PromptError, PromptTemplate


def test_renders_the_row_and_names_its_source_by_hash() -> None:
    source = "Ticket {{ row.id }}: {{ row['text'] }}{% for i in range(2) %}.{% endfor %}"
    template = PromptTemplate(source, origin="prompt")
    assert template.render({"id": 7, "text": "cannot log in"}) == "Ticket 7: cannot log in.."
    assert template.sha256 == hashlib.sha256(source.encode()).hexdigest()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ row.missing }}", "missing"),
        ("{{ other }}", "'other' is undefined"),
        ("{{ row.__class__.__mro__ }}", "unsafe"),
        ("{{ ''.__class__.__subclasses__() }}", "unsafe"),
        ("{{ row.update({'x': 1}) }}", "unsafe"),
        ("{{ row['tags'].append('x') }}", "unsafe"),
    ],
)
def test_undefined_names_and_escapes_from_the_sandbox_are_errors(source: str, message: str) -> None:
    row = {"text": "t", "tags": []}
    with pytest.raises(PromptError, match=message):
        PromptTemplate(source, origin="prompt").render(row)
    assert row == {"text": "t", "tags": []}


def test_a_template_that_does_not_compile_is_refused_naming_its_origin() -> None:
    with pytest.raises(PromptError, match="system_prompt: "):
        PromptTemplate("{{ row.text ", origin="system_prompt")
