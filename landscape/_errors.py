"""Exceptions raised by the Landscape.

LandscapeError
├── AuditIntegrityError   the trail would be (or is) inconsistent: fail the run loudly
└── LandscapeUnavailable  the database cannot be reached or opened
"""

from __future__ import annotations

__all__ = ["AuditIntegrityError", "LandscapeError", "LandscapeUnavailable"]


class LandscapeError(Exception):
    """Root of every error the Landscape raises."""


class AuditIntegrityError(LandscapeError):
    """A write would break an audit invariant (e.g. a second terminal outcome)."""


class LandscapeUnavailable(LandscapeError):
    """The Landscape database could not be opened or written."""
