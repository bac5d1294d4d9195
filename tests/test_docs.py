"""The generated references match the code (regenerate with `python -m engine._docs`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine._docs import render_cli_reference, render_configuration_reference

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize(
    ("name", "render"),
    [("configuration.md", render_configuration_reference), ("cli.md", render_cli_reference)],
)
def test_reference_is_up_to_date(name: str, render: object) -> None:
    expected = render()  # type: ignore[operator]
    actual = (DOCS / name).read_text(encoding="utf-8")
    assert actual == expected, f"docs/{name} is stale: run `python -m engine._docs`"


def test_configuration_reference_covers_every_section_and_builtin_plugin() -> None:
    text = render_configuration_reference()
    for needle in (
        "`transforms[]`",
        "`on_error`",
        "### transform `field_map`",
        "### sink `database`",
        "### source `csv`",
        "`max_buffer_size`",
    ):
        assert needle in text
