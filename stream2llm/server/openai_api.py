"""OpenAI-compatible endpoints: POST /v1/completions, POST /v1/chat/completions (``stream``,
``stream_options``, ``stop``), GET /v1/models.

The whole prompt arrives in one request, so each runs as one plain (``nonstream``) session. Chat
messages become the prompt through the renderer every surface shares (``stream2llm.context.chat``);
stop strings are applied to the decoded text (vLLM runs without a tokenizer here) and a stop string
ends the session at once, freeing its KV.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from stream2llm.context.chat import StopScanner, render_chat
from stream2llm.context.prompt import DOC_SEPARATOR, PromptTemplate
from stream2llm.server.bodies import ChatBody, ChatMessage, CompletionBody, OpenAIBody, read_json, sampling
from stream2llm.server.errors import ApiError
from stream2llm.server.registry import SESSIONS, Entry, SessionRegistry
from stream2llm.server.sse import abort_if_dropped, deltas, sse, start_sse

# A raw completion: the prompt is the whole text, nothing is added around it.
RAW_TEMPLATE = PromptTemplate(prefix="{question}", suffix="")


@dataclass(frozen=True)
class Ending:
    """How a generation ended: the OpenAI finish reason and the token counts for ``usage``."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


def check_model(server: SessionRegistry, name: str) -> None:
    if name != server.model_name:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {server.model_name!r}",
            code="model_not_found",
            param="model",
        )


def render_messages(messages: list[ChatMessage]) -> tuple[str, str]:
    """(question, history) by the shared renderer; an OpenAI chat must end with a user message."""
    last = messages[-1]
    if last.role != "user":
        raise ApiError(400, "the last message must have role 'user'", code="invalid_value", param="messages")
    if not last.text().strip():
        raise ApiError(400, "the last user message is empty", code="invalid_value", param="messages")
    return render_chat([m.turn() for m in messages])


async def open_openai_session(
    server: SessionRegistry,
    api: str,
    body: OpenAIBody,
    prompt: tuple[str, str],
    template: PromptTemplate | None,
    max_tokens: int,
    headers: Mapping[str, str] | None = None,
) -> Entry:
    """One plain session on ``prompt`` = (question, context text), its whole context sent;
    ``headers``: the caller's, whose ``traceparent`` the session's trace continues."""
    check_model(server, body.model)
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true", code="invalid_value", param="stream_options")
    params = sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=max_tokens,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos,
    )
    question, context = prompt
    entry = await server.open(
        api,
        question,
        params,
        mode="nonstream",  # the whole prompt is here already: one plain request
        request_id=f"{'chatcmpl' if api == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
        template=template,
        cache_salt=body.cache_salt,
        trace_headers=headers,
    )
    try:
        if context:
            await entry.session.append(context)
        await entry.session.finish()
    except BaseException:
        await entry.session.abort()
        raise
    return entry


async def generate(
    request: web.Request, server: SessionRegistry, entry: Entry, stops: list[str]
) -> AsyncIterator[str | Ending]:
    """The answer's text as it is generated, cut before the first stop string, then its Ending
    (or the ApiError the session ended with). A stop string aborts the session at once."""
    scanner = StopScanner(stops)
    emitted: list[str] = []
    async with contextlib.aclosing(deltas(request, entry.session)) as stream:
        async for delta in stream:
            if text := scanner.feed(delta):
                emitted.append(text)
                yield text
            if scanner.stopped:
                break
    if scanner.stopped:
        await server.stop(entry)
        completion = server.engine.tokenizer.encode_with_ends("".join(emitted), bos=False)[0]
        yield Ending("stop", len(entry.session.prompt_ids), len(completion))
        return
    if rest := scanner.flush():
        yield rest
    result = await server.outcome(entry)
    yield Ending(result.finish_reason or "stop", len(result.prompt_token_ids), len(result.token_ids))


async def completions(request: web.Request) -> web.StreamResponse:
    server = request.app[SESSIONS]
    body = await read_json(request, CompletionBody)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "prompt must be one string (batches are not supported)", param="prompt")
        prompt = prompt[0]
    if body.context:  # RAG: the prompt is the question, the documents the context
        text, template = DOC_SEPARATOR.join(body.context), None
    else:
        text, template = "", RAW_TEMPLATE
    if not prompt:
        raise ApiError(400, "prompt is empty", code="invalid_value", param="prompt")
    entry = await open_openai_session(
        server, "completions", body, (prompt, text), template, body.max_tokens or 16, request.headers
    )
    return await respond(request, server, entry, body, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    server = request.app[SESSIONS]
    body = await read_json(request, ChatBody)
    question, history = render_messages(body.messages)
    text = DOC_SEPARATOR.join([*(body.context or []), *([history] if history else [])])
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    entry = await open_openai_session(
        server, "chat", body, (question, text), None, max_tokens, request.headers
    )
    return await respond(request, server, entry, body, chat=True)


async def respond(
    request: web.Request, server: SessionRegistry, entry: Entry, body: OpenAIBody, *, chat: bool
) -> web.StreamResponse:
    """The whole answer as one JSON object, or (``stream``) as OpenAI's SSE chunks."""
    base = {"id": entry.session.request_id, "created": entry.created, "model": server.model_name}
    async with abort_if_dropped(entry):
        if body.stream:
            return await stream_openai(request, server, entry, body, base, chat)
        items = [item async for item in generate(request, server, entry, body.stops())]
    ending = items[-1]
    assert isinstance(ending, Ending)
    text = "".join(item for item in items if isinstance(item, str))
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": ending.finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ending.finish_reason}
    obj = "chat.completion" if chat else "text_completion"
    return web.json_response({**base, "object": obj, "choices": [choice], "usage": ending.usage()})


async def stream_openai(
    request: web.Request,
    server: SessionRegistry,
    entry: Entry,
    body: OpenAIBody,
    base: dict[str, Any],
    chat: bool,
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
        return sse({**base, "object": obj, "choices": [choice], **extra})

    response = await start_sse(request)
    if chat:
        await response.write(chunk({"role": "assistant", "content": ""}))
    try:
        async for item in generate(request, server, entry, body.stops()):
            if isinstance(item, str):
                await response.write(chunk({"content": item}))
                continue
            await response.write(chunk(None, item.finish_reason))
            if include_usage:
                await response.write(sse({**base, "object": obj, "choices": [], "usage": item.usage()}))
    except ApiError as exc:
        await response.write(sse(exc.body()))
    await response.write(sse("[DONE]"))
    await response.write_eof()
    return response


async def list_models(request: web.Request) -> web.Response:
    server = request.app[SESSIONS]
    model = {
        "id": server.model_name,
        "object": "model",
        "created": server.started,
        "owned_by": "stream2llm",
        "max_model_len": server.engine.config.max_model_len,
    }
    return web.json_response({"object": "list", "data": [model]})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/completions", completions)
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_get("/v1/models", list_models)
