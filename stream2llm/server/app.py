"""HTTP API over a running StreamingEngine (aiohttp): streaming sessions and OpenAI-compatible endpoints.

Session API (context arrives over several requests while the engine prefills it):
  POST   /v1/sessions                {question, max_tokens, temperature, mode, truncate, ...} -> {id, ...}
  POST   /v1/sessions/{id}/append    {text, final?}
  POST   /v1/sessions/{id}/update    {docs: [...], final?}
  POST   /v1/sessions/{id}/finish
  GET    /v1/sessions/{id}/stream    SSE: {"type": "delta", "text"} ..., {"type": "result", ...}, [DONE]
  GET    /v1/sessions/{id}           state, and the result once there is one
  DELETE /v1/sessions/{id}           abort, KV freed
OpenAI-compatible: POST /v1/completions, POST /v1/chat/completions (``stream``, ``stream_options``),
GET /v1/models. Operations: GET /health (never behind the token), GET /metrics (Prometheus text).

Errors always come back as ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) with a
4xx status for anything the request got wrong; a bad request never touches another session. A client
that goes away while its request runs aborts that request's session, which frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream2llm.context.prompt import DOC_SEPARATOR, PromptTemplate
from stream2llm.errors import (
    AdmissionRejected,
    ContextTooLong,
    InvalidEvent,
    SequenceError,
    SessionClosed,
    SessionExpired,
    StreamError,
    UnknownSession,
)

if TYPE_CHECKING:
    from stream2llm.engine.engine import EngineConfig, Session, SessionResult, StreamingEngine

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

# A raw completion: the prompt is the whole text, nothing is added around it.
RAW_TEMPLATE = PromptTemplate(prefix="{question}", suffix="")
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
POLL_S = 0.2  # how often a waiting request checks that its client is still there
HEARTBEAT_S = 15.0  # SSE comment on an idle stream (keeps proxies from closing it)


@dataclass
class ServerSettings:
    """How the HTTP server behaves; the engine has its own config."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # require ``Authorization: Bearer <token>`` (except on /health)
    max_body_bytes: int = 4 << 20
    max_sessions: int = 256  # sessions opened over HTTP and still running; more get 429
    model_name: str | None = None  # listed by /v1/models; default: the engine's model name
    keep_results: int = 1024  # finished sessions remembered for GET /v1/sessions/{id}


