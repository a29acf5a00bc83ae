"""The engine core dies (SIGKILL, or an exception raised inside its scheduler) while sessions are in
every state: every waiter fails with EngineDied within seconds, nothing new is admitted, the HTTP
API answers 503 ``engine_dead``, ``serve`` raises (so ``stream2llm serve`` exits non-zero) and
shutdown completes in bounded time. Each test starts (and kills) an engine of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import psutil
import pytest
from vllm import SamplingParams

from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.errors import EngineDied
from stream2llm.server.app import ServerSettings, create_app, serve, start_site
from tests.conftest import EXACT_DTYPE, corpus_text
from tests.engine.faults import FAULT_MARKER, FAULTY_SCHEDULER

QUESTION = "What does the documentation say about this?"
MAX_MODEL_LEN = 8192
DEADLINE_S = 10.0  # every waiter must have its EngineDied by then
LONG_DECODE = SamplingParams(temperature=0, max_tokens=6000, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def engine_core_pids() -> set[int]:
    """Pids of the vLLM engine-core processes below this one."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                pids.add(child.pid)
    return pids


async def start_engine(**engine_args: Any) -> tuple[StreamingEngine, int]:
    """A dedicated engine (the shared one must survive) and the pid of its engine core."""
    before = engine_core_pids()
    engine = await StreamingEngine.start(
        EngineConfig(
            model="tiny",
            kv_cache_bytes=256 << 20,
            dtype=EXACT_DTYPE,
            max_model_len=MAX_MODEL_LEN,
            session_ttl_s=None,
            engine_args=engine_args,
        )
    )
    new = engine_core_pids() - before
    assert len(new) == 1, f"expected one new engine-core process, found {new}"
    return engine, new.pop()


