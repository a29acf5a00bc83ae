"""Cancellation at every await point: the DELETE, SSE-stream and completion handlers (the client
goes away after k event-loop turns, or after k*delta seconds, across the handler's whole life) and
``session.abort()`` itself (its task cancelled after k turns). Each time the session's result
resolves within a bound, the session leaves the engine and its KV is freed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from vllm import SamplingParams

from stream2llm.errors import StreamError
from stream2llm.server.app import ServerSettings, create_app, start_site
from stream2llm.server.registry import SESSIONS
from tests.conftest import corpus_text

QUESTION = "What does the documentation say about this?"
RESOLVE_S = 10.0  # a session's result must resolve within this after its request was cancelled
TURNS = list(range(0, 40, 2))  # event-loop turns before the cancel
DELAYS = [0.002, 0.01, 0.03, 0.08, 0.2, 0.5]  # and seconds, for the later await points


@pytest.fixture(scope="module")
async def server(engine):
    app = create_app(engine, ServerSettings(max_sessions=64))
    runner, url = await start_site(app, "127.0.0.1", 0)
    async with aiohttp.ClientSession(url) as http:
        yield app[SESSIONS], http
    await runner.cleanup()


async def until(predicate: Callable[[], bool], timeout_s: float = RESOLVE_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def idle(engine: Any) -> bool:
    stats = engine.stats()
    return not engine.open_sessions() and stats.kv_usage == 0 and stats.requests == 0


async def settled(engine: Any, sessions: list[Any], what: str) -> None:
    """Every session's result resolves (a result or an error) in bound; then nothing is left."""
    for session in sessions:
        with contextlib.suppress(StreamError):
            await asyncio.wait_for(session.result(), RESOLVE_S)
        assert session not in engine.open_sessions(), what
    assert await until(lambda: idle(engine)), (what, engine.stats(), engine.open_sessions())


async def cancel_after(request: Awaitable[Any], turns: int | None, delay: float | None) -> None:
    """Start a request, then cancel it (the client hangs up) after ``turns`` loop turns or ``delay``."""
    task = asyncio.ensure_future(request)
    if delay is not None:
        await asyncio.sleep(delay)
    for _ in range(turns or 0):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await task


async def fetch(http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> bytes:
    async with http.request(method, path, **kwargs) as response:
        return await response.read()


async def open_http_session(server: Any, http: aiohttp.ClientSession, *, final: bool, seed: int) -> Any:
    body = {"question": QUESTION, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    async with http.post("/v1/sessions", json=body) as r:
        sid = (await r.json())["id"]
    text = corpus_text(1500, seed=seed)
    async with http.post(f"/v1/sessions/{sid}/append", json={"text": text, "final": final}) as r:
        assert r.status == 200
    return server.entry(sid).session


def sweep() -> list[tuple[int | None, float | None]]:
    return [(k, None) for k in TURNS] + [(None, d) for d in DELAYS]


@pytest.fixture(autouse=True)
async def starts_idle(engine):
    assert await until(lambda: idle(engine)), ("the engine is not idle", engine.stats())


async def test_cancelled_delete_still_frees_everything(server, engine):
    registry, http = server
    reached = 0
    for i, (turns, delay) in enumerate(sweep()):
        session = await open_http_session(registry, http, final=i % 2 == 1, seed=i)
        path = f"/v1/sessions/{session.request_id}"
        await cancel_after(fetch(http, "DELETE", path), turns, delay)
        await asyncio.sleep(0.2)
        if session.is_open:  # cancelled before the handler reached abort(): abort now
            await session.abort()
        else:
            reached += 1
        await settled(engine, [session], f"DELETE cancelled after {turns} turns / {delay} s")
    assert reached >= len(DELAYS)  # most cancels hit the abort itself or after it


async def test_cancelled_sse_stream_aborts_or_completes_and_frees_everything(server, engine):
    registry, http = server
    outcomes = set()
    for i, (turns, delay) in enumerate(sweep()):
        session = await open_http_session(registry, http, final=True, seed=100 + i)
        path = f"/v1/sessions/{session.request_id}/stream"
        await cancel_after(fetch(http, "GET", path), turns, delay)
        await settled(engine, [session], f"stream cancelled after {turns} turns / {delay} s")
        entry = registry.entry(session.request_id)
        assert await until(lambda e=entry: e.state != "open")
        outcomes.add(entry.state)
    assert "aborted" in outcomes  # the client leaving mid-stream aborted its session


@pytest.mark.parametrize("stream", [False, True])
async def test_cancelled_completion_frees_everything(server, engine, stream):
    registry, http = server
    body = {"model": engine.model.name, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    body["stream"] = stream
    for i, (turns, delay) in enumerate(sweep()):
        known = set(registry.entries)
        prompt = corpus_text(1200, seed=200 + i)
        await cancel_after(
            fetch(http, "POST", "/v1/completions", json={**body, "prompt": prompt}), turns, delay
        )
        await asyncio.sleep(0.05)
        sessions = [e.session for key, e in list(registry.entries.items()) if key not in known]
        await settled(engine, sessions, f"completion cancelled after {turns} turns / {delay} s")


@pytest.mark.parametrize("state", ["parked", "prefilling", "decoding"])
async def test_cancelled_abort_still_frees_everything(engine, state):
    sampling = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for turns in range(0, 12):
        session = await engine.open(QUESTION, sampling)
        if state == "parked":
            await session.append(corpus_text(1500, seed=300 + turns))
            await until(lambda: engine.stats().parked >= 1, 5)
        elif state == "prefilling":
            await session.append(corpus_text(8000, seed=300 + turns))
        else:
            await session.append(corpus_text(800, seed=300 + turns), final=True)
            await until(lambda s=session: bool(s._output.token_ids), 5)
        abort = asyncio.create_task(session.abort())
        for _ in range(turns):
            await asyncio.sleep(0)
        abort.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abort
        await settled(engine, [session], f"abort of a {state} session cancelled after {turns} turns")
