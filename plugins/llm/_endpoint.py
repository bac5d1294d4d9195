"""An OpenAI-compatible endpoint: one HTTP client, its limits, retries and call ledger.

Every LLM node that names an endpoint shares its :class:`Endpoint`: one aiohttp
session (connection pool sized to ``max_in_flight``), one limiter and one circuit
breaker.  aiohttp directly, not httpx: httpx's default pool is CPU-bound at high
concurrency, and even on an aiohttp transport httpx's request and response models
cost more CPU per call than the rest of the engine (``benchmarks/llm_enrichment.py``
prints all three).

:meth:`Endpoint.post` makes one logical call and reports each attempt to the row's
call log (request, response, status, latency, tokens, cost).  429, 5xx, timeouts,
connection errors and unreadable answers are retried (tenacity drives the retries,
with exponential backoff, full jitter and ``Retry-After`` honoured); other 4xx are
not.  API keys come from the environment or a secrets file, travel only in headers,
and appear in no record or message.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from plugins.protocols import ExternalCall, resolve_path

from ._limits import CircuitBreaker, CircuitOpen, EndpointLimiter

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from plugins.protocols import CallLog

    from ._settings import EndpointSettings

__all__ = [
    "CallFailed",
    "Endpoint",
]

_OPENROUTER_URL = "https://openrouter.ai/api/v1"


class CallFailed(Exception):
    """A call attempt failed; ``error`` is what is recorded, ``retryable`` says if it may
    be tried again, ``retry_after`` is the server's ``Retry-After`` in seconds."""

    def __init__(
        self,
        error: dict[str, Any],
        *,
        retryable: bool,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(error["message"])
        self.error = error
        self.retryable = retryable
        self.http_status = http_status
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class _Attempt:
    body: dict[str, Any]
    http_status: int


class Endpoint:
    """The shared runtime of one configured endpoint (client, limiter, breaker).

    Nodes :meth:`open` and :meth:`aclose` it around their run; the HTTP client exists
    while at least one node has it open.
    """

    def __init__(self, name: str, settings: EndpointSettings, base_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.base_dir = base_dir
        self.limiter = EndpointLimiter(
            settings.max_in_flight, settings.requests_per_minute, settings.tokens_per_minute
        )
        cb = settings.circuit_breaker
        self.breaker = CircuitBreaker(name, cb.failure_threshold, cb.reset_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._users = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        if self._users == 0:
            connector = aiohttp.TCPConnector(limit=self.settings.max_in_flight)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None),  # each attempt has its own limit
            )
        self._users += 1

    async def aclose(self) -> None:
        self._users -= 1
        if self._users == 0 and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", **self.settings.headers}
        key = self._api_key()
        if key is not None:
            if self.settings.provider == "azure_openai":
                headers["api-key"] = key
            else:
                headers["authorization"] = f"Bearer {key}"
        return headers

    def _api_key(self) -> str | None:
        s = self.settings
        if s.api_key_env:
            key = os.environ.get(s.api_key_env)
            if not key:
                raise LookupError(
                    f"endpoint '{self.name}': environment variable {s.api_key_env} is not set"
                )
            return key
        if s.api_key_file:
            path = resolve_path(s.api_key_file, self.base_dir)
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise LookupError(
                    f"endpoint '{self.name}': cannot read api_key_file: {exc.strerror}"
                ) from None
        return None

    def url(self, path: str) -> str:
        """The URL of API ``path`` (``/chat/completions``, ``/embeddings``)."""
        s = self.settings
        if s.provider == "azure_openai":
            assert s.endpoint is not None
            base = f"{s.endpoint.rstrip('/')}/openai/deployments/{s.deployment}"
            return f"{base}{path}?api-version={s.api_version}"
        base = s.base_url or _OPENROUTER_URL
        return base.rstrip("/") + path

    def cost(self, model: str, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        price = self.settings.prices.get(model)
        if price is None:
            return 0.0
        prompt = (prompt_tokens or 0) * price.input_per_1k
        return (prompt + (completion_tokens or 0) * price.output_per_1k) / 1000.0

    # -- calling -----------------------------------------------------------------------

    async def post(
        self,
        path: str,
        body: dict[str, Any],
        *,
        calls: CallLog,
        call_type: str,
        call_index: int = 0,
        estimated_tokens: int = 0,
        timeout_seconds: float | None = None,
        max_attempts: int | None = None,
    ) -> dict[str, Any]:
        """POST ``body`` to ``path`` until an attempt succeeds or attempts run out.

        Every attempt is reported to ``calls``.  An answer ``calls`` has on record for
        this very request is taken instead of calling (recorded as its status says).
        Raises :class:`CallFailed` (the last attempt's error) or :class:`CircuitOpen`
        (recorded as an ``error`` call).
        """
        attempts = max_attempts or self.settings.max_attempts
        timeout = timeout_seconds or self.settings.timeout_seconds
        common = {
            "call_type": call_type,
            "provider": self.settings.provider,
            "model": body.get("model"),
            "request": body,
            "call_index": call_index,
        }

        recorded = calls.recorded_answer(body)
        if recorded is not None:
            calls.record(
                ExternalCall(
                    call_type=call_type,
                    provider=self.settings.provider,
                    model=body.get("model"),
                    attempt=1,
                    status=recorded.status,
                    request=body,
                    response=recorded.response,
                    latency_ms=0.0,
                    call_index=call_index,
                    cost=0.0,
                )
            )
            return dict(recorded.response)

        async def attempt(number: int) -> dict[str, Any]:
            return await self._attempt(
                path, body, timeout, estimated_tokens, calls, {**common, "attempt": number}
            )

        # Most calls succeed at once: the first attempt goes without the retry machinery,
        # which costs more CPU per call than the rest of the call path.
        try:
            return await attempt(1)
        except CallFailed as exc:
            if not exc.retryable or attempts == 1:
                raise
            await anyio.sleep(self._backoff(1, exc))

        def wait(state: RetryCallState) -> float:
            outcome = state.outcome
            failure = None if outcome is None else outcome.exception()
            return self._backoff(state.attempt_number + 1, failure)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts - 1),
            wait=wait,
            retry=retry_if_exception(lambda exc: isinstance(exc, CallFailed) and exc.retryable),
            sleep=anyio.sleep,
            reraise=True,
        )
        async for retry in retrying:
            with retry:
                return await attempt(retry.retry_state.attempt_number + 1)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    def _backoff(self, failed_attempt: int, failure: BaseException | None) -> float:
        """Seconds to wait after attempt ``failed_attempt`` failed: "full jitter", a random
        delay up to the doubling backoff (capped), or the server's ``Retry-After`` if it
        asks for longer."""
        backoff = self.settings.backoff
        ceiling = min(backoff.max_seconds, backoff.initial_seconds * 2 ** (failed_attempt - 1))
        delay = random.uniform(0.0, ceiling)
        if isinstance(failure, CallFailed) and failure.retry_after is not None:
            delay = max(delay, failure.retry_after)  # the server's word beats the cap
        return delay

    async def _attempt(
        self,
        path: str,
        body: dict[str, Any],
        limit_seconds: float,
        estimated_tokens: int,
        calls: CallLog,
        common: dict[str, Any],
    ) -> dict[str, Any]:
        """One attempt, recorded whatever its end: an answer, an error, or cancellation."""
        # The breaker is asked once a slot is held, before any rate allowance is taken:
        # calls queued behind max_in_flight when it opens fail fast too, half-open lets
        # exactly one probe out, and a refused call costs no allowance.
        try:
            async with self.limiter.slot(estimated_tokens, self.breaker.before_call) as usage:
                started = time.perf_counter()
                answer, http_status = await self._exchange(
                    path, body, limit_seconds, calls, common, started
                )
                prompt, completion = _usage(answer)
                if prompt is not None or completion is not None:
                    usage.actual((prompt or 0) + (completion or 0))
        except CircuitOpen as exc:
            error = {"type": "CircuitOpen", "message": str(exc), "circuit_open": True}
            calls.record(ExternalCall(**common, status="error", response=None,
                                      latency_ms=0.0, error=error))  # fmt: skip
            raise
        self.breaker.succeeded()
        latency = (time.perf_counter() - started) * 1000.0
        model = str(common["model"])
        calls.record(
            ExternalCall(
                **common,
                status="success",
                response=answer,
                latency_ms=latency,
                http_status=http_status,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cost=self.cost(model, prompt, completion),
            )
        )
        return answer

    async def _exchange(
        self,
        path: str,
        body: dict[str, Any],
        limit_seconds: float,
        calls: CallLog,
        common: dict[str, Any],
        started: float,
    ) -> tuple[dict[str, Any], int]:
        """Send the request; a failed exchange is told to the breaker and recorded."""
        try:
            result = await self._send(path, body, limit_seconds)
        except CallFailed as exc:
            if exc.retryable:
                self.breaker.failed()
            else:  # the endpoint answered; the request was wrong
                self.breaker.succeeded()
            self._record_failure(calls, common, started, exc, exc.error, exc.http_status)
            raise
        except BaseException as exc:  # cancelled (shutdown), or a bug: still on record
            self.breaker.abandoned()
            error = {"type": type(exc).__name__, "message": str(exc) or "cancelled"}
            self._record_failure(calls, common, started, exc, error, None)
            raise
        return result.body, result.http_status

    @staticmethod
    def _record_failure(
        calls: CallLog,
        common: dict[str, Any],
        started: float,
        failure: BaseException,
        error: dict[str, Any],
        http_status: int | None,
    ) -> None:
        """Record a failed attempt; if recording itself fails (the audit writer is gone),
        the attempt's own failure still propagates, with a note saying so."""
        latency = (time.perf_counter() - started) * 1000.0
        try:
            calls.record(ExternalCall(**common, status="error", response=None,
                                      latency_ms=latency, http_status=http_status,
                                      error=error))  # fmt: skip
        except Exception as exc:
            failure.add_note(f"the failed attempt could not be recorded: {exc!r}")

    async def _send(self, path: str, body: dict[str, Any], limit_seconds: float) -> _Attempt:
        session = self._session
        if session is None:
            raise RuntimeError(f"endpoint '{self.name}' is not open")
        try:
            with anyio.fail_after(limit_seconds):
                async with session.post(self.url(path), data=orjson.dumps(body)) as response:
                    content = await response.read()
                    status = response.status
                    retry_after = _retry_after(response.headers)
        except TimeoutError:
            raise CallFailed(
                {"type": "Timeout", "message": f"no answer within {limit_seconds} s"},
                retryable=True,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            error = {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__}
            raise CallFailed(error, retryable=True) from None
        if status >= 400:
            retryable = status == 429 or status >= 500
            error = {"type": "HTTPStatusError", "message": f"HTTP {status}", "body": _text(content)}
            raise CallFailed(
                error, retryable=retryable, http_status=status, retry_after=retry_after
            )
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            error = {"type": "MalformedResponse", "message": "the answer is not JSON",
                     "body": _text(content)}  # fmt: skip
            raise CallFailed(error, retryable=True, http_status=status) from None
        if not isinstance(parsed, dict):
            error = {"type": "MalformedResponse", "message": "the answer is not a JSON object"}
            raise CallFailed(error, retryable=True, http_status=status)
        return _Attempt(parsed, status)


def _usage(answer: dict[str, Any]) -> tuple[int | None, int | None]:
    """Prompt and completion tokens the answer reports (``None`` where it reports none)."""
    reported = answer.get("usage")
    tokens: dict[str, Any] = reported if isinstance(reported, dict) else {}
    prompt, completion = tokens.get("prompt_tokens"), tokens.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
    )


def _text(content: bytes, limit: int = 500) -> str:
    return content[:limit].decode("utf-8", "replace")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms`` (OpenAI's, precise) or
    ``Retry-After`` in seconds; ``None`` when it names none."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return None
