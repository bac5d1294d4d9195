"""Keeping secrets out of everything ledgerflow records or prints.

Three tools, one policy:

- :func:`redact` masks the secrets of a configuration by place (keys named like
  secrets, URL passwords): what the Landscape records of a node's settings;
- :class:`Secrets` (from :mod:`plugins._secrets`, so that plugins scrub with the same
  code) masks secrets by value wherever they occur — an API key a server echoes in an
  error body, a password inside a driver's message.  Values shorter than
  :data:`MIN_SECRET_LENGTH` characters are masked by place only: searched for
  everywhere they would mask ordinary data;
- :func:`secrets_of` collects every secret a pipeline is configured with, for what
  the command line prints (:func:`masked_output`).

Every mask is :data:`REDACTED` (``***``).  Row values are not secrets — they belong in
the Landscape — but they do not belong in what is printed either:
:func:`without_row_values` takes them out of a SQL error's text.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO, cast

from pydantic import BaseModel
from sqlalchemy.exc import StatementError

from landscape import redact_url
from plugins._secrets import (
    MIN_SECRET_LENGTH,
    REDACTED,
    SECRET_NAME,
    Secrets,
    endpoint_secrets,
    environment_secrets,
    mask_url_passwords,
    url_credentials,
)

if TYPE_CHECKING:
    from pathlib import Path

    from ._config import PipelineSettings

__all__ = [
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "MaskedStream",
    "Secrets",
    "environment_secrets",
    "mask_in_output",
    "mask_url_passwords",
    "masked_output",
    "redact",
    "redact_url",
    "secrets_of",
    "url_credentials",
    "without_row_values",
]

_URL_WITH_PASSWORD = re.compile(r"^[a-z0-9+]+://[^/@\s]*:[^/@\s]*@", re.I)


def redact(value: Any) -> Any:
    """A copy of ``value`` with secret-looking keys masked and URL passwords hidden.

    Keys named like ``api_key_env`` hold the *name* of an environment variable, not a
    secret, and are kept.
    """
    if isinstance(value, Mapping):
        return {str(k): _redact_item(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and _URL_WITH_PASSWORD.match(value):
        return redact_url(value)
    return value


def _redact_item(key: str, value: Any) -> Any:
    if SECRET_NAME.search(key) and not key.endswith("_env") and isinstance(value, str | bytes):
        return REDACTED
    return redact(value)


def secrets_of(
    settings: PipelineSettings,
    base_dir: Path,
    *,
    landscape_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Secrets:
    """Every secret value ``settings`` names, as :func:`redact` finds them (URL passwords,
    values under keys named like secrets) and by what they point to (each endpoint's API
    key), with those of the environment (:func:`environment_secrets`) and of
    ``landscape_url`` (the Landscape in use, when not the pipeline's own)."""
    env = os.environ if environ is None else environ
    found = Secrets(_configured(settings))
    found |= Secrets(url_credentials(landscape_url)) | environment_secrets(env)
    for endpoint in settings.endpoints.values():
        found |= endpoint_secrets(endpoint, base_dir, env)
    return found


#: Configuration nests a few levels; deeper values (or inline rows) are data.
_MAX_CONFIG_DEPTH = 12
#: Keys whose values are data, not configuration: a memory source's inline rows.
_DATA_KEYS = frozenset({"rows"})


def _configured(value: Any, key: str = "", depth: int = 0) -> list[str]:
    """The secrets written in a configuration value (found where :func:`redact` masks)."""
    if isinstance(value, str):
        if SECRET_NAME.search(key) and not key.endswith(("_env", "_file")):
            return [value]
        return url_credentials(value) if _URL_WITH_PASSWORD.match(value) else []
    if depth >= _MAX_CONFIG_DEPTH or key in _DATA_KEYS:
        return []
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return [s for name in fields for s in _configured(getattr(value, name), name, depth + 1)]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in _configured(v, str(k), depth + 1)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _configured(v, key, depth + 1)]
    return []  # numbers, plugin classes, iterables of rows (never consumed here)


# -- what is printed ---------------------------------------------------------------


class MaskedStream:
    """A text stream that writes to another with every secret of :attr:`secrets` and
    every URL password masked (``***``); everything else is the other stream's."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.secrets = environment_secrets()

    def write(self, text: str) -> int:
        self.stream.write(self.secrets.scrub_message(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextmanager
def masked_output() -> Iterator[None]:
    """Mask secrets in all that is written to ``sys.stdout`` and ``sys.stderr`` inside
    the block (see :func:`mask_in_output`)."""
    saved = sys.stdout, sys.stderr
    sys.stdout = cast("TextIO", MaskedStream(sys.stdout))
    sys.stderr = cast("TextIO", MaskedStream(sys.stderr))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def mask_in_output(secrets: Secrets) -> None:
    """Mask ``secrets`` too in what is printed from now on (inside :func:`masked_output`)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, MaskedStream):
            stream.secrets |= secrets


#: A value asyncpg quotes in its message about a query argument it cannot encode.
_DRIVER_VALUE = re.compile(r"(invalid input for query argument \$\d+[^:\n]*: ).*")
_VALUE_HIDDEN = "(value hidden; --verbose shows it)"
#: What SQLAlchemy writes for hidden parameters, and what the CLI says instead.
_SQLALCHEMY_HIDDEN = "[SQL parameters hidden due to hide_parameters=True]"
_PARAMETERS_HIDDEN = "[SQL parameters hidden; --verbose shows them]"


def without_row_values(text: str, exc: BaseException, *, verbose: bool) -> str:
    """``text`` (about ``exc``) with the row values of the SQL errors behind ``exc``
    hidden — each statement's parameters (also when its engine was made with
    ``hide_parameters``) and a value the driver quotes — or, ``verbose``, all shown.

    The errors that wrap a SQL error quote its text, which is found and replaced with
    the text the error has with its parameters hidden (or shown)."""
    for error in _causes(exc):
        if isinstance(error, StatementError) and error.params:
            hidden, shown = _sql_texts(error)
            text = text.replace(hidden, shown) if verbose else text.replace(shown, hidden)
    if verbose:
        return text
    text = text.replace(_SQLALCHEMY_HIDDEN, _PARAMETERS_HIDDEN)
    return _DRIVER_VALUE.sub(rf"\1{_VALUE_HIDDEN}", text)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it: causes, contexts, members of groups."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending += [e for e in (error.__cause__, error.__context__) if e is not None]
        if isinstance(error, BaseExceptionGroup):
            pending += error.exceptions


def _sql_texts(error: StatementError) -> tuple[str, str]:
    """The text of ``error`` with its statement parameters hidden, and with them shown."""
    hide = error.hide_parameters
    try:
        error.hide_parameters = True
        hidden = str(error)
        error.hide_parameters = False
        return hidden, str(error)
    finally:
        error.hide_parameters = hide
