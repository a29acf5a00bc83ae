"""The session API: context arrives over several requests while the engine prefills it.

POST   /v1/sessions                {question, max_tokens, temperature, mode, truncate, ...} -> {id, ...}
POST   /v1/sessions/{id}/append    {text, final?}
POST   /v1/sessions/{id}/update    {docs: [...], final?}
POST   /v1/sessions/{id}/finish
GET    /v1/sessions/{id}/stream    SSE: {"type": "delta", "text"} ..., {"type": "result", ...}, [DONE]
GET    /v1/sessions/{id}           state, and the result once there is one
DELETE /v1/sessions/{id}           abort, KV freed

Every answer about a session carries its id in an ``X-Session-ID`` header. A client may choose the
id itself (``X-Session-ID`` header or ``session_id`` field on open): a router that hashes that
header (vllm-router's consistent_hash) then sends the open and every later call of the session to
the one instance that holds its KV.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import asdict
from typing import Any

from aiohttp import web

from stream2llm.engine.session import Session
from stream2llm.errors import UnknownSession
from stream2llm.server.bodies import AppendBody, FinishBody, OpenSessionBody, UpdateBody, read_json, sampling
from stream2llm.server.errors import ApiError
from stream2llm.server.registry import SESSIONS, Entry
from stream2llm.server.sse import abort_if_dropped, deltas, sse, start_sse

SESSION_ID_HEADER = "X-Session-ID"
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{7,127}")  # safe in a path and a vLLM request id


def result_json(entry: Entry) -> dict[str, Any]:
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
        **({"kv_transfer": r.kv_transfer} if r.kv_transfer is not None else {}),
    }


def state_json(entry: Entry) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": entry.session.request_id,
        "object": "stream2llm.session",
        "created": entry.created,
        "mode": entry.session.mode,
        "state": entry.current_state(),
        "prompt_tokens_sent": len(entry.session.prompt_ids),
    }
    if entry.result is not None:
        body["result"] = result_json(entry)
    if entry.error is not None:
        body["error"] = entry.error.body()["error"]
    return body


def session_entry(request: web.Request) -> Entry:
    """The session named in the path; one opened by the OpenAI endpoints is not this API's (404
    as if unknown: its answer is read only by the request that asked for it)."""
    session_id = request.match_info["id"]
    entry = request.app[SESSIONS].entry(session_id)
    if entry.api != "sessions":
        raise UnknownSession(f"no session with id {session_id!r}")
    return entry


async def open_session(request: web.Request) -> web.Response:
    server = request.app[SESSIONS]
    body = await read_json(request, OpenSessionBody)
    params = sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_tokens,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )
    entry = await server.open(
        "sessions",
        body.question,
        params,
        mode=body.mode,
        request_id=chosen_id(request, body.session_id),
        truncate=body.truncate,
        cache_salt=body.cache_salt,
        trace_headers=request.headers,
    )
    return web.json_response(
        state_json(entry), status=201, headers={SESSION_ID_HEADER: entry.session.request_id}
    )


def chosen_id(request: web.Request, in_body: str | None) -> str:
    """The id the client chose (header or body, checked), or a fresh one."""
    in_header = request.headers.get(SESSION_ID_HEADER)
    if in_header and in_body and in_header != in_body:
        raise ApiError(400, f"{SESSION_ID_HEADER} header and session_id differ", param="session_id")
    chosen = in_body or in_header
    if chosen is None:
        return f"sess-{uuid.uuid4().hex}"
    if not CLIENT_ID.fullmatch(chosen):
        raise ApiError(
            400,
            "session id must be 8-128 characters: letters, digits, '.', '_', '-' (not first)",
            code="invalid_value",
            param="session_id",
        )
    if chosen in request.app[SESSIONS].entries:
        raise ApiError(409, f"session {chosen!r} already exists", code="conflict", param="session_id")
    return chosen


def tag_response(request: web.Request, response: web.StreamResponse) -> None:
    """Name the session in every answer about one (routers and clients read it)."""
    session_id = request.match_info.get("id")
    if session_id and request.path.startswith("/v1/sessions/"):
        response.headers.setdefault(SESSION_ID_HEADER, session_id)


def context_event(request: web.Request, session: Session, op: str, chars: int, final: bool) -> None:
    """Context a client sent: counted, and an event on the session's trace (retriever ``client``)."""
    request.app[SESSIONS].metrics.context_events.labels(op).inc()
    if session.trace is not None:
        session.trace.context_arrived("client", op, chars, final)


async def append(request: web.Request) -> web.Response:
    entry = session_entry(request)
    body = await read_json(request, AppendBody)
    context_event(request, entry.session, "append", len(body.text), body.final)
    await entry.session.append(body.text, final=body.final)
    return web.json_response(state_json(entry))


async def update(request: web.Request) -> web.Response:
    entry = session_entry(request)
    body = await read_json(request, UpdateBody)
    context_event(request, entry.session, "update", sum(len(d) for d in body.docs), body.final)
    await entry.session.update(body.docs, final=body.final)
    return web.json_response(state_json(entry))


async def finish(request: web.Request) -> web.Response:
    entry = session_entry(request)
    await read_json(request, FinishBody, allow_empty=True)
    context_event(request, entry.session, "finish", 0, True)
    await entry.session.finish()
    return web.json_response(state_json(entry))


async def get_session(request: web.Request) -> web.Response:
    return web.json_response(state_json(session_entry(request)))


async def delete_session(request: web.Request) -> web.Response:
    entry = session_entry(request)
    await entry.session.abort()
    if entry.watcher is not None:
        await asyncio.shield(entry.watcher)
    return web.json_response(state_json(entry))


async def stream_session(request: web.Request) -> web.StreamResponse:
    """SSE of the generated text; the client leaving aborts the session."""
    server = request.app[SESSIONS]
    entry = session_entry(request)
    if entry.streaming:
        raise ApiError(
            409, f"session {entry.session.request_id!r} is already being streamed", code="conflict"
        )
    entry.streaming = True
    response = await start_sse(request)

    async def heartbeat() -> None:
        await response.write(b": keep-alive\n\n")

    async with abort_if_dropped(entry):
        async for delta in deltas(request, entry.session, heartbeat):
            await response.write(sse({"type": "delta", "text": delta}))
        try:
            await server.outcome(entry)
            await response.write(
                sse({"type": "result", "id": entry.session.request_id, **result_json(entry)})
            )
        except ApiError as exc:
            await response.write(sse({"type": "error", **exc.body()}))
        await response.write(sse("[DONE]"))
    await response.write_eof()
    return response


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/sessions", open_session)
    router.add_get("/v1/sessions/{id}", get_session)
    router.add_delete("/v1/sessions/{id}", delete_session)
    router.add_post("/v1/sessions/{id}/append", append)
    router.add_post("/v1/sessions/{id}/update", update)
    router.add_post("/v1/sessions/{id}/finish", finish)
    router.add_get("/v1/sessions/{id}/stream", stream_session)
