"""Prompt templates: Jinja2 in a sandbox, with undefined variables an error."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["PromptError", "PromptTemplate"]

_ENVIRONMENT = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
)


class PromptError(ValueError):
    """A template that does not compile, or that cannot be rendered for a row."""


class PromptTemplate:
    """One compiled template; :attr:`sha256` identifies its source in the audit trail.

    Rendering sees ``row`` only, cannot reach attributes outside the sandbox or mutate
    anything, and fails on any undefined variable or missing field.
    """

    def __init__(self, source: str, *, origin: str) -> None:
        self.source = source
        self.origin = origin
        self.sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except TemplateError as exc:
            raise PromptError(f"{origin}: {exc}") from None
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
        try:
            return self._template.render(row=row)
        except TemplateError as exc:
            raise PromptError(f"{self.origin}: {exc}") from None
