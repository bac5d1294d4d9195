"""Sources, transforms, aggregations and sinks, and the protocols they implement.

Plugins depend on nothing else of ledgerflow: the engine imports them, never the
reverse, and they report to the audit trail only through what they return.
"""

from __future__ import annotations

from ._registry import PluginNotFound, known_plugins, register_plugin, resolve_plugin
from ._sinks import SinkError
from ._sources import SourceError
from .protocols import (
    Aggregation,
    Artifact,
    BatchContext,
    CallList,
    CallLog,
    Determinism,
    Discard,
    ExternalCall,
    ExternalJobAggregation,
    JobFailed,
    MemberResult,
    Plugin,
    PluginSetup,
    RecordedAnswer,
    ReplayMiss,
    Reservation,
    Row,
    RowContext,
    Sink,
    SinkItem,
    SinkRejection,
    SinkWriteError,
    Source,
    SourcePosition,
    SourceRecord,
    StopRun,
    Transform,
    TransformResult,
)

__all__ = [
    "Aggregation",
    "Artifact",
    "BatchContext",
    "CallList",
    "CallLog",
    "Determinism",
    "Discard",
    "ExternalCall",
    "ExternalJobAggregation",
    "JobFailed",
    "MemberResult",
    "Plugin",
    "PluginNotFound",
    "PluginSetup",
    "RecordedAnswer",
    "ReplayMiss",
    "Reservation",
    "Row",
    "RowContext",
    "Sink",
    "SinkError",
    "SinkItem",
    "SinkRejection",
    "SinkWriteError",
    "Source",
    "SourceError",
    "SourcePosition",
    "SourceRecord",
    "StopRun",
    "Transform",
    "TransformResult",
    "known_plugins",
    "register_plugin",
    "resolve_plugin",
]