# -- errors ------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error with its HTTP status, rendered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> web.Response:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return web.json_response(self.body(), status=self.status, headers=headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Most specific first: SessionExpired is a SessionClosed, everything is a StreamError.
_ERROR_MAP: list[tuple[type[StreamError], int, str, str]] = [
    (UnknownSession, 404, "not_found_error", "session_not_found"),
    (SessionExpired, 410, "invalid_request_error", "session_expired"),
    (SessionClosed, 409, "invalid_request_error", "session_closed"),
    (SequenceError, 409, "invalid_request_error", "sequence_error"),
    (ContextTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (AdmissionRejected, 429, "rate_limit_error", "too_many_sessions"),
    (InvalidEvent, 400, "invalid_request_error", "invalid_event"),
    (StreamError, 400, "invalid_request_error", "invalid_request"),
]


def api_error(exc: StreamError) -> ApiError:
    """The HTTP form of one of the project's errors."""
    for cls, status, type_, code in _ERROR_MAP:
        if isinstance(exc, cls):
            return ApiError(status, str(exc), type=type_, code=code)
    raise AssertionError("unreachable: StreamError is mapped")


# -- request bodies ------------------------------------------------------------------------------------


class _Body(BaseModel):
    """Strict JSON bodies: wrong types and unknown fields are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True)


class OpenSessionBody(_Body):
    question: str = Field(min_length=1)
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    ignore_eos: bool = False
    mode: Literal["stream", "nonstream", "vllm"] = "stream"
    truncate: bool = False
    cache_salt: str | None = Field(None, min_length=1)
    policy: str | None = None


class AppendBody(_Body):
    text: str = Field(min_length=1)
    final: bool = False


class UpdateBody(_Body):
    docs: list[str] = Field(min_length=1)
    final: bool = False


class FinishBody(_Body):
    pass


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAIBody(_Body):
    """Fields both OpenAI endpoints share; ``context`` (documents for RAG) is stream2llm's extension."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension
    cache_salt: str | None = Field(None, min_length=1)  # vLLM's extension
    context: list[str] | None = None  # stream2llm's extension: retrieved documents


class CompletionBody(_OpenAIBody):
    prompt: str | list[str]


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatBody(_OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# OpenAI parameters this server cannot honour: accepted only at their neutral value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "stop": (None, "", []),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


def _reject_unsupported(data: dict[str, Any]) -> None:
    for name, neutral in _NEUTRAL.items():
        if name in data and not any(data[name] == value for value in neutral):
            hint = " (streamed sessions cannot stop on strings)" if name == "stop" else ""
            raise ApiError(
                400, f"parameter {name!r} is not supported{hint}", code="unsupported_parameter", param=name
            )
        data.pop(name, None)


async def read_json(request: web.Request, model: type[M], *, allow_empty: bool = False) -> M:
    """Parse and validate a JSON body; every failure is a 400/413 that names what was wrong."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise _too_large(request.app[SERVER].settings.max_body_bytes) from exc
    if not raw.strip():
        if allow_empty:
            return model()
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except ValueError as exc:  # includes bad UTF-8
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    if issubclass(model, _OpenAIBody):
        _reject_unsupported(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> ApiError:
    problems, first = [], None
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "body"
        first = first or where
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown field {where!r}")
        else:
            problems.append(f"{where}: {err['msg']}")
    return ApiError(400, "invalid request: " + "; ".join(problems), code="invalid_value", param=first)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")


def _sampling(**kwargs: Any) -> Any:
    """vLLM's SamplingParams; its own validation errors become 400s (the engine adds the model's
    end-of-sequence ids to every request)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise ApiError(400, f"invalid sampling parameters: {exc}", code="invalid_value") from None


# -- server state -------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One session opened over HTTP, remembered until well after it ends."""

    session: Session
    api: str  # sessions, completions or chat
    created: int = field(default_factory=lambda: int(time.time()))
    result: SessionResult | None = None
    error: ApiError | None = None
    state: str = "open"  # open, generating, completed, aborted, expired, failed
    streaming: bool = False
    watcher: asyncio.Task | None = None

    def current_state(self) -> str:
        if self.state == "open" and not self.session.is_open:
            return "generating"
        return self.state


class _Metrics:
    """Prometheus metrics of one app (its own registry: vLLM fills the global one)."""

    def __init__(self, server: _Server) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "stream2llm_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.sessions = Counter(
            "stream2llm_sessions_ended",
            "Sessions ended, by API and outcome.",
            ["api", "outcome"],
            registry=self.registry,
        )
        self.generated = Counter(
            "stream2llm_generation_tokens", "Tokens generated for HTTP sessions.", registry=self.registry
        )
        self.ttft_final = Histogram(
            "stream2llm_ttft_final_seconds",
            "Time from the final context chunk to the first generated token.",
            ["api"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.ttft_open = Histogram(
            "stream2llm_ttft_open_seconds",
            "Time from opening a session to its first generated token.",
            ["api"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(server))


class _EngineCollector:
    """Engine state read at scrape time (the scheduler's live stats board)."""

    def __init__(self, server: _Server) -> None:
        self._server = server

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        engine = self._server.engine
        stats = engine.stats()
        gauges = {
            "stream2llm_open_sessions": ("Sessions open on the engine.", len(engine.open_sessions())),
            "stream2llm_http_open_sessions": ("Sessions opened over HTTP, running.", self._server.running()),
            "stream2llm_kv_usage_ratio": ("Fraction of KV cache blocks in use (0..1).", stats.kv_usage),
            "stream2llm_requests_running": ("Requests the scheduler is running.", stats.running),
            "stream2llm_requests_waiting": ("Requests waiting for prefill or decode.", stats.waiting),
            "stream2llm_requests_parked": ("Sessions waiting for their next chunk.", stats.parked),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "stream2llm_prompt_tokens_prefilled": ("Prompt tokens computed.", stats.tokens_prefilled),
            "stream2llm_prompt_tokens_recomputed": ("Recomputed after updates.", stats.tokens_recomputed),
            "stream2llm_preemptions": ("Requests preempted or evicted.", stats.preemptions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class _Server:
    """Sessions opened over HTTP and the handlers that drive them."""

    def __init__(self, engine: StreamingEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_name = settings.model_name or engine.model.name
        self.started = int(time.time())
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.metrics = _Metrics(self)

    def running(self) -> int:
        return sum(1 for e in self.entries.values() if e.state == "open")

    def entry(self, session_id: str) -> _Entry:
        try:
            return self.entries[session_id]
        except KeyError:
            raise UnknownSession(f"no session with id {session_id!r}") from None

    async def open(self, api: str, question: str, sampling: Any, **kwargs: Any) -> _Entry:
        """Open an engine session, after the server's own admission check."""
        if self.running() >= self.settings.max_sessions:
            raise AdmissionRejected(
                f"server has {self.running()} running sessions (max_sessions={self.settings.max_sessions})"
            )
        try:
            session = await self.engine.open(question, sampling, **kwargs)
        except StreamError:
            await self._drop_half_open(kwargs["request_id"])
            raise
        entry = _Entry(session, api)
        self.entries[session.request_id] = entry
        entry.watcher = asyncio.get_running_loop().create_task(self._watch(entry))
        self._forget_old()
        return entry

    async def _drop_half_open(self, request_id: str) -> None:
        """engine.open registers a session before its first chunk is laid out; when that fails
        (ContextTooLong) the session must not stay behind, holding a slot."""
        for session in self.engine.open_sessions():
            if session.request_id == request_id:
                await session.abort()

    async def _watch(self, entry: _Entry) -> None:
        """Record how a session ended (result or error) and its metrics."""
        try:
            entry.result = await entry.session.result()
            entry.state = "completed"
        except SessionExpired as exc:
            entry.state, entry.error = "expired", api_error(exc)
        except SessionClosed as exc:
            entry.state, entry.error = "aborted", api_error(exc)
        except Exception as exc:  # the engine failed this request
            entry.state = "failed"
            entry.error = ApiError(500, str(exc), type="server_error", code="engine_error")
        self.metrics.sessions.labels(entry.api, entry.state).inc()
        if entry.result is not None:
            self.metrics.generated.inc(len(entry.result.token_ids))
            if entry.result.token_ids:
                self.metrics.ttft_final.labels(entry.api).observe(entry.result.ttft_final_s)
                self.metrics.ttft_open.labels(entry.api).observe(entry.result.ttft_open_s)

    def _forget_old(self) -> None:
        """Drop the oldest ended sessions beyond ``keep_results`` (running ones are always kept)."""
        ended = [k for k, e in self.entries.items() if e.state != "open"]
        for key in ended[: max(0, len(ended) - self.settings.keep_results)]:
            del self.entries[key]

    async def outcome(self, entry: _Entry) -> SessionResult:
        """The session's result, or the ApiError it ended with."""
        assert entry.watcher is not None
        await asyncio.shield(entry.watcher)
        if entry.result is None:
            raise entry.error or ApiError(500, "session ended without a result", type="server_error")
        return entry.result

    async def shutdown(self) -> None:
        for entry in list(self.entries.values()):
            with contextlib.suppress(Exception):
                await entry.session.abort()
        watchers = [e.watcher for e in self.entries.values() if e.watcher is not None]
        await asyncio.gather(*watchers, return_exceptions=True)


SERVER = web.AppKey("stream2llm_server", _Server)


# -- middleware ----------------------------------------------------------------------------------------


@web.middleware
async def _guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Auth, body size, error rendering and request counting for every route."""
    server = request.app[SERVER]
    try:
        response = await _checked(request, handler, server)
    except ApiError as exc:
        response = exc.response()
    except StreamError as exc:
        response = api_error(exc).response()
    except web.HTTPException as exc:  # no such route, wrong method, ...
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        response = ApiError(
            exc.status, f"{exc.reason}: {request.method} {request.path}", code=code
        ).response()
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        response = ApiError(500, "internal server error", type="server_error").response()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    server.metrics.requests.labels(request.method, name, str(response.status)).inc()
    return response


async def _checked(request: web.Request, handler: Any, server: _Server) -> web.StreamResponse:
    token = server.settings.token
    if token and request.path != "/health":
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise ApiError(
                401,
                "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                type="authentication_error",
                code="invalid_api_key",
            )
    length = request.content_length
    if length is not None and length > server.settings.max_body_bytes:
        raise _too_large(server.settings.max_body_bytes)
    return await handler(request)


# -- client presence ------------------------------------------------------------------------------------


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _while_connected(request: web.Request, task: asyncio.Future, on_idle: Any = None) -> Any:
    """Wait for ``task`` while checking that the client is still there (ConnectionResetError if not).

    aiohttp only cancels handlers on disconnect when the runner asks for it; this works either way.
    ``on_idle`` (a coroutine function) runs every HEARTBEAT_S of waiting.
    """
    idle_since = time.monotonic()
    while True:
        done, _ = await asyncio.wait({task}, timeout=POLL_S)
        if done:
            return task.result()
        if _client_gone(request):
            raise ConnectionResetError("client disconnected")
        if on_idle is not None and time.monotonic() - idle_since > HEARTBEAT_S:
            await on_idle()
            idle_since = time.monotonic()


async def _deltas(request: web.Request, session: Session, on_idle: Any = None) -> AsyncIterator[str]:
    """The session's text deltas, ending early (ConnectionResetError) if the client goes away."""
    stream = session.stream().__aiter__()
    while True:
        step = asyncio.ensure_future(stream.__anext__())
        try:
            delta = await _while_connected(request, step, on_idle)
        except StopAsyncIteration:
            return
        except BaseException:
            step.cancel()
            raise
        yield delta


@contextlib.asynccontextmanager
async def _abort_if_dropped(entry: _Entry) -> AsyncIterator[None]:
    """Abort the session (freeing its KV) when the request ends abnormally: disconnect or cancel."""
    try:
        yield
    except (asyncio.CancelledError, ConnectionError):
        await asyncio.shield(entry.session.abort())
        raise


def _sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def _start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    return response


# -- session API ------------------------------------------------------------------------------------------


def _result_json(entry: _Entry) -> dict[str, Any]:
    r = entry.result
    assert r is not None
    return {
        "text": r.text,
        "token_ids": r.token_ids,
        "prompt_tokens": len(r.prompt_token_ids),
        "completion_tokens": len(r.token_ids),
        "finish_reason": r.finish_reason,
        "ttft_final_s": r.ttft_final_s,
        "ttft_open_s": r.ttft_open_s,
        "tokens_prefilled": r.tokens_prefilled,
        "tokens_recomputed": r.tokens_recomputed,
        "updates": r.updates,
        "chunks": [asdict(c) for c in r.chunks],
        "mode": r.mode,
    }


def _state_json(entry: _Entry) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": entry.session.request_id,
        "object": "stream2llm.session",
        "created": entry.created,
        "mode": entry.session.mode,
        "state": entry.current_state(),
        "prompt_tokens_sent": len(entry.session.prompt_ids),
    }
    if entry.result is not None:
        body["result"] = _result_json(entry)
    if entry.error is not None:
        body["error"] = entry.error.body()["error"]
    return body


async def open_session(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    body = await read_json(request, OpenSessionBody)
    sampling = _sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_tokens,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )
    entry = await server.open(
        "sessions",
        body.question,
        sampling,
        mode=body.mode,
        request_id=f"sess-{uuid.uuid4().hex}",
        truncate=body.truncate,
        cache_salt=body.cache_salt,
        policy=body.policy,
    )
    return web.json_response(_state_json(entry), status=201)


async def append(request: web.Request) -> web.Response:
    entry = request.app[SERVER].entry(request.match_info["id"])
    body = await read_json(request, AppendBody)
    await entry.session.append(body.text, final=body.final)
    return web.json_response(_state_json(entry))


async def update(request: web.Request) -> web.Response:
    entry = request.app[SERVER].entry(request.match_info["id"])
    body = await read_json(request, UpdateBody)
    await entry.session.update(body.docs, final=body.final)
    return web.json_response(_state_json(entry))


async def finish(request: web.Request) -> web.Response:
    entry = request.app[SERVER].entry(request.match_info["id"])
    await read_json(request, FinishBody, allow_empty=True)
    await entry.session.finish()
    return web.json_response(_state_json(entry))


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(_state_json(request.app[SERVER].entry(request.match_info["id"])))


async def delete_session(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    entry = server.entry(request.match_info["id"])
    await entry.session.abort()
    if entry.watcher is not None:
        await asyncio.shield(entry.watcher)
    return web.json_response(_state_json(entry))


async def stream_session(request: web.Request) -> web.StreamResponse:
    """SSE of the generated text; the client leaving aborts the session."""
    server = request.app[SERVER]
    entry = server.entry(request.match_info["id"])
    if entry.streaming:
        raise ApiError(
            409, f"session {entry.session.request_id!r} is already being streamed", code="conflict"
        )
    entry.streaming = True
    response = await _start_sse(request)

    async def heartbeat() -> None:
        await response.write(b": keep-alive\n\n")

    async with _abort_if_dropped(entry):
        async for delta in _deltas(request, entry.session, heartbeat):
            await response.write(_sse({"type": "delta", "text": delta}))
        try:
            await server.outcome(entry)
            await response.write(
                _sse({"type": "result", "id": entry.session.request_id, **_result_json(entry)})
            )
        except ApiError as exc:
            await response.write(_sse({"type": "error", **exc.body()}))
        await response.write(_sse("[DONE]"))
    await response.write_eof()
    return response


# -- OpenAI-compatible API ----------------------------------------------------------------------------------


def _check_model(server: _Server, name: str) -> None:
    if name != server.model_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {server.model_name!r}",
            code="model_not_found",
            param="model",
        )


def _render_chat(messages: list[ChatMessage]) -> tuple[str, str]:
    """(question, history): the last user message is the question; system prompts and earlier turns
    become context, one ``Role: text`` paragraph each, so the rendering is deterministic for any model."""
    last = messages[-1]
    if last.role != "user":
        raise ApiError(400, "the last message must have role 'user'", code="invalid_value", param="messages")
    if not last.text().strip():
        raise ApiError(400, "the last user message is empty", code="invalid_value", param="messages")
    history = "\n".join(f"{m.role.capitalize()}: {m.text()}" for m in messages[:-1])
    return last.text(), history


async def _openai_session(
    server: _Server,
    api: str,
    body: _OpenAIBody,
    question: str,
    body_text: str,
    template: PromptTemplate | None,
    max_tokens: int,
) -> _Entry:
    _check_model(server, body.model)
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true", code="invalid_value", param="stream_options")
    sampling = _sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=max_tokens,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos,
    )
    prefix = "chatcmpl" if api == "chat" else "cmpl"
    entry = await server.open(
        api,
        question,
        sampling,
        mode="nonstream",  # the whole prompt is here already: one plain request
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        template=template,
        cache_salt=body.cache_salt,
    )
    try:
        if body_text:
            await entry.session.append(body_text)
        await entry.session.finish()
    except BaseException:
        await entry.session.abort()
        raise
    return entry


def _usage(result: SessionResult) -> dict[str, int]:
    prompt, completion = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def completions(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    body = await read_json(request, CompletionBody)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "prompt must be one string (batches are not supported)", param="prompt")
        prompt = prompt[0]
    if body.context:  # RAG: the prompt is the question, the documents the context
        question, text, template = prompt, DOC_SEPARATOR.join(body.context), None
    else:
        question, text, template = prompt, "", RAW_TEMPLATE
    if not prompt:
        raise ApiError(400, "prompt is empty", code="invalid_value", param="prompt")
    entry = await _openai_session(
        server, "completions", body, question, text, template, body.max_tokens or 16
    )
    return await _respond(request, server, entry, body, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    body = await read_json(request, ChatBody)
    question, history = _render_chat(body.messages)
    text = DOC_SEPARATOR.join([*(body.context or []), *([history] if history else [])])
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    entry = await _openai_session(server, "chat", body, question, text, None, max_tokens)
    return await _respond(request, server, entry, body, chat=True)


async def _respond(
    request: web.Request, server: _Server, entry: _Entry, body: _OpenAIBody, *, chat: bool
) -> web.StreamResponse:
    base = {"id": entry.session.request_id, "created": entry.created, "model": server.model_name}
    async with _abort_if_dropped(entry):
        if body.stream:
            return await _stream_openai(request, server, entry, body, base, chat)
        assert entry.watcher is not None
        await _while_connected(request, asyncio.shield(entry.watcher))
        result = await server.outcome(entry)
    finish_reason = result.finish_reason or "stop"
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish_reason}
    obj = "chat.completion" if chat else "text_completion"
    return web.json_response({**base, "object": obj, "choices": [choice], "usage": _usage(result)})


async def _stream_openai(
    request: web.Request, server: _Server, entry: _Entry, body: _OpenAIBody, base: dict[str, Any], chat: bool
) -> web.StreamResponse:
    """OpenAI's chunk format: a role chunk (chat), content chunks, a finish chunk, an optional usage
    chunk with no choices, then ``data: [DONE]``."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(payload: dict[str, Any] | None, finish_reason: str | None = None) -> bytes:
        if chat:
            choice = {"index": 0, "delta": payload or {}, "logprobs": None, "finish_reason": finish_reason}
        else:
            text = (payload or {}).get("content", "")
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if include_usage else {}
        return _sse({**base, "object": obj, "choices": [choice], **extra})

    response = await _start_sse(request)
    if chat:
        await response.write(chunk({"role": "assistant", "content": ""}))
    async for delta in _deltas(request, entry.session):
        await response.write(chunk({"content": delta}))
    try:
        result = await server.outcome(entry)
    except ApiError as exc:
        await response.write(_sse(exc.body()))
    else:
        await response.write(chunk(None, result.finish_reason or "stop"))
        if include_usage:
            await response.write(_sse({**base, "object": obj, "choices": [], "usage": _usage(result)}))
    await response.write(_sse("[DONE]"))
    await response.write_eof()
    return response


async def list_models(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    model = {
        "id": server.model_name,
        "object": "model",
        "created": server.started,
        "owned_by": "stream2llm",
        "max_model_len": server.engine.config.max_model_len,
    }
    return web.json_response({"object": "list", "data": [model]})


async def health(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    return web.json_response({"status": "ok", "model": server.model_name, "open_sessions": server.running()})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[SERVER].metrics.registry
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- app and runner ----------------------------------------------------------------------------------------


def create_app(engine: StreamingEngine, settings: ServerSettings | None = None) -> web.Application:
    """The HTTP app over an engine the caller started (and shuts down)."""
    settings = settings or ServerSettings()
    app = web.Application(middlewares=[_guard], client_max_size=settings.max_body_bytes)
    server = _Server(engine, settings)
    app[SERVER] = server
    app.router.add_post("/v1/sessions", open_session)
    app.router.add_get("/v1/sessions/{id}", get_session)
    app.router.add_delete("/v1/sessions/{id}", delete_session)
    app.router.add_post("/v1/sessions/{id}/append", append)
    app.router.add_post("/v1/sessions/{id}/update", update)
    app.router.add_post("/v1/sessions/{id}/finish", finish)
    app.router.add_get("/v1/sessions/{id}/stream", stream_session)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def on_shutdown(_: web.Application) -> None:
        await server.shutdown()  # ends open streams, so the runner need not wait for them

    app.on_shutdown.append(on_shutdown)
    return app


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Run the app on host:port (0: any free port) in this event loop; returns the runner and URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return runner, f"http://{shown}:{bound_port}"


async def serve(
    config: EngineConfig, settings: ServerSettings, on_ready: Callable[[str], None] | None = None
) -> None:
    """Start an engine, serve HTTP until cancelled (Ctrl-C), then shut both down."""
    from stream2llm.engine.engine import StreamingEngine

    engine = await StreamingEngine.start(config)
    try:
        runner, url = await start_site(create_app(engine, settings), settings.host, settings.port)
        try:
            if on_ready is not None:
                on_ready(url)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
    finally:
        await engine.shutdown()
