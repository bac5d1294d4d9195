"""Exceptions raised by the engine.

    LedgerflowError
    ├── ConfigError         the pipeline file is invalid; carries the YAML key path
    ├── PluginError         a plugin failed outside a row (open, close, a sink's write)
    ├── AuditError          the Landscape refused or lost a write (translated from landscape)
    ├── RunFailed           a run ended ``failed``; carries the run id and the cause
    ├── ResumeError         a run cannot be resumed as asked
    └── PipelineStateError  the Pipeline was used out of order (e.g. two concurrent runs)

Errors of a single row are never exceptions that leave a node: they become that row's
outcome (``failed`` or its ``on_error`` route), recorded with the error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "AuditError",
    "ConfigError",
    "ConfigIssue",
    "LedgerflowError",
    "PipelineStateError",
    "PluginError",
    "ReplayError",
    "ResumeError",
    "RunFailed",
]


class LedgerflowError(Exception):
    """Root of every error ledgerflow raises."""


class ConfigIssue:
    """One problem in a pipeline file: where (``path``, e.g. ``transforms[1].input``) and what."""

    __slots__ = ("message", "path")

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __repr__(self) -> str:
        return f"ConfigIssue({self.path!r}, {self.message!r})"


class ConfigError(LedgerflowError):
    """The pipeline configuration is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(f"invalid pipeline configuration:\n{lines}")

    @classmethod
    def at(cls, path: str, message: str) -> ConfigError:
        return cls([ConfigIssue(path, message)])


class PluginError(LedgerflowError):
    """A plugin failed outside the processing of one row."""


class AuditError(LedgerflowError):
    """The audit trail could not be written consistently; the run cannot continue."""


class RunFailed(LedgerflowError):
    """A run ended with status ``failed``."""

    def __init__(self, run_id: str, message: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} failed: {message}")


class ResumeError(LedgerflowError):
    """A run cannot be resumed as asked."""


class ReplayError(LedgerflowError):
    """A run cannot be replayed as asked (there is no such recorded run)."""


class PipelineStateError(LedgerflowError):
    """The Pipeline was used out of order."""
