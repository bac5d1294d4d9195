"""Keeping secrets out of everything ledgerflow records or prints."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from landscape import redact_url

__all__ = ["REDACTED", "redact", "redact_url"]

REDACTED = "***"
_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|token|authorization)", re.I)
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
    if _SECRET_KEY.search(key) and not key.endswith("_env") and isinstance(value, str | bytes):
        return REDACTED
    return redact(value)
