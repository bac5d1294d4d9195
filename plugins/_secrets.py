"""Secret values, and taking them out of what is recorded or printed.

This is the value half of ``engine/_redact.py``: it lives here, in the lowest layer
that handles secrets (an LLM endpoint holds its API key), so that plugins and the
engine scrub with one implementation (``tests/test_layering.py``: plugins never import
the engine).

Two kinds of masking, both to :data:`REDACTED`:

- **by value** — :class:`Secrets` replaces every occurrence of a known secret (an API
  key, a password) in text, bytes and JSON-like values.  A value shorter than
  :data:`MIN_SECRET_LENGTH` characters is not searched for: it would mask ordinary
  words and numbers all over the data (a password ``test`` in every row that says
  "test"), so a secret that short is masked only where its place gives it away;
- **by place** — :func:`mask_url_passwords` masks the password of every
  ``scheme://user:password@`` in a text, however short.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from .protocols import resolve_path

if TYPE_CHECKING:
    from pathlib import Path

    from .llm._settings import EndpointSettings

__all__ = [
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "SECRET_NAME",
    "Secrets",
    "endpoint_secrets",
    "environment_secrets",
    "mask_url_passwords",
    "url_credentials",
]

REDACTED = "***"
#: Shorter secrets are masked only by place (in URLs, under secret-looking keys).
MIN_SECRET_LENGTH = 8
#: Names (option keys, header names) whose values are secrets.
SECRET_NAME = re.compile(r"(api[_-]?key|secret|password|passwd|token|authorization)", re.I)
#: The password of a URL's userinfo, wherever a URL stands in a text (also in a URL
#: whose scheme is mistyped: ``postgresql//user:password@host``).
_URL_PASSWORD = re.compile(r"(//[^/@:\s'\"]*:)[^/\s'\"]+@")
#: Environment variables whose URLs may carry proxy credentials (as httpx reads them).
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def mask_url_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` masked."""
    return _URL_PASSWORD.sub(rf"\1{REDACTED}@", text) if "//" in text else text


class Secrets:
    """A set of secret values, and their removal from text, bytes and JSON-like values.

    Each value is searched for as it is, as it appears inside a JSON string (escaped,
    ``\\/`` included) and percent-encoded (as in a URL), so that an echo of it in an
    answer body, an error message or a URL is masked.  Values shorter than
    :data:`MIN_SECRET_LENGTH` are left out (see the module's docstring).
    """

    __slots__ = ("_bytes", "_forms", "values")

    def __init__(self, values: Iterable[str | None] = ()) -> None:
        kept = frozenset(v for v in values if v is not None and len(v) >= MIN_SECRET_LENGTH)
        #: The secrets themselves.
        self.values = kept
        forms = {form for value in kept for form in _forms(value)}
        # Longest first: a secret that contains another is masked whole.
        self._forms = tuple(sorted(forms, key=len, reverse=True))
        self._bytes = tuple(form.encode("utf-8") for form in self._forms)

    def __bool__(self) -> bool:
        return bool(self.values)

    def __or__(self, other: Secrets) -> Secrets:
        return Secrets(self.values | other.values)

    def __repr__(self) -> str:  # never the values themselves
        return f"Secrets({len(self.values)} values)"

    def found_in(self, data: bytes) -> bool:
        """Whether any secret occurs in ``data`` (a cheap test before :meth:`scrub`)."""
        return any(form in data for form in self._bytes)

    def scrub_text(self, text: str) -> str:
        """``text`` with every secret masked."""
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    def scrub_bytes(self, data: bytes) -> bytes:
        """``data`` with every secret (in UTF-8) masked."""
        for form in self._bytes:
            if form in data:
                data = data.replace(form, REDACTED.encode())
        return data

    def scrub(self, value: Any) -> Any:
        """A copy of ``value`` with every secret masked in its strings (keys too), at any
        depth of mappings and lists; numbers and other values are kept as they are."""
        if not self._forms:
            return value
        return _walk(value, self.scrub_text, self.scrub_bytes)

    def scrub_error(self, value: Any) -> Any:
        """:meth:`scrub`, and URL passwords masked by place too: for error records and
        messages, where a URL with credentials may be quoted (never for data)."""
        return _walk(value, self.scrub_message, self.scrub_bytes)

    def scrub_message(self, text: str) -> str:
        """``text`` with every secret and every URL password masked."""
        return mask_url_passwords(self.scrub_text(text))


def _walk(value: Any, text: Callable[[str], str], data: Callable[[bytes], bytes]) -> Any:
    """A copy of ``value`` with ``text`` applied to its strings (keys too) and ``data`` to
    its bytes, at any depth of mappings and lists."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, Mapping):
        return {_walk(k, text, data): _walk(v, text, data) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_walk(v, text, data) for v in value]
    if isinstance(value, bytes):
        return data(value)
    return value


def _forms(value: str) -> set[str]:
    """How ``value`` may be written where it leaks: as it is, JSON-escaped, percent-encoded."""
    escaped = json.dumps(value)[1:-1]
    return {
        value,
        escaped,
        escaped.replace("/", "\\/"),
        json.dumps(value, ensure_ascii=False)[1:-1],
        quote(value, safe=""),
    }


def url_credentials(url: str | None) -> list[str]:
    """The secrets a URL carries: its password (decoded), and the ``Basic`` credentials
    an HTTP client makes of its user and password; none without a password."""
    if not url or "@" not in url:
        return []
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL (a port that is not a number): masked by place only
        return []
    if not password:
        return []
    password = unquote(password)
    user = unquote(parts.username or "")
    basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return [password, basic]


def environment_secrets(environ: Mapping[str, str] | None = None) -> Secrets:
    """The secrets of the environment: proxy credentials (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``ALL_PROXY``, any case) and ``PGPASSWORD``."""
    env = os.environ if environ is None else environ
    values = [env.get("PGPASSWORD")]
    for name, value in env.items():
        if name.lower() in _PROXY_VARIABLES:
            values.extend(url_credentials(value))
    return Secrets(values)


def endpoint_secrets(
    settings: EndpointSettings, base_dir: Path, environ: Mapping[str, str] | None = None
) -> Secrets:
    """The secrets an LLM endpoint's settings name: its API key (from ``api_key_env`` or
    ``api_key_file``, when it can be read), the passwords of its URLs, and the values of
    its headers named like credentials."""
    env = os.environ if environ is None else environ
    values: list[str | None] = [env.get(settings.api_key_env) if settings.api_key_env else None]
    if settings.api_key_file:
        values.append(_key_file(resolve_path(settings.api_key_file, base_dir)))
    values += url_credentials(settings.base_url) + url_credentials(settings.endpoint)
    values += [v for k, v in settings.headers.items() if SECRET_NAME.search(k)]
    return Secrets(values)


def _key_file(path: Path) -> str | None:
    """The key in ``path``, as the endpoint reads it (``None`` when it cannot be read: the
    endpoint then refuses to open, so that key is never sent)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
