"""An OpenAI-compatible endpoint: one HTTP client, its limits, retries and call ledger.

Every LLM node that names an endpoint shares its :class:`Endpoint`: one
:class:`httpx.AsyncClient` (keep-alive connections, as many as ``max_in_flight``; see
``_client.py`` for its transport), one limiter and one circuit breaker.  An answer
longer than ``max_response_bytes`` is that attempt's error, found while it streams in.

:meth:`Endpoint.post` makes one logical call and reports each attempt to the row's
call log (request, response, status, latency, tokens, cost).  429, 5xx, timeouts,
connection errors and unreadable answers are retried (tenacity drives the retries,
with exponential backoff, full jitter and ``Retry-After`` honoured); other 4xx are
not.  API keys come from the environment or a secrets file and travel only in
headers, which are not recorded.  Every secret the endpoint knows — its key, the
passwords of its URL and of the proxies in the environment — is masked (``***``) in
what it records and raises: an answer or error body that echoes it, a transport error
that quotes a URL with credentials (``plugins/_secrets.py``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from plugins._secrets import Secrets, endpoint_secrets, environment_secrets
from plugins.protocols import ExternalCall, ReplayMiss, StopRun, resolve_path

from ._client import ResponseTooLarge, endpoint_client, read_capped, transport_failure
from ._limits import CircuitBreaker, CircuitOpen, EndpointLimiter

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from plugins.protocols import CallLog, RecordedAnswer

    from ._client import HttpClientChoice
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

    ``path`` follows the endpoint's base URL and may carry a query of its own.

    ``record`` is what the call ledger stores as its request (when not given: the JSON
    body, or else the method and path); ``raw`` asks for the answer's bytes rather than
    a JSON object.
    """

    method: str
    path: str
    json: dict[str, Any] | None = None
    #: The fields of a ``multipart/form-data`` body, and its files, each as
    #: ``(filename, content, content type)``.
    form: Mapping[str, str] | None = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
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
    while at least one node has it open.  ``http_client`` is a caller's own
    :class:`httpx.AsyncClient` (used as it is, never closed here) or transport (used
    by the client made here, never closed here either).
    """

    def __init__(
        self,
        name: str,
        settings: EndpointSettings,
        base_dir: Path,
        *,
        http_client: HttpClientChoice | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.base_dir = base_dir
        self.limiter = EndpointLimiter(
            settings.max_in_flight, settings.requests_per_minute, settings.tokens_per_minute
        )
        cb = settings.circuit_breaker
        self.breaker = CircuitBreaker(
            name,
            cb.failure_threshold,
            cb.reset_seconds,
            wait=cb.on_open == "wait",
            max_outage_seconds=cb.max_outage_seconds,
        )
        self._base_url, self._params = _base_and_params(settings)
        # Parsing a URL costs httpx more than the rest of building a request: each
        # path's URL is parsed once (the paths an endpoint calls are few).
        self._url = functools.lru_cache(maxsize=64)(self._parsed_url)
        self._given_client = http_client
        self._client: httpx.AsyncClient | None = None
        self._owns_client = False
        #: Headers each request carries itself: the content type of a JSON body, and
        #: the endpoint's own (key, extras) when the client is a caller's.
        self._json_headers: dict[str, str] = {}
        self._other_headers: dict[str, str] = {}
        #: What is masked in the answers and errors it records (read when it opens).
        self._secrets = Secrets()
        self._users = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        if self._users == 0:
            headers = self._headers()
            self._secrets = self._known_secrets()
            self._client, self._owns_client = endpoint_client(
                self._base_url,
                connections=self.settings.max_in_flight,
                headers=headers,
                given=self._given_client,
            )
            self._other_headers = {} if self._owns_client else headers
            self._json_headers = {**self._other_headers, "content-type": "application/json"}
        self._users += 1

    async def aclose(self) -> None:
        self._users -= 1
        if self._users == 0 and self._client is not None:
            client, self._client = self._client, None
            if self._owns_client:
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

    def _known_secrets(self) -> Secrets:
        """The secrets this endpoint knows now: its key, its URLs' passwords, its
        credential headers, and the proxy credentials and ``PGPASSWORD`` of the
        environment."""
        return endpoint_secrets(self.settings, self.base_dir) | environment_secrets()

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
        call, nothing sent).  Raises :class:`CallFailed` (the last attempt's error),
        :class:`CircuitOpen` (``on_open: fail``; recorded as an ``error`` call) or
        :class:`~plugins.StopRun` (the budget cannot cover the call, or the endpoint is
        down past ``max_outage_seconds``: the row is left for a resume).
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
        or bytes for a raw request).

        The wait before a retry is at most ``max_retry_wait_seconds`` (whatever the
        server's ``Retry-After``), and is recorded in the failed attempt's error.  Each
        attempt reserves ``estimated_tokens`` (the prompt's estimate plus the longest
        answer asked for) and their cost in ``calls`` before it is sent: a
        :class:`~plugins.StopRun` when the budget cannot cover them, nothing sent.  An
        open breaker holds attempts back (``on_open: wait``, not counted as attempts;
        :class:`EndpointDown` past ``max_outage_seconds``) or refuses them
        (:class:`CircuitOpen`).
        """
        attempts = max_attempts or self.settings.max_attempts
        timeout = timeout_seconds or self.settings.timeout_seconds
        model = request.json.get("model") if request.json is not None else None
        cost = self._estimated_cost(request, estimated_tokens)
        common = {
            "call_type": call_type,
            "provider": self.settings.provider,
            "model": model,
            "request": request.recorded,
            "call_index": call_index,
        }

        async def attempt(number: int) -> Any:
            return await self._attempt(
                request,
                timeout,
                (estimated_tokens, cost),
                calls,
                {**common, "attempt": number},
                last=number >= attempts,
            )

        # Most calls succeed at once: the first attempt goes without the retry machinery,
        # which costs more CPU per call than the rest of the call path.
        try:
            return await attempt(1)
        except CallFailed as exc:
            if not exc.retryable or attempts == 1:
                raise
            await self._pause(self._planned_wait(exc))

        def wait(state: RetryCallState) -> float:
            outcome = state.outcome
            return self._planned_wait(None if outcome is None else outcome.exception())

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
        asks for longer — never more than ``max_retry_wait_seconds`` (a server asking
        for ``inf`` or ``1e9`` seconds does not hold the row for ever)."""
        backoff = self.settings.backoff
        ceiling = min(backoff.max_seconds, backoff.initial_seconds * 2 ** (failed_attempt - 1))
        delay = random.uniform(0.0, ceiling)
        if isinstance(failure, CallFailed) and failure.retry_after is not None:
            delay = max(delay, failure.retry_after)  # the server's word beats the backoff
        return min(delay, self.settings.max_retry_wait_seconds)

    def _plan_retry(self, failed_attempt: int, failure: CallFailed) -> None:
        """Decide the wait before the attempt after ``failed_attempt`` and put it in the
        failure's recorded error: ``retry_wait_seconds`` (what :meth:`_planned_wait`
        waits), the server's ``retry_after_seconds`` if it named one (``"inf"`` if it
        asked for ever), and ``retry_wait_capped`` when the cap cut it short."""
        wait = round(self._backoff(failed_attempt, failure), 3)
        failure.error["retry_wait_seconds"] = wait
        asked = failure.retry_after
        if asked is not None:
            failure.error["retry_after_seconds"] = asked if math.isfinite(asked) else str(asked)
            if asked > wait:
                failure.error["retry_wait_capped"] = True

    @staticmethod
    def _planned_wait(failure: BaseException | None) -> float:
        """The wait :meth:`_plan_retry` recorded for ``failure`` (0 when none was)."""
        if isinstance(failure, CallFailed):
            return float(failure.error.get("retry_wait_seconds", 0.0))
        return 0.0

    def _estimated_cost(self, request: HttpRequest, estimated_tokens: int) -> float:
        """What ``estimated_tokens`` of ``request`` may cost at most: the answer's part
        (the body's ``max_tokens``) at the output price and the rest at the input price,
        or all of it at the dearer price when the body sets no ``max_tokens``."""
        model = request.json.get("model") if request.json is not None else None
        price = self.settings.prices.get(str(model))
        if price is None or estimated_tokens <= 0:
            return 0.0
        assert request.json is not None
        answer = request.json.get("max_tokens")
        if isinstance(answer, int) and 0 <= answer <= estimated_tokens:
            return self.cost(str(model), estimated_tokens - answer, answer)
        return estimated_tokens * max(price.input_per_1k, price.output_per_1k) / 1000.0

    async def _attempt(
        self,
        request: HttpRequest,
        limit_seconds: float,
        estimate: tuple[int, float],
        calls: CallLog,
        common: dict[str, Any],
        *,
        last: bool,
    ) -> Any:
        """One attempt, recorded whatever its end: an answer, an error, or cancellation.

        The breaker is asked once a slot is held, before any rate allowance is taken:
        calls queued behind max_in_flight when it opens are held back too, half-open
        lets exactly one probe out, and a refused call costs no allowance.  Refused, the
        attempt fails fast (``on_open: fail``: :class:`CircuitOpen`, recorded) or waits
        for the breaker without holding a slot and asks again (``on_open: wait``): time
        waiting is no attempt.
        """
        while True:
            try:
                return await self._attempt_once(
                    request, limit_seconds, estimate, calls, common, last=last
                )
            except CircuitOpen as exc:
                if not self.breaker.wait:
                    error = {"type": "CircuitOpen", "message": str(exc), "circuit_open": True}
                    calls.record(ExternalCall(**common, status="error", response=None,
                                              latency_ms=0.0, error=error))  # fmt: skip
                    raise
            await self.breaker.wait_until_callable()

    async def _attempt_once(
        self,
        request: HttpRequest,
        limit_seconds: float,
        estimate: tuple[int, float],
        calls: CallLog,
        common: dict[str, Any],
        *,
        last: bool,
    ) -> Any:
        """Send the attempt once the breaker, a slot and the rate allowance let it go
        and its ``(tokens, cost)`` estimate is reserved in ``calls``; the reservation is
        released right after the attempt's record (its actual usage) is made."""
        tokens, cost = estimate
        async with self.limiter.slot(tokens, self.breaker.before_call) as usage:
            try:
                reservation = await calls.reserve(tokens, cost)
            except StopRun:
                usage.actual(0)  # nothing was sent
                self.breaker.abandoned()  # were it the probe, another may go
                raise
            with reservation:
                started = time.perf_counter()
                answer, http_status = await self._exchange(
                    request, limit_seconds, calls, common, started, last=last
                )
                prompt, completion = reported_usage(answer)
                if prompt is not None or completion is not None:
                    usage.actual((prompt or 0) + (completion or 0))
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
        *,
        last: bool,
    ) -> tuple[Any, int]:
        """Send the request; a failed exchange is told to the breaker and recorded (a
        retryable one, unless it was the ``last`` attempt, with the wait before the
        next)."""
        try:
            result = await self._send(request, limit_seconds)
        except CallFailed as exc:
            if exc.retryable:
                self.breaker.failed()
                if not last:
                    self._plan_retry(common["attempt"], exc)
            else:  # the endpoint answered; the request was wrong
                self.breaker.succeeded()
            self._record_failure(calls, common, started, exc, exc.error, exc.http_status)
            raise
        except BaseException as exc:  # cancelled (shutdown), or a bug: still on record
            self.breaker.abandoned()
            error = self._secrets.scrub_error(
                {"type": type(exc).__name__, "message": str(exc) or "cancelled"}
            )
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

    def _parsed_url(self, path: str) -> httpx.URL:
        """The URL of ``path`` (which may carry a query), with the endpoint's parameters."""
        url = httpx.URL(self._base_url + path)
        return url.copy_merge_params(self._params) if self._params else url

    async def _send(self, request: HttpRequest, limit_seconds: float) -> _Attempt:
        """One exchange, within ``limit_seconds`` from connecting to the answer's last
        byte; :class:`CallFailed` when it fails or the endpoint refuses the request.
        Neither the answer nor the error holds a secret the endpoint knows."""
        try:
            content, status, retry_after = await self._transfer(request, limit_seconds)
            return self._answer(request, content, status, retry_after)
        except CallFailed as exc:
            raise CallFailed(
                self._secrets.scrub_error(exc.error),
                retryable=exc.retryable,
                http_status=exc.http_status,
                retry_after=exc.retry_after,
            ) from None

    async def _transfer(
        self, request: HttpRequest, limit_seconds: float
    ) -> tuple[bytes, int, float | None]:
        """Send the request and read the whole answer: its body, HTTP status and
        ``Retry-After``; :class:`CallFailed` when no answer came."""
        client = self._client
        if client is None:
            raise RuntimeError(f"endpoint '{self.name}' is not open")
        limit = (
            self.settings.max_download_bytes if request.raw else self.settings.max_response_bytes
        )
        json = request.json is not None
        http_request = client.build_request(
            request.method,
            self._url(request.path),
            headers=self._json_headers if json else self._other_headers,
            content=orjson.dumps(request.json) if json else None,
            data=request.form,
            files=request.files,
            timeout=limit_seconds,
        )
        try:
            with anyio.fail_after(limit_seconds):
                response = await client.send(http_request, stream=True)
                try:
                    content = await read_capped(response, limit)
                finally:
                    await response.aclose()
        except TimeoutError:  # the deadline of fail_after
            raise CallFailed(
                {"type": "Timeout", "message": f"no answer within {limit_seconds} s"},
                retryable=True,
            ) from None
        except ResponseTooLarge as exc:
            error = {"type": "ResponseTooLarge", "message": str(exc)}
            raise CallFailed(error, retryable=False) from None
        except (httpx.TransportError, httpx.DecodingError, OSError) as exc:
            failure = transport_failure(exc)
            if failure.timed_out:
                error = {"type": "Timeout", "message": f"{failure.type}: {failure.message}"}
            else:
                error = {"type": failure.type, "message": failure.message}
            raise CallFailed(error, retryable=True) from None
        return content, response.status_code, _retry_after(response.headers)

    def _answer(
        self, request: HttpRequest, content: bytes, status: int, retry_after: float | None
    ) -> _Attempt:
        """The attempt's answer, with the secrets the endpoint knows masked in it (in a
        JSON answer's strings only: its shape and numbers stay as they came), or
        :class:`CallFailed` for an error status or an unreadable answer.  An error body
        is masked before it is cut short, so no part of a secret is left at the cut."""
        if status >= 400:
            retryable = status == 429 or status >= 500
            body = _text(self._secrets.scrub_bytes(content))
            error = {"type": "HTTPStatusError", "message": f"HTTP {status}", "body": body}
            raise CallFailed(
                error, retryable=retryable, http_status=status, retry_after=retry_after
            )
        if request.raw:
            return _Attempt(self._secrets.scrub_bytes(content), status)
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            error = {"type": "MalformedResponse", "message": "the answer is not JSON",
                     "body": _text(self._secrets.scrub_bytes(content))}  # fmt: skip
            raise CallFailed(error, retryable=True, http_status=status) from None
        if not isinstance(parsed, dict):
            error = {"type": "MalformedResponse", "message": "the answer is not a JSON object"}
            raise CallFailed(error, retryable=True, http_status=status)
        if self._secrets.found_in(content):
            parsed = self._secrets.scrub(parsed)
        return _Attempt(parsed, status)


def _base_and_params(settings: EndpointSettings) -> tuple[str, dict[str, str]]:
    """The URL every API path is appended to, and the query parameters every request
    carries."""
    if settings.provider == "azure_openai":
        assert settings.endpoint is not None
        assert settings.api_version is not None
        base = f"{settings.endpoint.rstrip('/')}/openai/deployments/{settings.deployment}"
        return base, {"api-version": settings.api_version}
    return (settings.base_url or _OPENROUTER_URL).rstrip("/"), {}


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
