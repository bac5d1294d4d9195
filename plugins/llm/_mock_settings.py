"""What the mock LLM server injects: latency, faults, and the seed both are drawn from.

Every random choice for a request — its latency, whether it fails and how — comes from
uniform numbers the server derives from a hash of the seed, the request body and how
many times that same body has already arrived.  A workload therefore meets the same
faults and latencies whatever order its concurrent requests arrive in, while a retry of
a failed request draws afresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "BATCH_FAULTS",
    "REQUEST_FAULTS",
    "Fault",
    "FixedLatency",
    "Latency",
    "LogNormalLatency",
    "MockSettings",
    "UniformLatency",
    "settings_from_options",
]


class Fault(StrEnum):
    """A way the mock server can misbehave, each injected at its own rate."""

    RATE_LIMITED = "rate_limited"
    """429 with ``Retry-After`` (whole seconds) and ``retry-after-ms``."""
    SERVER_ERROR = "server_error"
    """500 with an OpenAI-style error body."""
    UNAVAILABLE = "unavailable"
    """503 with an OpenAI-style error body."""
    HANG = "hang"
    """No answer: the request waits until the client gives up (or ``hang_seconds``)."""
    MALFORMED_JSON = "malformed_json"
    """200 whose complete body is not valid JSON."""
    TRUNCATED_BODY = "truncated_body"
    """200 whose ``Content-Length`` promises more bytes than are sent before the close."""
    CONNECTION_RESET = "connection_reset"
    """The connection is reset (TCP RST) instead of answered."""
    SHUFFLED_ANSWERS = "shuffled_answers"
    """A batch request's answers come back in another order (each keeps its ``index``)."""
    WRONG_ANSWER_COUNT = "wrong_answer_count"
    """A batch request gets one answer too few (or, for a batch of one, one too many)."""


#: Faults that replace the answer; at most one of them hits a request.
REQUEST_FAULTS = (
    Fault.RATE_LIMITED,
    Fault.SERVER_ERROR,
    Fault.UNAVAILABLE,
    Fault.HANG,
    Fault.MALFORMED_JSON,
    Fault.TRUNCATED_BODY,
    Fault.CONNECTION_RESET,
)
#: Faults that alter a batch answer; drawn independently of each other and of the above.
BATCH_FAULTS = (Fault.SHUFFLED_ANSWERS, Fault.WRONG_ANSWER_COUNT)


def _check_seconds(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")


@dataclass(frozen=True, slots=True)
class FixedLatency:
    """Every request waits ``seconds`` before it is answered."""

    seconds: float = 0.0

    def __post_init__(self) -> None:
        _check_seconds("seconds", self.seconds)

    def sample(self, u: float, v: float) -> float:
        """The latency for the uniforms ``u, v`` in (0, 1): always ``seconds``."""
        return self.seconds


@dataclass(frozen=True, slots=True)
class UniformLatency:
    """Latencies spread evenly over ``[low, high]`` seconds."""

    low: float
    high: float

    def __post_init__(self) -> None:
        _check_seconds("low", self.low)
        _check_seconds("high", self.high)
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")

    def sample(self, u: float, v: float) -> float:
        """The latency for the uniforms ``u, v`` in (0, 1); only ``u`` is used."""
        return self.low + (self.high - self.low) * u


@dataclass(frozen=True, slots=True)
class LogNormalLatency:
    """Log-normal latencies: half below ``median`` seconds, a tail that widens with ``sigma``."""

    median: float
    sigma: float = 0.5

    def __post_init__(self) -> None:
        _check_seconds("median", self.median)
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be finite and >= 0, not {self.sigma!r}")

    def sample(self, u: float, v: float) -> float:
        """The latency for the uniforms ``u, v`` in (0, 1) (a Box-Muller normal)."""
        normal = math.sqrt(-2.0 * math.log(u)) * math.cos(2.0 * math.pi * v)
        return self.median * math.exp(self.sigma * normal)


Latency: TypeAlias = FixedLatency | UniformLatency | LogNormalLatency


@dataclass(frozen=True)
class MockSettings:
    """How a mock LLM server behaves.  Invalid values raise :class:`ValueError` at once.

    ``faults`` maps each :class:`Fault` (or its string value) to the probability that a
    request suffers it.  The rates of :data:`REQUEST_FAULTS` together may not exceed 1;
    the two batch faults have a rate each and apply only to batch requests.  Neither the
    latency nor the faults touch the Batch API (files and batch jobs): its settings are the
    ``batch_*`` fields.
    """

    seed: int = 0
    latency: Latency = field(default_factory=FixedLatency)
    faults: Mapping[Fault, float] = field(default_factory=dict)
    #: Announced by 429 answers; ``Retry-After`` carries it rounded up to whole seconds.
    retry_after_seconds: float = 1.0
    #: How long a hanging request waits at most before its connection is closed.
    hang_seconds: float = 600.0
    #: Length of an embedding vector when the request does not ask for ``dimensions``.
    embedding_dimensions: int = 8
    #: When set, requests must carry ``Authorization: Bearer <key>`` or ``api-key: <key>``.
    api_key: str | None = field(default=None, repr=False)
    #: How long after its creation a batch job ends (completes or expires).
    batch_delay_seconds: float = 0.0
    #: Probability that a request inside a batch job fails (a 500 in the error file).
    batch_failure_rate: float = 0.0
    #: The first this many batch jobs created expire instead of completing.
    batch_expire_jobs: int = 0

    def __post_init__(self) -> None:
        rates = {Fault(kind): float(rate) for kind, rate in self.faults.items()}
        for kind, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"faults.{kind}: rate {rate!r} is not between 0 and 1")
        if sum(rates.get(kind, 0.0) for kind in REQUEST_FAULTS) > 1.0 + 1e-9:
            raise ValueError("faults: the request fault rates add up to more than 1")
        object.__setattr__(self, "faults", MappingProxyType(rates))
        _check_seconds("retry_after_seconds", self.retry_after_seconds)
        _check_seconds("hang_seconds", self.hang_seconds)
        if self.embedding_dimensions < 1:
            raise ValueError("embedding_dimensions must be at least 1")
        _check_seconds("batch_delay_seconds", self.batch_delay_seconds)
        if not 0.0 <= self.batch_failure_rate <= 1.0:
            raise ValueError(
                f"batch_failure_rate {self.batch_failure_rate!r} is not between 0 and 1"
            )
        if self.batch_expire_jobs < 0:
            raise ValueError("batch_expire_jobs must be at least 0")

    def rate(self, fault: Fault) -> float:
        """The configured probability of ``fault`` (0 when not configured)."""
        return self.faults.get(fault, 0.0)


def settings_from_options(
    *,
    latency_ms: float = 0.0,
    error_rate: float = 0.0,
    seed: int = 0,
    batch_delay_seconds: float = 0.0,
) -> MockSettings:
    """Settings for the ``ledgerflow mock-llm`` options.

    The latency is fixed; ``error_rate`` is split evenly between 429, 500 and 503 (batch
    jobs are not affected by it).
    """
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error rate {error_rate!r} is not between 0 and 1")
    share = error_rate / 3
    return MockSettings(
        seed=seed,
        latency=FixedLatency(latency_ms / 1000),
        faults={Fault.RATE_LIMITED: share, Fault.SERVER_ERROR: share, Fault.UNAVAILABLE: share},
        batch_delay_seconds=batch_delay_seconds,
    )
