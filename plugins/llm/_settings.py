"""How an LLM endpoint is configured: the ``endpoints:`` section of a pipeline.

Kept apart from the client (``_endpoint.py``) so that reading a pipeline file does not
import the HTTP stack.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._headers import header_line

__all__ = ["BackoffSettings", "BreakerSettings", "EndpointSettings", "ModelPrice", "Provider"]

Provider = Literal["openai", "azure_openai", "openrouter"]

#: A deployment name or api-version: it goes into the URL as it is.
_URL_PART = re.compile(r"[A-Za-z0-9._-]+")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackoffSettings(_Model):
    initial_seconds: float = Field(0.5, gt=0, description="First retry delay (then doubling).")
    max_seconds: float = Field(30.0, gt=0, description="Longest delay between attempts.")


class BreakerSettings(_Model):
    """The endpoint's circuit breaker: open after consecutive failures, one probe call
    after each reset period, closed again by the probe's success."""

    failure_threshold: int = Field(10, ge=1, description="Consecutive failures that open it.")
    reset_seconds: float = Field(
        30.0, gt=0, description="How long it stays open before one probe call tests the endpoint."
    )
    on_open: Literal["wait", "fail"] = Field(
        "wait",
        description="wait: calls wait while it is open (their rows hold the node's "
        "concurrency, so the source is no longer read), without using up attempts, and go "
        "on once a probe succeeds; fail: calls fail at once (circuit_open), each its row's "
        "error.",
    )
    max_outage_seconds: float = Field(
        300.0,
        gt=0,
        description="With on_open wait: when the breaker has been open this long without "
        "a probe succeeding, the run stops gracefully (interrupted, resumable), the waiting "
        "rows left for the resume.",
    )


class ModelPrice(_Model):
    input_per_1k: float = Field(0.0, ge=0, description="Price of 1,000 prompt tokens.")
    output_per_1k: float = Field(0.0, ge=0, description="Price of 1,000 completion tokens.")


class EndpointSettings(_Model):
    """One OpenAI-compatible endpoint, shared by every LLM node that names it."""

    provider: Provider = Field("openai", description="openai | azure_openai | openrouter.")
    base_url: str | None = Field(
        None, description="API base URL, e.g. http://127.0.0.1:8000/v1 (openai, openrouter)."
    )
    endpoint: str | None = Field(
        None, description="azure_openai: the resource URL, e.g. https://x.openai.azure.com."
    )
    deployment: str | None = Field(None, description="azure_openai: the deployment name.")
    api_version: str | None = Field(None, description="azure_openai: the api-version.")
    api_key_env: str | None = Field(None, description="Environment variable holding the key.")
    api_key_file: str | None = Field(None, description="A secrets file holding the key.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers (openrouter: HTTP-Referer, X-Title)."
    )
    max_in_flight: int = Field(64, ge=1, description="Requests at once, across all its nodes.")
    requests_per_minute: int | None = Field(None, ge=1, description="Request rate limit.")
    tokens_per_minute: int | None = Field(None, ge=1, description="Token rate limit.")
    timeout_seconds: float = Field(60.0, gt=0, description="Per attempt.")
    max_response_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="Longest answer body (decoded); longer is an error."
    )
    max_download_bytes: int = Field(
        1024 * 1024 * 1024, ge=1, description="Longest file download (batch job results)."
    )
    max_attempts: int = Field(5, ge=1, description="Attempts per call, the first included.")
    max_retry_wait_seconds: float = Field(
        60.0,
        gt=0,
        description="Longest wait before a retry, whatever the backoff or the server's "
        "Retry-After asks (the wait is recorded in the failed attempt's error).",
    )
    backoff: BackoffSettings = Field(default_factory=BackoffSettings, description="Retry delays.")
    circuit_breaker: BreakerSettings = Field(
        default_factory=BreakerSettings,
        description="Hold calls back (or fail them fast) while the endpoint is down.",
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict, description="Model -> price per 1,000 tokens, for `calls.cost`."
    )

    @field_validator("base_url", "endpoint")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL with a host")
            if parts.query or parts.fragment:
                raise ValueError("must not have a query or a fragment")
        return url

    @field_validator("deployment", "api_version")
    @classmethod
    def _url_part(cls, value: str | None) -> str | None:
        if value is not None and _URL_PART.fullmatch(value) is None:
            raise ValueError("may hold only letters, digits, '.', '_' and '-'")
        return value

    @field_validator("headers")
    @classmethod
    def _sendable(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            header_line(name, value)
        return headers

    @model_validator(mode="after")
    def _addressable(self) -> EndpointSettings:
        if self.provider == "azure_openai":
            if not (self.endpoint and self.deployment and self.api_version):
                raise ValueError("azure_openai needs endpoint, deployment and api_version")
        elif self.provider == "openai" and not self.base_url:
            raise ValueError("openai needs base_url")
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self