async def until(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def drain(session: Any) -> list[str]:
    return [delta async for delta in session.stream()]


async def sse_events(http: aiohttp.ClientSession, path: str, first: asyncio.Event) -> list[Any]:
    events = []
    async with http.get(path) as response:
        assert response.status == 200, await response.text()
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                first.set()
    return events


async def post(http: aiohttp.ClientSession, path: str, body: dict) -> tuple[int, dict]:
    async with http.post(path, json=body) as response:
        return response.status, await response.json()


async def sessions_in_every_state(engine: StreamingEngine) -> dict[str, Any]:
    """Sessions decoding, parked, mid-prefill and just opened (in that order: the last two must
    still be in their state when the engine dies)."""
    decoding = await engine.open(QUESTION, LONG_DECODE)
    await decoding.append(corpus_text(400, seed=1), final=True)
    reader = asyncio.create_task(drain(decoding))
    await until(lambda: decoding._output.token_ids, what="the first generated token")
    parked = await engine.open(QUESTION, SHORT)
    await parked.append(corpus_text(3000, seed=2))
    await until(lambda: engine.stats().parked >= 1, what="the parked session")
    prefilling = await engine.open(QUESTION, SHORT)
    await prefilling.append(corpus_text(16000, seed=3))  # ~6k tokens: several 2k-token steps
    just_opened = await engine.open(QUESTION, SHORT)
    sessions = {"decoding": decoding, "parked": parked, "prefilling": prefilling, "open": just_opened}
    assert all(s.is_open for name, s in sessions.items() if name != "decoding")
    return {"sessions": sessions, "reader": reader}


async def expect_engine_died(awaitable: Awaitable[Any], deadline: float, what: str) -> None:
    try:
        value = await asyncio.wait_for(awaitable, max(deadline - time.monotonic(), 0.01))
    except EngineDied:
        return
    except TimeoutError:
        pytest.fail(f"{what}: no EngineDied within {DEADLINE_S} s of the death")
    pytest.fail(f"{what}: returned {value!r} instead of raising EngineDied")


async def kill_by_sigkill(engine: StreamingEngine, pid: int) -> list[asyncio.Task]:
    os.kill(pid, signal.SIGKILL)
    return []


async def kill_by_scheduler_fault(engine: StreamingEngine, pid: int) -> list[asyncio.Task]:
    """A request carrying the marker makes the engine core's scheduler raise; it waits too."""
    trigger = await engine.open(QUESTION, SamplingParams(max_tokens=4, extra_args=dict(FAULT_MARKER)))
    await trigger.finish()
    return [asyncio.create_task(trigger.result())]


KILLS = {
    "sigkill": ({}, kill_by_sigkill),
    "scheduler_raises": ({"scheduler_cls": FAULTY_SCHEDULER}, kill_by_scheduler_fault),
}


@pytest.mark.parametrize("how", list(KILLS))
async def test_engine_core_death_fails_every_waiter_and_the_server_says_so(how, monkeypatch):
    engine_args, kill = KILLS[how]
    engine, pid = await start_engine(**engine_args)
    # the app under test stays up after the death; ``serve`` (on the same engine) must not
    runner, url = await start_site(create_app(engine), "127.0.0.1", 0)
    monkeypatch.setattr(StreamingEngine, "start", staticmethod(lambda config: _started(engine)))
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(serve(engine.config, ServerSettings(port=0), on_ready=ready.set_result))
    try:
        await asyncio.wait_for(ready, 30)
        async with aiohttp.ClientSession(url) as http:
            await _die_and_check(engine, pid, kill, http, serving)
    finally:
        serving.cancel()
        with contextlib.suppress(BaseException):
            await serving
        await runner.cleanup()
        await asyncio.wait_for(engine.shutdown(), 15)


async def _started(engine: StreamingEngine) -> StreamingEngine:
    return engine


async def _die_and_check(engine, pid, kill, http: aiohttp.ClientSession, serving: asyncio.Task) -> None:
    # over HTTP: a session decoding with an SSE reader, and a completion generating
    status, opened = await post(
        http, "/v1/sessions", {"question": QUESTION, "max_tokens": 6000, "ignore_eos": True}
    )
    assert status == 201, opened
    sid = opened["id"]
    status, _ = await post(
        http, f"/v1/sessions/{sid}/append", {"text": corpus_text(300, seed=4), "final": True}
    )
    assert status == 200
    first_event = asyncio.Event()
    sse_reader = asyncio.create_task(sse_events(http, f"/v1/sessions/{sid}/stream", first_event))
    completion = asyncio.create_task(
        post(
            http,
            "/v1/completions",
            {"model": engine.model.name, "prompt": QUESTION, "max_tokens": 6000, "ignore_eos": True},
        )
    )
    await asyncio.wait_for(first_event.wait(), 20)
    state = await sessions_in_every_state(engine)
    sessions = state["sessions"]
    results = {name: asyncio.create_task(s.result()) for name, s in sessions.items()}
    streams = {name: asyncio.create_task(drain(s)) for name, s in sessions.items() if name != "decoding"}
    streams["decoding"] = state["reader"]
    assert not completion.done() and engine.died is None

    extra = await kill(engine, pid)
    deadline = time.monotonic() + DEADLINE_S
    for name, task in results.items():
        await expect_engine_died(task, deadline, f"result() of the {name} session")
    for name, task in streams.items():
        await expect_engine_died(task, deadline, f"stream() of the {name} session")
    for task in extra:
        await expect_engine_died(task, deadline, "result() of the session that triggered the fault")
    assert isinstance(engine.died, EngineDied)
    assert engine.open_sessions() == []
    t0 = time.monotonic()
    with pytest.raises(EngineDied):
        await engine.open(QUESTION, SHORT)
    assert time.monotonic() - t0 < 0.5

    # the HTTP side: the waiting requests end with engine_dead, new work gets a 503
    events = await asyncio.wait_for(sse_reader, max(deadline - time.monotonic(), 1.0))
    assert events[-1] == "[DONE]" and events[-2]["type"] == "error", events[-3:]
    assert events[-2]["error"]["code"] == "engine_dead", events[-2]
    status, body = await asyncio.wait_for(completion, max(deadline - time.monotonic(), 1.0))
    assert (status, body["error"]["code"]) == (503, "engine_dead"), body
    async with http.get("/health") as r:
        health = await r.json()
        assert (r.status, health["status"]) == (503, "engine_dead"), health
    for path, body in (
        ("/v1/sessions", {"question": QUESTION}),
        ("/v1/completions", {"model": engine.model.name, "prompt": QUESTION}),
    ):
        status, answer = await post(http, path, body)
        assert status == 503, answer
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert answer["error"]["code"] == "engine_dead", answer

    # serve raises (the command exits non-zero) after shutting down, in bounded time
    with pytest.raises(EngineDied):
        await asyncio.wait_for(serving, 20)
    t0 = time.monotonic()
    await asyncio.wait_for(engine.shutdown(), 15)
    assert time.monotonic() - t0 < 1.0  # serve already shut it down; a second call only waits
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
