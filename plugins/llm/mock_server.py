"""An OpenAI-compatible mock LLM server for tests, dry runs and benchmarks.

Routes (JSON in, JSON out, except where noted)::

    POST /v1/chat/completions                                 chat answers
    POST /v1/embeddings                                       unit vectors
    POST /openai/deployments/{name}/chat/completions?api-version=...   Azure style
    POST /openai/deployments/{name}/embeddings?api-version=...
    POST /v1/files                                            upload a batch file (multipart)
    GET  /v1/files/{id}/content                               a file's bytes
    POST /v1/batches                                          create a batch job
    GET  /v1/batches?limit=&after=                            jobs, newest first
    GET  /v1/batches/{id}                                     the job as it is now
    POST /v1/batches/{id}/cancel                              cancel the job
    GET  /stats                                               counters (MockStats.to_json)
    POST /stats/reset                                         zero the counters

Answers are deterministic in the prompt, the model and the seed (see ``_mock_answers``).
An API request is handled in this order: it is counted and in flight; without the
configured key it gets a 401; its fate is drawn (``_mock_faults``); a hanging request hangs,
any other waits its latency, then gets its injected fault or its answer.  Files and batch
requests are counted and need the key too, but are never delayed or faulted: batch jobs
have their own delay and failures (``_mock_batches``), and a request inside a job is
answered exactly as ``/v1/chat/completions`` answers its body.  ``/stats`` needs no key
and is never delayed or faulted.

In tests::

    async with MockLlmServer(MockSettings(seed=7)) as server:
        client = httpx.AsyncClient(base_url=server.base_url)   # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import hmac
import itertools
import math
import time
from typing import TYPE_CHECKING, Any, Self, TypeAlias

import anyio
import orjson
from aiohttp import web

from ._mock_answers import Answerer, ChatAnswer
from ._mock_batches import BatchError, BatchStore, read_upload
from ._mock_faults import Dice, Fate, close_after, malformed, reset, send_truncated
from ._mock_schema import BadRequest
from ._mock_settings import Fault, MockSettings
from ._mock_stats import MockStats, StatsCounter

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from anyio.abc import TaskStatus

__all__ = ["MockLlmServer", "serve"]

_SHUTDOWN_SECONDS = 1.0
_AZURE_PREFIX = "/openai/deployments/"


class _Endpoint(enum.Enum):
    CHAT = "chat/completions"
    EMBEDDINGS = "embeddings"


_OPENAI_ROUTES = {"/v1/" + endpoint.value: endpoint for endpoint in _Endpoint}
_AZURE_ROUTES = {endpoint.value: endpoint for endpoint in _Endpoint}


class _BatchOp(enum.Enum):
    UPLOAD = "upload"
    CONTENT = "content"
    CREATE = "create"
    LIST = "list"
    RETRIEVE = "retrieve"
    CANCEL = "cancel"


_Serve: TypeAlias = "Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]"


def _route(path: str) -> tuple[_Endpoint, str | None] | None:
    """The API endpoint of ``path`` and, for an Azure path, its deployment name."""
    endpoint = _OPENAI_ROUTES.get(path)
    if endpoint is not None:
        return endpoint, None
    if not path.startswith(_AZURE_PREFIX):
        return None
    deployment, _, rest = path[len(_AZURE_PREFIX) :].partition("/")
    endpoint = _AZURE_ROUTES.get(rest)
    return (endpoint, deployment) if endpoint is not None and deployment else None


def _batch_route(path: str, method: str) -> tuple[str, _BatchOp, str] | None:
    """The method, operation and file or batch id (``""`` if none) of a Batch API path
    (``/v1/batches`` takes GET to list and POST to create)."""
    match path.split("/"):
        case ["", "v1", "files"]:
            return "POST", _BatchOp.UPLOAD, ""
        case ["", "v1", "files", file_id, "content"] if file_id:
            return "GET", _BatchOp.CONTENT, file_id
        case ["", "v1", "batches"] if method == "GET":
            return "GET", _BatchOp.LIST, ""
        case ["", "v1", "batches"]:
            return "POST", _BatchOp.CREATE, ""
        case ["", "v1", "batches", batch_id] if batch_id:
            return "GET", _BatchOp.RETRIEVE, batch_id
        case ["", "v1", "batches", batch_id, "cancel"] if batch_id:
            return "POST", _BatchOp.CANCEL, batch_id
    return None


def _error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    """An error document shaped like OpenAI's."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


_CALM = Fate(latency=0.0)
_FAULT_REPLIES = {
    Fault.RATE_LIMITED: (429, _error_body("Rate limit reached.", "requests", "rate_limited")),
    Fault.SERVER_ERROR: (500, _error_body("The server had an error.", "server_error")),
    Fault.UNAVAILABLE: (503, _error_body("The server is overloaded.", "server_error")),
}


