"""HTTP API over a running StreamingEngine (aiohttp): streaming sessions and OpenAI-compatible endpoints.

Routes: the session API (``sessions_api``), OpenAI-compatible completions, chat and models
(``openai_api``), and operations here: GET /health (never behind the token), GET /metrics
(Prometheus text). This module wires them into an app, guards every route (bearer token, body
size, error rendering, request counting; ``guards``: connections, Host, Origin) and runs it.

Errors always come back as ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) with a
4xx status for anything the request got wrong; a bad request never touches another session. A client
that goes away while its request runs aborts that request's session, which frees its KV.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from stream2llm.errors import StreamError
from stream2llm.server import openai_api, sessions_api
from stream2llm.server.errors import ApiError, api_error, too_large
from stream2llm.server.guards import Guard, InsecureBind, check_bind
from stream2llm.server.registry import SESSIONS, SessionRegistry
from stream2llm.server.settings import ServerSettings

if TYPE_CHECKING:
    from stream2llm.engine.engine import EngineConfig, StreamingEngine

__all__ = ["InsecureBind", "ServerSettings", "create_app", "serve", "start_site"]

log = logging.getLogger(__name__)
GUARD = web.AppKey("stream2llm_guard", Guard)
# How long an answered request's unread body is drained before the connection closes (a client
# still sending would otherwise lose the answer to a reset); Envoy's delayed close is 1 s too.
LINGER_S = 1.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
INSTANCE_HEADER = "X-Stream2LLM-Instance"
DEATH_503_S = 2.0  # how long a server whose engine died answers 503 before it exits


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admission (connections, Host, Origin), auth, body size, error rendering and request counting
    for every route."""
    server = request.app[SESSIONS]
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


async def _checked(request: web.Request, handler: Handler, server: SessionRegistry) -> web.StreamResponse:
    guard = request.app[GUARD]
    if (preflight := guard.check(request)) is not None:
        return preflight
    if (died := server.engine.died) is not None and request.path not in ("/health", "/metrics"):
        raise died  # 503: no new work on a dead engine
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
        raise too_large(server.settings.max_body_bytes)
    return await handler(request)


async def _tag(request: web.Request, response: web.StreamResponse) -> None:
    """Say which instance answered (its own address: behind a router, which replica) and which session."""
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if sock:
        response.headers[INSTANCE_HEADER] = f"{sock[0]}:{sock[1]}"
    sessions_api.tag_response(request, response)


async def health(request: web.Request) -> web.Response:
    """200 while the engine lives; 503 at once when its engine core died (a supervisor restarts)."""
    server = request.app[SESSIONS]
    if (died := server.engine.died) is not None:
        return web.json_response(
            {"status": "engine_dead", "model": server.model_name, "error": str(died)}, status=503
        )
    return web.json_response({"status": "ok", "model": server.model_name, "open_sessions": server.running()})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SESSIONS].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(engine: StreamingEngine, settings: ServerSettings | None = None) -> web.Application:
    """The HTTP app over an engine the caller started (and shuts down)."""
    settings = settings or ServerSettings()
    settings = replace(settings, max_body_bytes=settings.body_limit(engine.config.max_model_len))
    app = web.Application(middlewares=[_guard], client_max_size=settings.max_body_bytes)
    server = SessionRegistry(engine, settings)
    app[SESSIONS] = server
    app[GUARD] = guard = Guard(settings)
    app.on_response_prepare.append(guard.add_cors_headers)  # streamed answers too
    app.on_response_prepare.append(_tag)
    sessions_api.add_routes(app.router)
    openai_api.add_routes(app.router)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def on_shutdown(_: web.Application) -> None:
        await server.shutdown()  # ends open streams, so the runner need not wait for them

    app.on_shutdown.append(on_shutdown)
    return app


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Run the app on host:port (0: any free port) in this event loop; returns the runner and URL.
    Raises InsecureBind for a non-loopback host without a token (unless allowed)."""
    settings = app[SESSIONS].settings
    check_bind(settings, host)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=settings.header_timeout_s,  # aiohttp closes a connection whose headers are late
        max_line_size=settings.max_header_bytes,
        max_field_size=settings.max_header_bytes,
        max_headers=settings.max_headers,
        lingering_time=LINGER_S,
    )
    await runner.setup()
    app[GUARD].bound(host, runner.server)
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return runner, f"http://{shown}:{bound_port}"


async def serve(
    config: EngineConfig, settings: ServerSettings, on_ready: Callable[[str], None] | None = None
) -> None:
    """Start an engine, serve HTTP until cancelled (a signal), then shut both down. Raises
    EngineDied when the engine core dies: the server must not outlive its engine, but it answers
    503 (and /health says why) for ``DEATH_503_S`` first, so that clients and health checks learn
    what happened rather than finding the port closed."""
    from stream2llm.engine.engine import StreamingEngine
    from stream2llm.engine.health import on_engine_death

    if not settings.allow_insecure_bind:
        check_bind(settings, settings.host)  # refused before the engine's slow start
    with on_engine_death(None):  # the command is not stopped at once: this function ends it
        engine = await StreamingEngine.start(config)
    try:
        runner, url = await start_site(create_app(engine, settings), settings.host, settings.port)
        try:
            if on_ready is not None:
                on_ready(url)
            died = await engine.wait_died()
            await asyncio.sleep(DEATH_503_S)
            raise died
        finally:
            await runner.cleanup()
    finally:
        await engine.shutdown()
