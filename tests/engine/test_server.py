"""The HTTP server over a real engine, driven by real clients (aiohttp, the official openai client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import aiohttp
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from vllm import SamplingParams

from stream2llm.server.app import ServerSettings, create_app, start_site
from stream2llm.server.registry import SESSIONS
from tests.conftest import corpus_text
from tests.engine.helpers import GREEDY, oneshot, split_at_random

TOKEN = "test-token-1234"
MAX_BODY = 64 << 10
QUESTION = "What does the documentation say about this?"
SESSION_GREEDY = {"max_tokens": GREEDY.max_tokens, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, ServerSettings(token=TOKEN, max_body_bytes=MAX_BODY, max_sessions=16))


@pytest.fixture(scope="module")
async def server(app, engine):
    runner, url = await start_site(app, "127.0.0.1", 0)
    async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield url, http, engine.model.name
    await runner.cleanup()


@pytest.fixture(scope="module")
async def openai_client(server):
    url, _, _ = server
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
    yield client
    await client.close()


async def sse_events(response: aiohttp.ClientResponse) -> list:
    """``data:`` payloads of an SSE response, JSON-decoded (``[DONE]`` kept as the string)."""
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def wait_until(predicate, timeout_s: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def expect_error(response: aiohttp.ClientResponse, status: int, *words: str) -> dict:
    body = await response.json()
    assert response.status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error
    return error


# -- OpenAI-compatible ----------------------------------------------------------------------------------


async def test_chat_completion_streamed_equals_non_streamed(server, openai_client):
    _, _, model = server
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is a generator?"},
        {"role": "assistant", "content": "A function that yields values."},
        {"role": "user", "content": "And what does the yield statement do?"},
    ]
    kwargs = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 24}
    kwargs["extra_body"] = {"ignore_eos": True}
    full = await openai_client.chat.completions.create(**kwargs)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + 24
    text = full.choices[0].message.content
    assert text

    stream = await openai_client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert deltas == text  # greedy: streamed and non-streamed agree
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


async def test_completion_streamed_equals_non_streamed_and_the_raw_prompt(server, openai_client, engine):
    _, _, model = server
    prompt = corpus_text(600, seed=5)
    kwargs = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 20}
    kwargs["extra_body"] = {"ignore_eos": True}
    full = await openai_client.completions.create(**kwargs)
    assert full.object == "text_completion"
    prompt_ids = engine.tokenizer.encode(prompt)
    assert full.usage.prompt_tokens == len(prompt_ids)  # the prompt is sent as is, no template around it
    assert full.usage.completion_tokens == 20
    direct = await engine.complete(
        prompt_ids, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_prefix_cache=False
    )
    assert full.choices[0].text == engine.tokenizer.decode(direct)

    stream = await openai_client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


async def test_rag_context_extension_equals_a_session_on_the_same_documents(server, engine):
    _, http, model = server
    docs = [corpus_text(700, seed=8), corpus_text(500, seed=9)]
    body = {"model": model, "prompt": QUESTION, "context": docs, **SESSION_GREEDY, "cache_salt": "rag"}
    async with http.post("/v1/completions", json=body) as resp:
        full = await resp.json()
    reference = await oneshot(engine, QUESTION, docs)
    assert full["choices"][0]["text"] == reference.text
    assert full["usage"]["prompt_tokens"] == len(reference.prompt_token_ids)


async def test_stop_strings_cut_completions_and_chat_and_end_the_session(server, openai_client, engine, app):
    """A stop string chosen from the un-stopped greedy answer: the text ends right before it, the
    finish reason is "stop", and the session ends there (max_tokens would allow far more)."""
    _, _, model = server
    greedy = {"model": model, "temperature": 0, "extra_body": {"ignore_eos": True}}
    prompt = corpus_text(400, seed=37)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": corpus_text(300, seed=41)},
    ]
    for create, kwargs in [
        (openai_client.completions.create, {"prompt": prompt}),
        (openai_client.chat.completions.create, {"messages": messages}),
    ]:
        full = _text(await create(**kwargs, **greedy, max_tokens=24))
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        cut = full[: full.index(stop)]
        stopped = await create(**kwargs, **greedy, max_tokens=1000, stop=[stop, "\u2603 never"])
        assert _text(stopped) == cut
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.usage.completion_tokens < 24
        stream = await create(**kwargs, **greedy, max_tokens=1000, stop=stop, stream=True)
        chunks = [chunk async for chunk in stream]
        texts = [_text(c) for c in chunks if c.choices]
        assert "".join(texts) == cut and not any(stop in t for t in texts)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "stop"
        ]
        assert await wait_until(lambda: _idle(engine)), (engine.stats(), engine.open_sessions())
        for sid in (stopped.id, chunks[0].id):
            entry = app[SESSIONS].entries[sid]  # OpenAI sessions are not the session API's
            assert entry.current_state() == "stopped" and entry.error is None, entry


def _text(answer) -> str:
    """The text of a completion or chat completion, or of one streamed chunk of either."""
    choice = answer.choices[0]
    if hasattr(choice, "text"):
        return choice.text
    return (choice.message if hasattr(choice, "message") else choice.delta).content or ""


# -- session API ----------------------------------------------------------------------------------------


async def test_append_session_over_http_equals_oneshot(server, engine):
    _, http, _ = server
    context = corpus_text(3000, seed=3)
    pieces = split_at_random(context, 4, random.Random(3))
    async with http.post("/v1/sessions", json={"question": QUESTION, **SESSION_GREEDY}) as resp:
        opened = await resp.json()
        assert resp.status == 201, opened
    sid = opened["id"]
    assert opened["state"] == "open" and opened["mode"] == "stream"

    async def read_stream():
        async with http.get(f"/v1/sessions/{sid}/stream") as resp:
            return await sse_events(resp)

    reader = asyncio.create_task(read_stream())  # connected before the context arrives
    for piece in pieces:
        async with http.post(f"/v1/sessions/{sid}/append", json={"text": piece}) as resp:
            assert resp.status == 200, await resp.text()
        await asyncio.sleep(0.02)
    async with http.post(f"/v1/sessions/{sid}/finish") as resp:
        assert (await resp.json())["state"] in ("generating", "completed")
    events = await asyncio.wait_for(reader, 30)

    assert events[-1] == "[DONE]"
    result = events[-2]
    assert result["type"] == "result" and result["id"] == sid
    assert "".join(e["text"] for e in events if e != "[DONE]" and e["type"] == "delta") == result["text"]
    reference = await oneshot(engine, QUESTION, context)
    assert result["token_ids"] == reference.token_ids
    assert result["prompt_tokens"] == len(reference.prompt_token_ids)
    assert result["completion_tokens"] == GREEDY.max_tokens
    assert result["ttft_final_s"] >= 0 and len(result["chunks"]) >= 2  # it really was streamed in pieces

    async with http.get(f"/v1/sessions/{sid}") as resp:
        state = await resp.json()
    assert state["state"] == "completed" and state["result"]["token_ids"] == reference.token_ids


async def test_update_session_over_http_equals_oneshot(server, engine):
    _, http, _ = server
    a, b = corpus_text(2500, seed=13), corpus_text(1500, seed=14)
    series = [[a[:1200], a[1200:]], [a[:1200], b], [b[:700], a[:900]]]
    async with http.post("/v1/sessions", json={"question": QUESTION, **SESSION_GREEDY}) as resp:
        sid = (await resp.json())["id"]
    for i, docs in enumerate(series):
        final = i == len(series) - 1
        async with http.post(f"/v1/sessions/{sid}/update", json={"docs": docs, "final": final}) as resp:
            assert resp.status == 200, await resp.text()
        await asyncio.sleep(0.05)
    async with http.get(f"/v1/sessions/{sid}/stream") as resp:
        events = await sse_events(resp)
    result = events[-2]
    reference = await oneshot(engine, QUESTION, series[-1])
    assert result["token_ids"] == reference.token_ids
    assert len(result["updates"]) == len(series) - 1  # the updates ran in place (LCP kept)


# -- bad input ------------------------------------------------------------------------------------------


async def test_bad_requests_get_4xx_json_and_a_concurrent_session_completes(server, engine):
    url, http, model = server
    context = corpus_text(2000, seed=17)
    async with http.post("/v1/sessions", json={"question": QUESTION, **SESSION_GREEDY}) as resp:
        good = (await resp.json())["id"]
    async with http.post(f"/v1/sessions/{good}/append", json={"text": context[:1000]}) as resp:
        assert resp.status == 200

    post = "/v1/sessions"
    async with http.post(post, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert (await expect_error(r, 400, "not valid JSON"))["code"] == "invalid_json"
    async with http.post(post, data=b"\xff\xfe", headers={"Content-Type": "application/json"}) as r:
        await expect_error(r, 400, "not valid JSON")
    async with http.post(post, json=[1, 2]) as r:
        await expect_error(r, 400, "JSON object")
    async with http.post(post, json={"max_tokens": 5}) as r:
        assert (await expect_error(r, 400, "question", "required"))["param"] == "question"
    async with http.post(post, json={"question": 5}) as r:
        await expect_error(r, 400, "question", "string")
    async with http.post(post, json={"question": "q", "max_tokens": "10"}) as r:
        assert (await expect_error(r, 400, "max_tokens"))["param"] == "max_tokens"
    async with http.post(post, json={"question": "q", "max_tokens": 0}) as r:
        await expect_error(r, 400, "max_tokens")
    async with http.post(post, json={"question": "q", "bogus": 1}) as r:
        await expect_error(r, 400, "unknown field 'bogus'")
    async with http.post(post, json={"question": "q", "mode": "sideways"}) as r:
        await expect_error(r, 400, "mode")
    async with http.post(post, json={"question": "q", "max_tokens": 5000}) as r:
        assert (await expect_error(r, 400, "max_model_len"))["code"] == "context_length_exceeded"
    # worded as vLLM words it: what was asked for against the model's window
    huge = "max_tokens=100000000 cannot be greater than max_model_len=4096"
    async with http.post(post, json={"question": "q", "max_tokens": 100_000_000}) as r:
        await expect_error(r, 400, huge)
    too_many = {"model": model, "prompt": "Hello", "max_tokens": 100_000_000}
    async with http.post("/v1/completions", json=too_many) as r:
        await expect_error(r, 400, huge)
    long_prompt = {"model": model, "prompt": corpus_text(3000, seed=3), "max_tokens": 3900}
    async with http.post("/v1/completions", json=long_prompt) as r:
        await expect_error(r, 400, "maximum context length is 4096 tokens. However, you requested")
    async with http.post("/v1/sessions/no-such-id/append", json={"text": "x"}) as r:
        assert (await expect_error(r, 404, "no-such-id"))["code"] == "session_not_found"
    async with http.get("/v1/sessions/no-such-id/stream") as r:
        await expect_error(r, 404)
    async with http.post(f"/v1/sessions/{good}/append", json={"text": ""}) as r:
        await expect_error(r, 400, "text")
    async with http.post(f"/v1/sessions/{good}/update", json={"docs": "not a list"}) as r:
        await expect_error(r, 400, "docs")
    async with http.post(f"/v1/sessions/{good}/finish", json={"final": True}) as r:
        await expect_error(r, 400, "unknown field 'final'")
    async with http.post(post, data=b'{"question": "' + b"x" * MAX_BODY + b'"}') as r:
        assert (await expect_error(r, 413, str(MAX_BODY)))["code"] == "request_too_large"

    async def chunked():  # no Content-Length: the limit applies while reading
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    async with http.post(post, data=chunked(), headers={"Content-Type": "application/json"}) as r:
        await expect_error(r, 413)
    async with http.get("/no/such/route") as r:
        await expect_error(r, 404)

    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    for name, value in [
        ("n", 2),
        ("logprobs", True),
        ("logit_bias", {"5": 1}),
        ("tools", [{"type": "function"}]),
    ]:
        async with http.post("/v1/chat/completions", json={**chat, name: value}) as r:
            assert (await expect_error(r, 400, repr(name)))["param"] == name
    async with http.post("/v1/chat/completions", json={**chat, "model": "gpt-9"}) as r:
        assert (await expect_error(r, 404, "gpt-9"))["code"] == "model_not_found"
    bad_turn = {**chat, "messages": [{"role": "assistant", "content": "hi"}]}
    async with http.post("/v1/chat/completions", json=bad_turn) as r:
        await expect_error(r, 400, "last message")
    async with http.post("/v1/completions", json={"model": model, "prompt": "x", "temperature": "hot"}) as r:
        await expect_error(r, 400, "temperature")
    no_stream = {"model": model, "prompt": "x", "stream_options": {"include_usage": True}}
    async with http.post("/v1/completions", json=no_stream) as r:
        assert (await expect_error(r, 400, "stream: true"))["param"] == "stream_options"

    async with aiohttp.ClientSession(url) as anonymous:
        async with anonymous.post(post, json={"question": "q"}) as r:
            assert (await expect_error(r, 401, "bearer"))["type"] == "authentication_error"
        headers = {"Authorization": "Bearer wrong"}
        async with anonymous.get("/v1/models", headers=headers) as r:
            await expect_error(r, 401)
        async with anonymous.get("/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"

    # the good session was untouched by all of that
    async with http.post(f"/v1/sessions/{good}/append", json={"text": context[1000:], "final": True}) as r:
        assert r.status == 200
    async with http.post(f"/v1/sessions/{good}/append", json={"text": "late"}) as r:
        assert (await expect_error(r, 409, "already"))["code"] == "session_closed"
    async with http.get(f"/v1/sessions/{good}/stream") as resp:
        events = await sse_events(resp)
    assert events[-2]["token_ids"] == (await oneshot(engine, QUESTION, context)).token_ids
    async with http.get(f"/v1/sessions/{good}/stream") as r:
        await expect_error(r, 409, "already being streamed")


async def test_admission_limit_answers_429(engine):
    app = create_app(engine, ServerSettings(max_sessions=1))
    runner, url = await start_site(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(url) as http:
            async with http.post("/v1/sessions", json={"question": "q"}) as r:
                first = (await r.json())["id"]
            async with http.post("/v1/sessions", json={"question": "q"}) as r:
                error = await expect_error(r, 429, "max_sessions=1")
                assert r.headers["Retry-After"] == "1" and error["type"] == "rate_limit_error"
            async with http.delete(f"/v1/sessions/{first}") as r:
                assert (await r.json())["state"] == "aborted"
            async with http.post("/v1/sessions", json={"question": "q"}) as r:
                assert r.status == 201  # the slot was freed
    finally:
        await runner.cleanup()  # aborts the session left open
    assert await wait_until(lambda: not engine.open_sessions()), [
        (s.request_id, s.is_open) for s in engine.open_sessions()
    ]


# -- disconnects ----------------------------------------------------------------------------------------


def _idle(engine) -> bool:
    stats = engine.stats()
    return not engine.open_sessions() and (stats.requests, stats.parked, stats.kv_usage) == (0, 0, 0.0)


async def test_client_leaving_a_session_stream_aborts_it_and_frees_kv(server, engine):
    _, http, _ = server
    assert await wait_until(lambda: _idle(engine))
    async with http.post("/v1/sessions", json={"question": QUESTION, **SESSION_GREEDY}) as resp:
        sid = (await resp.json())["id"]
    async with http.post(f"/v1/sessions/{sid}/append", json={"text": corpus_text(3000, seed=23)}) as resp:
        assert resp.status == 200
    assert await wait_until(lambda: engine.stats().parked == 1 and engine.stats().kv_usage > 0)

    resp = await http.get(f"/v1/sessions/{sid}/stream")  # nothing to stream yet: the context is open
    assert resp.status == 200
    await asyncio.sleep(0.3)
    resp.close()  # the client goes away

    assert await wait_until(lambda: _idle(engine)), (engine.stats(), engine.open_sessions())
    async with http.get(f"/v1/sessions/{sid}") as r:
        state = await r.json()
    assert state["state"] == "aborted" and state["error"]["code"] == "session_closed"


async def test_client_leaving_an_openai_stream_aborts_it_and_frees_kv(server, openai_client, engine, app):
    _, _, model = server
    stream = await openai_client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": corpus_text(1000, seed=29)}],
        temperature=0,
        max_tokens=3000,
        extra_body={"ignore_eos": True},
        stream=True,
    )
    ids = []
    async for chunk in stream:
        ids.append(chunk.id)
        if len(ids) == 3:
            break
    sid = ids[0]
    assert engine.open_sessions()  # still generating
    await stream.close()

    assert await wait_until(lambda: _idle(engine)), (engine.stats(), engine.open_sessions())
    entry = app[SESSIONS].entries[sid]
    assert entry.current_state() == "aborted"
    assert entry.result is None


async def test_client_leaving_a_non_streamed_completion_aborts_it(server, engine, app):
    _, http, model = server
    body = {"model": model, "prompt": corpus_text(800, seed=31), "max_tokens": 3000, "ignore_eos": True}
    request = asyncio.create_task(http.post("/v1/completions", json=body))
    assert await wait_until(lambda: bool(engine.open_sessions()))
    await asyncio.sleep(0.2)  # generating now
    (sid,) = [s.request_id for s in engine.open_sessions()]
    request.cancel()  # the client gives up: its connection closes
    with contextlib.suppress(asyncio.CancelledError):
        await request

    assert await wait_until(lambda: _idle(engine)), (engine.stats(), engine.open_sessions())
    assert app[SESSIONS].entries[sid].current_state() == "aborted"


# -- operations -----------------------------------------------------------------------------------------


def _samples(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_models_and_health(server, engine):
    _, http, model = server
    async with http.get("/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        before = _samples(await r.text())
    async with http.post("/v1/sessions", json={"question": 1}) as r:
        assert r.status == 400
    async with http.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 3}) as r:
        assert r.status == 200
    async with http.post("/v1/sessions", json={"question": QUESTION}) as r:
        parked = (await r.json())["id"]  # stays open while we scrape

    async with http.get("/metrics") as r:
        text = await r.text()
    after = _samples(text)
    assert "# TYPE stream2llm_kv_usage_ratio gauge" in text
    assert "# TYPE stream2llm_ttft_final_seconds histogram" in text
    assert after[("stream2llm_open_sessions", ())] == len(engine.open_sessions()) == 1
    assert after[("stream2llm_http_open_sessions", ())] == 1
    assert 0 <= after[("stream2llm_kv_usage_ratio", ())] <= 1
    for name in ("running", "waiting", "parked"):
        assert after[(f"stream2llm_requests_{name}", ())] >= 0

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("stream2llm_http_requests_total", method="POST", route="/v1/sessions", status="400") == 1
    assert delta("stream2llm_http_requests_total", method="POST", route="/v1/completions", status="200") == 1
    assert delta("stream2llm_ttft_final_seconds_count", api="completions") == 1
    assert delta("stream2llm_sessions_ended_total", api="completions", outcome="completed") == 1
    assert delta("stream2llm_generation_tokens_total") == 3
    inf = after[("stream2llm_ttft_final_seconds_bucket", (("api", "completions"), ("le", "+Inf")))]
    assert inf == after[("stream2llm_ttft_final_seconds_count", (("api", "completions"),))]

    async with http.delete(f"/v1/sessions/{parked}") as r:
        assert (await r.json())["state"] == "aborted"
    async with http.get("/v1/models") as r:
        models = await r.json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [model]
    async with http.get("/health") as r:
        assert (await r.json())["status"] == "ok"


def test_serve_command_wires_options_into_engine_and_server(monkeypatch):
    """The CLI passes its options on (the server itself is exercised above)."""
    from typer.testing import CliRunner

    from stream2llm import cli
    from stream2llm.server import app as server_mod

    seen = {}

    async def fake_serve(config, settings, on_ready=None):
        seen["config"], seen["settings"] = config, settings
        on_ready("http://127.0.0.1:9999")

    monkeypatch.setattr(server_mod, "serve", fake_serve)
    args = ["serve", "--model", "tiny", "--port", "9999", "--token", "t", "--max-sessions", "3"]
    result = CliRunner().invoke(cli.app, [*args, "--kv-cache-gb", "0.5", "--max-model-len", "2048"])
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:9999" in result.output
    config, settings = seen["config"], seen["settings"]
    assert (config.model, config.kv_cache_bytes, config.max_model_len) == ("tiny", 512 << 20, 2048)
    assert (settings.port, settings.token, settings.max_sessions) == (9999, "t", 3)


async def test_serve_runs_the_app_until_cancelled_then_shuts_the_engine_down(engine, monkeypatch):
    from stream2llm.engine import engine as engine_mod
    from stream2llm.server.app import serve

    class Borrowed:  # the shared engine, with a shutdown that only records the call
        shut_down = False

        def __getattr__(self, name):
            return getattr(engine, name)

        async def shutdown(self):
            Borrowed.shut_down = True

    async def start(config):
        assert config.model == "tiny"
        return Borrowed()

    monkeypatch.setattr(engine_mod.StreamingEngine, "start", staticmethod(start))
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    settings = ServerSettings(port=0, token="s3cret")
    task = asyncio.create_task(
        serve(engine_mod.EngineConfig(model="tiny"), settings, on_ready=ready.set_result)
    )
    url = await asyncio.wait_for(ready, 10)
    async with aiohttp.ClientSession(url) as http:
        async with http.get("/health") as r:
            assert (await r.json())["model"] == engine.model.name
        async with http.get("/v1/models") as r:
            assert r.status == 401
    task.cancel()  # what Ctrl-C does under asyncio.run
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert Borrowed.shut_down
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession(url) as http, http.get("/health"):
            pass
