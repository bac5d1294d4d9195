"""Exceptions raised by the Landscape.

LandscapeError
├── AuditIntegrityError   the trail would be (or is) inconsistent: fail the run loudly
├── LandscapeNotFound     there is no Landscape where one was to be read
└── LandscapeUnavailable  the database cannot be reached or opened
"""

from __future__ import annotations

__all__ = ["AuditIntegrityError", "LandscapeError", "LandscapeNotFound", "LandscapeUnavailable"]


class LandscapeError(Exception):
    """Root of every error the Landscape raises."""


class AuditIntegrityError(LandscapeError):
    """A write would break an audit invariant (e.g. a second terminal outcome)."""


class LandscapeNotFound(LandscapeError):
    """A reading command named a database, or a SQLite file, that holds no Landscape."""


class LandscapeUnavailable(LandscapeError):
    """The Landscape database could not be opened or written."""
