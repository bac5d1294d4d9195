"""LLM clients and the mock OpenAI-compatible server they are tested against."""

from __future__ import annotations

from ._embedding import EmbeddingOptions, EmbeddingTransform
from ._endpoint import (
    BackoffSettings,
    BreakerSettings,
    CallFailed,
    Endpoint,
    EndpointSettings,
    ModelPrice,
)
from ._limits import CircuitBreaker, CircuitOpen, EndpointLimiter
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
    "BreakerSettings",
    "CallFailed",
    "CircuitBreaker",
    "CircuitOpen",
    "EmbeddingOptions",
    "EmbeddingTransform",
    "Endpoint",
    "EndpointLimiter",
    "EndpointSettings",
    "Fault",
    "FixedLatency",
    "Latency",
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
