"""The engine's version, as recorded with every run."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["ENGINE_VERSION"]

try:
    ENGINE_VERSION = version("ledgerflow")
except PackageNotFoundError:  # running from a source tree that was never installed
    ENGINE_VERSION = "0+unknown"
