"""Server-sent events and client presence: a request whose client went away must stop waiting and
abort its session (which frees its KV), whether or not aiohttp cancels the handler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from stream2llm.errors import StreamError

if TYPE_CHECKING:
    from stream2llm.engine.engine import Session
    from stream2llm.server.registry import Entry

POLL_S = 0.2  # how often a waiting request checks that its client is still there
HEARTBEAT_S = 15.0  # SSE comment on an idle stream (keeps proxies from closing it)

OnIdle = Callable[[], Awaitable[None]]


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def while_connected(request: web.Request, task: asyncio.Future, on_idle: OnIdle | None = None) -> Any:
    """Wait for ``task`` while checking that the client is still there (ConnectionResetError if not).

    aiohttp only cancels handlers on disconnect when the runner asks for it; this works either way.
    ``on_idle`` (a coroutine function) runs every HEARTBEAT_S of waiting.
    """
    idle_since = time.monotonic()
    while True:
        done, _ = await asyncio.wait({task}, timeout=POLL_S)
        if done:
            return task.result()
        if client_gone(request):
            raise ConnectionResetError("client disconnected")
        if on_idle is not None and time.monotonic() - idle_since > HEARTBEAT_S:
            await on_idle()
            idle_since = time.monotonic()


async def deltas(request: web.Request, session: Session, on_idle: OnIdle | None = None) -> AsyncIterator[str]:
    """The session's text deltas, ending early (ConnectionResetError) if the client goes away.
    A session that ended with an error just ends here: the caller reports it (``outcome``)."""
    stream = session.stream().__aiter__()
    while True:
        step = asyncio.ensure_future(stream.__anext__())
        try:
            delta = await while_connected(request, step, on_idle)
        except (StopAsyncIteration, StreamError):
            return
        except BaseException:
            step.cancel()
            raise
        yield delta


@contextlib.asynccontextmanager
async def abort_if_dropped(entry: Entry) -> AsyncIterator[None]:
    """Abort the session (freeing its KV) when the request ends abnormally: disconnect or cancel."""
    try:
        yield
    except (asyncio.CancelledError, ConnectionError):
        await asyncio.shield(entry.session.abort())
        raise


def sse(data: Any) -> bytes:
    """One ``data:`` event (JSON, or a plain string such as ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    return response