def _completion(answer: ChatAnswer, model: str, number: int) -> dict[str, Any]:
    """The body of a chat completion response carrying ``answer``."""
    return {
        "id": f"chatcmpl-mock{number:010d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "ledgerflow-mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.content},
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
    }


class _State(enum.Enum):
    NEW = "not started"
    RUNNING = "running"
    CLOSED = "closed"


class MockLlmServer:
    """The mock LLM server as an async context manager, listening while inside it.

    ``port=0`` (the default) lets the system pick a free port; read it back from
    :attr:`port` or :attr:`base_url`.  Leaving the context stops listening, ends hanging
    requests and waits up to a second for answers still being sent.  A server runs once.
    """

    def __init__(
        self, settings: MockSettings | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.settings = settings or MockSettings()
        self._address = (host, port)
        self._stats = StatsCounter()
        self._dice = Dice(self.settings)
        self._answerer = Answerer(self.settings.seed, self.settings.embedding_dimensions)
        self._numbers = itertools.count(1)
        self._batches = BatchStore(self.settings, self._stats, self._answer_batched)
        self._closing = asyncio.Event()
        self._runner: web.ServerRunner | None = None
        self._port = 0
        self._state = _State.NEW
        retry_after = self.settings.retry_after_seconds
        self._retry_headers = {
            "Retry-After": str(math.ceil(retry_after)),
            "retry-after-ms": str(round(retry_after * 1000)),
        }

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"this MockLlmServer is {self._state.value}; it runs only once")
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=_SHUTDOWN_SECONDS)
        await runner.setup()
        try:
            await web.TCPSite(runner, *self._address).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._port = runner, runner.addresses[0][1]
        self._state = _State.RUNNING
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = _State.CLOSED
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        self._check_running()
        return self._port

    @property
    def origin(self) -> str:
        """``http://HOST:PORT``: the root for Azure-style clients and ``/stats``."""
        return f"http://{self._address[0]}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: the ``base_url`` of an OpenAI-style client."""
        return self.origin + "/v1"

    def statistics(self) -> MockStats:
        """The counters as they are now (the same record ``GET /stats`` reports)."""
        return self._stats.snapshot(self._batches.job_counts())

    async def wait_in_flight(self, count: int) -> None:
        """Return once exactly ``count`` API requests are in flight (hanging ones included)."""
        await self._stats.wait_in_flight(count)

    def reset_statistics(self) -> None:
        """Zero the counters (``POST /stats/reset``); requests in flight stay counted as such."""
        self._stats.reset()

    def _check_running(self) -> None:
        if self._state is not _State.RUNNING:
            raise RuntimeError(f"the mock LLM server is {self._state.value}; use `async with`")

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        found = self._find_route(request.path, request.method)
        if found is None:
            return self._control(request)
        method, serve = found
        if request.method != method:
            return _json(405, _error_body(f"Use {method}.", "invalid_request_error"))
        self._stats.begin(request.path)
        try:
            return await serve(request)
        finally:
            self._stats.end()

    def _find_route(self, path: str, method: str) -> tuple[str, _Serve] | None:
        """The method an API path takes and the coroutine function that serves it."""
        route = _route(path)
        if route is not None:
            return "POST", functools.partial(
                self._serve_api, endpoint=route[0], deployment=route[1]
            )
        batch_route = _batch_route(path, method)
        if batch_route is not None:
            method, op, ident = batch_route
            return method, functools.partial(self._serve_batches, op=op, ident=ident)
        return None

    def _control(self, request: web.BaseRequest) -> web.Response:
        """``/stats`` and ``/stats/reset``; anything else is not found."""
        if (request.method, request.path) == ("GET", "/stats"):
            return _json(200, self.statistics().to_json())
        if (request.method, request.path) == ("POST", "/stats/reset"):
            self._stats.reset()
            return _json(200, self.statistics().to_json())
        return _json(404, _error_body(f"No route {request.path}.", "invalid_request_error"))

    async def _serve_api(
        self, request: web.BaseRequest, endpoint: _Endpoint, deployment: str | None
    ) -> web.StreamResponse:
        if not self._authorized(request):
            return self._unauthorized()
        if deployment is not None and "api-version" not in request.query:
            message = "The api-version query parameter is required."
            return self._reply(400, _error_body(message, "invalid_request_error"))
        body = await request.read()
        fate = self._dice.roll(body)
        if fate.fault is not None:
            self._stats.faults[fate.fault] += 1
        if fate.fault is Fault.HANG:
            await close_after(request, self.settings.hang_seconds, self._closing)
            return web.Response()  # never sent: the connection is closed
        if fate.latency > 0:
            await asyncio.sleep(fate.latency)
        return await self._respond(request, endpoint, deployment, body, fate)

    async def _respond(
        self,
        request: web.BaseRequest,
        endpoint: _Endpoint,
        deployment: str | None,
        body: bytes,
        fate: Fate,
    ) -> web.StreamResponse:
        """The answer to an API request, or the request fault ``fate`` holds instead."""
        if fate.fault in _FAULT_REPLIES:
            status, payload = _FAULT_REPLIES[fate.fault]
            headers = self._retry_headers if status == 429 else None
            return self._reply(status, payload, headers)
        if fate.fault is Fault.CONNECTION_RESET:
            reset(request)
            return web.Response()  # never sent: the connection is gone
        status, payload = self._answer(body, endpoint, deployment, fate)
        data = orjson.dumps(payload)
        if fate.fault is Fault.TRUNCATED_BODY:
            self._stats.by_status[status] += 1
            return await send_truncated(request, data)
        return self._reply(status, malformed(data) if fate.fault is Fault.MALFORMED_JSON else data)

    async def _serve_batches(
        self, request: web.BaseRequest, op: _BatchOp, ident: str
    ) -> web.Response:
        """A Batch API request: never delayed or faulted; refusals are OpenAI error bodies."""
        if not self._authorized(request):
            return self._unauthorized()
        try:
            return await self._batch_reply(request, op, ident)
        except BatchError as exc:
            return self._reply(exc.status, _error_body(str(exc), "invalid_request_error", exc.code))

    async def _batch_reply(
        self, request: web.BaseRequest, op: _BatchOp, ident: str
    ) -> web.Response:
        match op:
            case _BatchOp.UPLOAD:
                return self._reply(200, self._batches.upload(await read_upload(request)))
            case _BatchOp.CONTENT:
                content = self._batches.content(ident)
                self._stats.by_status[200] += 1
                return web.Response(body=content, content_type="application/octet-stream")
            case _BatchOp.CREATE:
                return self._reply(200, self._batches.create(await request.read()))
            case _BatchOp.LIST:
                return self._reply(200, self._batches.page(request.query))
            case _BatchOp.RETRIEVE:
                return self._reply(200, self._batches.retrieve(ident))
            case _BatchOp.CANCEL:
                return self._reply(200, self._batches.cancel(ident))

    def _answer_batched(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The answer to a request inside a batch job: the online chat answer to its body."""
        return self._answer_document(request, _Endpoint.CHAT, None, _CALM)

    def _answer(
        self, body: bytes, endpoint: _Endpoint, deployment: str | None, fate: Fate
    ) -> tuple[int, dict[str, Any]]:
        """The status and document answering ``body``: 200, or 400 for a bad request."""
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return 400, _error_body("The body is not valid JSON.", "invalid_request_error")
        return self._answer_document(request, endpoint, deployment, fate)

    def _answer_document(
        self, request: Any, endpoint: _Endpoint, deployment: str | None, fate: Fate
    ) -> tuple[int, dict[str, Any]]:
        """The status and document answering the parsed body ``request``."""
        try:
            if not isinstance(request, dict):
                raise BadRequest("The body must be a JSON object.")
            model = request.get("model") or deployment
            if not isinstance(model, str):
                raise BadRequest("model must be a non-empty string.")
            if endpoint is _Endpoint.EMBEDDINGS:
                return 200, self._answerer.embeddings(request, model)
            if request.get("stream"):
                raise BadRequest("stream is not supported by the mock server.")
            answer = self._answerer.chat(request, model, fate.disorder)
            prompt = orjson.dumps(request.get("messages"), option=orjson.OPT_SORT_KEYS)
            self._stats.answered_prompt(hashlib.sha1(prompt, usedforsecurity=False).digest())
        except BadRequest as exc:
            return 400, _error_body(str(exc), "invalid_request_error")
        if answer.batch_rows:
            self._stats.batch_requests += 1
            self._stats.batch_rows += answer.batch_rows
        for fault in answer.faults:
            self._stats.faults[fault] += 1
        return 200, _completion(answer, model, next(self._numbers))

    def _reply(
        self, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> web.Response:
        self._stats.by_status[status] += 1
        return _json(status, payload, headers)

    def _unauthorized(self) -> web.Response:
        message = "Incorrect API key provided."
        return self._reply(401, _error_body(message, "authentication_error", "invalid_api_key"))

    def _authorized(self, request: web.BaseRequest) -> bool:
        """Whether the request carries the configured key (always, when none is set)."""
        key = self.settings.api_key
        if key is None:
            return True
        bearer = request.headers.get("Authorization", "")
        offered = [bearer[7:]] if bearer[:7].lower() == "bearer " else []
        offered.append(request.headers.get("api-key", ""))
        return any(hmac.compare_digest(given.encode(), key.encode()) for given in offered)


async def serve(
    settings: MockSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a mock LLM server until cancelled.

    Once listening it prints its base URL alone on a line of standard output (for a
    parent process to read) and hands the same URL to ``task_status``.
    """
    async with MockLlmServer(settings, host=host, port=port) as server:
        print(server.base_url, flush=True)
        task_status.started(server.base_url)
        await anyio.sleep_forever()
