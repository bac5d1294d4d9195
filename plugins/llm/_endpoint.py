"""An OpenAI-compatible endpoint: one HTTP client, its limits, retries and call ledger.

Every LLM node that names an endpoint shares its :class:`Endpoint`: one HTTP client
(keep-alive connections, as many as ``max_in_flight``), one limiter and one circuit
breaker.  The client is the lean one of ``_http.py``, not httpx nor aiohttp: httpx's
default pool is CPU-bound at high concurrency, httpx's request and response models
cost more CPU per call than the rest of the engine even on an aiohttp transport, and
aiohttp's own client costs twice what ``_http.py`` does (``benchmarks/llm_enrichment.py``
prints the comparison).

:meth:`Endpoint.post` makes one logical call and reports each attempt to the row's
call log (request, response, status, latency, tokens, cost).  429, 5xx, timeouts,
connection errors and unreadable answers are retried (tenacity drives the retries,
with exponential backoff, full jitter and ``Retry-After`` honoured); other 4xx are
not.  API keys come from the environment or a secrets file, travel only in headers,
and appear in no record or message.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from plugins.protocols import ExternalCall, ReplayMiss, resolve_path

from ._http import FormField, HttpClient, HttpProtocolError, multipart
from ._limits import CircuitBreaker, CircuitOpen, EndpointLimiter
from ._proxy import environment_proxy

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from plugins.protocols import CallLog, RecordedAnswer

    from ._settings import EndpointSettings

__all__ = [
    "CallFailed",
    "Endpoint",
    "HttpRequest",
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
class HttpRequest:
    """One API request: a JSON body, a multipart form (a file upload), or neither.

    ``record`` is what the call ledger stores as its request (when not given: the JSON
    body, or else the method and path); ``raw`` asks for the answer's bytes rather than
    a JSON object.
    """

    method: str
    path: str
    json: dict[str, Any] | None = None
    #: The parts of a ``multipart/form-data`` body.
    form: tuple[FormField, ...] | None = None
    record: Any = None
    raw: bool = False

    @property
    def recorded(self) -> Any:
        if self.record is not None:
            return self.record
        if self.json is not None:
            return self.json
        return {"method": self.method, "path": self.path}


@dataclass(frozen=True, slots=True)
class _Attempt:
    body: Any  # a JSON object, or bytes for a raw request
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
        self._base_url, self._query = _base_and_query(settings)
        self._client: HttpClient | None = None
        self._users = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        if self._users == 0:
            self._client = HttpClient(
                self._base_url,
                headers=self._headers(),
                max_idle=self.settings.max_in_flight,
                proxy=environment_proxy(self._base_url),
            )
        self._users += 1

    async def aclose(self) -> None:
        self._users -= 1
        if self._users == 0 and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _headers(self) -> dict[str, str]:
        headers = dict(self.settings.headers)
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
        this very request is taken instead of calling (recorded as its status says); a
        replay without one raises :class:`~plugins.ReplayMiss` (recorded as an ``error``
        call, nothing sent).  Raises :class:`CallFailed` (the last attempt's error) or
        :class:`CircuitOpen` (recorded as an ``error`` call).
        """
        try:
            recorded = calls.recorded_answer(body)
        except ReplayMiss as miss:
            calls.record(self.answered_call(body, call_type, call_index, None, miss.error))
            raise
        if recorded is not None:
            calls.record(self.answered_call(body, call_type, call_index, recorded))
            return dict(recorded.response)
        answer: dict[str, Any] = await self.call(
            HttpRequest("POST", path, json=body),
            calls=calls,
            call_type=call_type,
            call_index=call_index,
            estimated_tokens=estimated_tokens,
            timeout_seconds=timeout_seconds,
            max_attempts=max_attempts,
        )
        return answer

    def answered_call(
        self,
        body: dict[str, Any],
        call_type: str,
        call_index: int,
        recorded: RecordedAnswer | None,
        error: dict[str, Any] | None = None,
    ) -> ExternalCall:
        """The record of a call answered from the record (or, ``recorded`` being
        ``None``, refused) without calling."""
        return ExternalCall(
            call_type=call_type,
            provider=self.settings.provider,
            model=body.get("model"),
            attempt=1,
            status="error" if recorded is None else recorded.status,
            request=body,
            response=None if recorded is None else recorded.response,
            latency_ms=0.0,
            call_index=call_index,
            cost=0.0,
            error=error,
            request_hash=None if recorded is None else recorded.request_hash,
            response_hash=None if recorded is None else recorded.response_hash,
        )

    async def call(
        self,
        request: HttpRequest,
        *,
        calls: CallLog,
        call_type: str,
        call_index: int = 0,
        estimated_tokens: int = 0,
        timeout_seconds: float | None = None,
        max_attempts: int | None = None,
    ) -> Any:
        """Make ``request`` until an attempt succeeds or attempts run out (retrying as
        :meth:`post` does), each attempt reported to ``calls``; the answer (a JSON object,
        or bytes for a raw request)."""
        attempts = max_attempts or self.settings.max_attempts
        timeout = timeout_seconds or self.settings.timeout_seconds
        model = request.json.get("model") if request.json is not None else None
        common = {
            "call_type": call_type,
            "provider": self.settings.provider,
            "model": model,
            "request": request.recorded,
            "call_index": call_index,
        }

        async def attempt(number: int) -> Any:
            return await self._attempt(
                request, timeout, estimated_tokens, calls, {**common, "attempt": number}
            )

        # Most calls succeed at once: the first attempt goes without the retry machinery,
        # which costs more CPU per call than the rest of the call path.
        try:
            return await attempt(1)
        except CallFailed as exc:
            if not exc.retryable or attempts == 1:
                raise
            await self._pause(self._backoff(1, exc))

        def wait(state: RetryCallState) -> float:
            outcome = state.outcome
            failure = None if outcome is None else outcome.exception()
            return self._backoff(state.attempt_number + 1, failure)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts - 1),
            wait=wait,
            retry=retry_if_exception(lambda exc: isinstance(exc, CallFailed) and exc.retryable),
            sleep=self._pause,
            reraise=True,
        )
        async for retry in retrying:
            with retry:
                return await attempt(retry.retry_state.attempt_number + 1)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    @staticmethod
    async def _pause(seconds: float) -> None:
        """The wait before a retry."""
        await anyio.sleep(seconds)

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
        request: HttpRequest,
        limit_seconds: float,
        estimated_tokens: int,
        calls: CallLog,
        common: dict[str, Any],
    ) -> Any:
        """One attempt, recorded whatever its end: an answer, an error, or cancellation."""
        # The breaker is asked once a slot is held, before any rate allowance is taken:
        # calls queued behind max_in_flight when it opens fail fast too, half-open lets
        # exactly one probe out, and a refused call costs no allowance.
        try:
            async with self.limiter.slot(estimated_tokens, self.breaker.before_call) as usage:
                started = time.perf_counter()
                answer, http_status = await self._exchange(
                    request, limit_seconds, calls, common, started
                )
                prompt, completion = reported_usage(answer)
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
                response=_recorded_answer(answer),
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
        request: HttpRequest,
        limit_seconds: float,
        calls: CallLog,
        common: dict[str, Any],
        started: float,
    ) -> tuple[Any, int]:
        """Send the request; a failed exchange is told to the breaker and recorded."""
        try:
            result = await self._send(request, limit_seconds)
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

    async def _send(self, request: HttpRequest, limit_seconds: float) -> _Attempt:
        client = self._client
        if client is None:
            raise RuntimeError(f"endpoint '{self.name}' is not open")
        body: bytes | None = None
        content_type: str | None = None
        if request.json is not None:
            body, content_type = orjson.dumps(request.json), "application/json"
        elif request.form is not None:
            body, content_type = multipart(request.form)
        try:
            response = await client.request(
                request.method,
                request.path + self._query,
                body,
                content_type=content_type,
                limit_seconds=limit_seconds,
            )
        except TimeoutError:
            raise CallFailed(
                {"type": "Timeout", "message": f"no answer within {limit_seconds} s"},
                retryable=True,
            ) from None
        except (HttpProtocolError, OSError) as exc:
            error = {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__}
            raise CallFailed(error, retryable=True) from None
        content, status = response.body, response.status
        retry_after = _retry_after(response.headers)
        if status >= 400:
            retryable = status == 429 or status >= 500
            error = {"type": "HTTPStatusError", "message": f"HTTP {status}", "body": _text(content)}
            raise CallFailed(
                error, retryable=retryable, http_status=status, retry_after=retry_after
            )
        if request.raw:
            return _Attempt(content, status)
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


def _base_and_query(settings: EndpointSettings) -> tuple[str, str]:
    """The URL every API path is appended to, and the query that follows the path."""
    if settings.provider == "azure_openai":
        assert settings.endpoint is not None
        base = f"{settings.endpoint.rstrip('/')}/openai/deployments/{settings.deployment}"
        return base, f"?api-version={settings.api_version}"
    return (settings.base_url or _OPENROUTER_URL).rstrip("/"), ""


def _recorded_answer(answer: Any) -> Any:
    """What the ledger stores of an answer: the JSON, or a digest of raw bytes (a
    downloaded file, whose lines are recorded one by one where they are used)."""
    if isinstance(answer, bytes):
        return {"bytes": len(answer), "sha256": hashlib.sha256(answer).hexdigest()}
    return answer


def reported_usage(answer: Any) -> tuple[int | None, int | None]:
    """Prompt and completion tokens the answer reports (``None`` where it reports none)."""
    reported = answer.get("usage") if isinstance(answer, dict) else None
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
