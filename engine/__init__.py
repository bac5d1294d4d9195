"""ledgerflow's runtime: configuration, the DAG, node tasks, streams, and the CLI.

Layers (imports point one way only; ``tests/test_layering.py`` enforces it)::

    engine  ──▶  plugins    (protocols and built-in plugins; never imports engine/landscape)
       │
       └────▶  landscape    (the audit store; imports neither engine nor plugins)

Plugins never touch the Landscape: the engine records what they return.
"""

from __future__ import annotations

from ._clock import Clock, ManualClock, SystemClock
from ._errors import (
    AuditError,
    ConfigError,
    ConfigIssue,
    LedgerflowError,
    PipelineStateError,
    PluginError,
    ReplayError,
    ResumeError,
    RunFailed,
)
from ._pipeline import Pipeline, RunResult, RunStatistics
from ._run_context import NodeStatistics
from ._version import ENGINE_VERSION

__all__ = [
    "ENGINE_VERSION",
    "AuditError",
    "Clock",
    "ConfigError",
    "ConfigIssue",
    "LedgerflowError",
    "ManualClock",
    "NodeStatistics",
    "Pipeline",
    "PipelineStateError",
    "PluginError",
    "ReplayError",
    "ResumeError",
    "RunFailed",
    "RunResult",
    "RunStatistics",
    "SystemClock",
]
