"""LLM clients and the mock OpenAI-compatible server they are tested against.

The endpoint settings load with the package; everything else (the HTTP client, Jinja2,
the mock server) loads on first use, so reading a pipeline without LLM nodes does not
pay for importing them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._settings import BackoffSettings, BreakerSettings, EndpointSettings, ModelPrice

if TYPE_CHECKING:
    from ._batch import BatchRequestFailed, LlmBatchAggregation, LlmBatchOptions
    from ._client import HttpClientChoice
    from ._embedding import EmbeddingOptions, EmbeddingTransform
    from ._endpoint import CallFailed, Endpoint
    from ._limits import CircuitBreaker, CircuitOpen, EndpointDown, EndpointLimiter
    from ._mock_settings import (
        Fault,
        FixedLatency,
        Latency,
        LogNormalLatency,
        MockSettings,
        UniformLatency,
        settings_from_options,
    )
    from ._mock_stats import MockStats
    from ._prompts import PromptError, PromptTemplate
    from ._transform import AnswerError, LlmOptions, LlmTransform
    from .mock_server import MockLlmServer, serve

__all__ = [
    "AnswerError",
    "BackoffSettings",
    "BatchRequestFailed",
    "BreakerSettings",
    "CallFailed",
    "CircuitBreaker",
    "CircuitOpen",
    "EmbeddingOptions",
    "EmbeddingTransform",
    "Endpoint",
    "EndpointDown",
    "EndpointLimiter",
    "EndpointSettings",
    "Fault",
    "FixedLatency",
    "HttpClientChoice",
    "Latency",
    "LlmBatchAggregation",
    "LlmBatchOptions",
    "LlmOptions",
    "LlmTransform",
    "LogNormalLatency",
    "MockLlmServer",
    "MockSettings",
    "MockStats",
    "ModelPrice",
    "PromptError",
    "PromptTemplate",
    "UniformLatency",
    "serve",
    "settings_from_options",
]

#: Where each lazily loaded name lives.
_LAZY = {
    "BatchRequestFailed": "._batch",
    "LlmBatchAggregation": "._batch",
    "LlmBatchOptions": "._batch",
    "HttpClientChoice": "._client",
    "EmbeddingOptions": "._embedding",
    "EmbeddingTransform": "._embedding",
    "CallFailed": "._endpoint",
    "Endpoint": "._endpoint",
    "CircuitBreaker": "._limits",
    "CircuitOpen": "._limits",
    "EndpointDown": "._limits",
    "EndpointLimiter": "._limits",
    "Fault": "._mock_settings",
    "FixedLatency": "._mock_settings",
    "Latency": "._mock_settings",
    "LogNormalLatency": "._mock_settings",
    "MockSettings": "._mock_settings",
    "UniformLatency": "._mock_settings",
    "settings_from_options": "._mock_settings",
    "MockStats": "._mock_stats",
    "PromptError": "._prompts",
    "PromptTemplate": "._prompts",
    "AnswerError": "._transform",
    "LlmOptions": "._transform",
    "LlmTransform": "._transform",
    "MockLlmServer": ".mock_server",
    "serve": ".mock_server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
