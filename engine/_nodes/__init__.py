"""One module per node kind; every node task has the shape of :class:`NodeTask`."""

from __future__ import annotations

from ._aggregation import AggregationNode, FlushTrigger
from ._base import NodeTask
from ._coalesce import CoalesceNode
from ._gate import GateNode
from ._sink import SinkNode
from ._source import SourceNode
from ._transform import TransformNode

__all__ = [
    "AggregationNode",
    "CoalesceNode",
    "FlushTrigger",
    "GateNode",
    "NodeTask",
    "SinkNode",
    "SourceNode",
    "TransformNode",
]
