"""What makes a request header safe to send: checked when an endpoint's settings are
read (so a bad header is a config error) and again by the HTTP client."""

from __future__ import annotations

import re

__all__ = ["header_line", "header_value"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Headers the HTTP client writes itself, per request or per connection.
_OWN_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection"}
)


def header_value(name: str, value: str) -> str:
    """``value``, refused if it could end the header.  The value may be a secret (an
    API key), so only the name is told."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"header {name!r} has a line break or NUL in its value")
    return value


def header_line(name: str, value: str) -> str:
    """The line ``name: value`` of a header sent with every request; refused if the
    name is not an HTTP token or is one the client sets itself."""
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not a valid header name")
    if name.lower() in _OWN_HEADERS:
        raise ValueError(f"header {name!r} is set by the HTTP client itself")
    return f"{name}: {header_value(name, value)}\r\n"
