"""Tenants of one server do not affect each other: no client can switch the engine's scheduling
policy, and one tenant's huge context does not stall another tenant's stream, the heartbeats or
/health (tokenizing runs off the event loop; a text too long for the window is rejected before it
is tokenized)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from stream2llm.core.policies import POLICIES
from stream2llm.server.app import ServerSettings, create_app, start_site
from tests.conftest import corpus_text
from tests.engine.helpers import GREEDY, oneshot

QUESTION = "What does the documentation say about this?"
SESSION_GREEDY = {"max_tokens": GREEDY.max_tokens, "temperature": 0, "ignore_eos": True}
MAX_LAG_S = 0.5  # the event loop must never stall longer than this


@pytest.fixture(scope="module")
async def http(engine):
    app = create_app(engine, ServerSettings(max_body_bytes=8 << 20))
    runner, url = await start_site(app, "127.0.0.1", 0)
    async with aiohttp.ClientSession(url) as client:
        yield client
    await runner.cleanup()


class LoopLag:
    """A ticker: the longest the event loop took to wake a 10 ms sleep, beyond the 10 ms."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.monotonic() - t0 - 0.01)

    def stop(self) -> float:
        self._task.cancel()
        return self.worst


async def open_session(http: aiohttp.ClientSession, **extra) -> tuple[int, dict]:
    async with http.post("/v1/sessions", json={"question": QUESTION, **SESSION_GREEDY, **extra}) as r:
        return r.status, await r.json()


async def post(http: aiohttp.ClientSession, path: str, body: dict) -> tuple[int, dict]:
    async with http.post(path, json=body) as r:
        return r.status, await r.json()


async def stream_result(http: aiohttp.ClientSession, sid: str) -> dict:
    async with http.get(f"/v1/sessions/{sid}/stream") as r:
        assert r.status == 200
        events = [line.decode()[6:].strip() async for line in r.content if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return json.loads(events[-2])


async def test_no_client_can_choose_the_policy_and_another_tenant_is_unaffected(http, engine):
    policy = engine.policy
    context = corpus_text(2500, seed=31)
    status, b = await open_session(http, cache_salt="tenant-b")
    assert status == 201, b
    reader = asyncio.create_task(stream_result(http, b["id"]))
    await post(http, f"/v1/sessions/{b['id']}/append", {"text": context[:1200]})
    # tenant A asks for another policy: on open, and on an open session's append
    other = next(p for p in POLICIES if p != policy)
    status, body = await open_session(http, cache_salt="tenant-a", policy=other)
    assert status == 400, body
    assert body["error"]["param"] == "policy" and "policy" in body["error"]["message"], body
    status, a = await open_session(http, cache_salt="tenant-a")
    assert status == 201, a
    status, body = await post(http, f"/v1/sessions/{a['id']}/append", {"text": "x", "policy": other})
    assert status == 400 and body["error"]["param"] == "policy", body
    assert engine.policy == policy
    status, _ = await post(http, f"/v1/sessions/{a['id']}/append", {"text": context, "final": True})
    assert status == 200
    status, _ = await post(http, f"/v1/sessions/{b['id']}/append", {"text": context[1200:], "final": True})
    assert status == 200
    result_b = await asyncio.wait_for(reader, 60)
    result_a = await asyncio.wait_for(stream_result(http, a["id"]), 60)
    reference = await oneshot(engine, QUESTION, context)
    assert result_b["token_ids"] == reference.token_ids  # exactly as one request on its own
    assert result_a["token_ids"] == reference.token_ids
    assert engine.policy == policy


async def test_a_huge_context_does_not_stall_other_tenants_or_health(http, engine):
    context = corpus_text(2000, seed=32)
    status, small = await open_session(http, max_tokens=200, cache_salt="small")
    assert status == 201
    huge = corpus_text(100_000, seed=33) * 34  # 3.4 MB
    status, rejected = await open_session(http, cache_salt="huge")
    status, truncating = await open_session(http, cache_salt="huge", truncate=True)
    status, fitting = await open_session(http, cache_salt="huge")
    lag = LoopLag()
    reader = asyncio.create_task(stream_result(http, small["id"]))
    status, _ = await post(http, f"/v1/sessions/{small['id']}/append", {"text": context, "final": True})
    assert status == 200
    t0 = time.monotonic()
    big = [
        post(http, f"/v1/sessions/{rejected['id']}/append", {"text": huge}),
        post(http, f"/v1/sessions/{truncating['id']}/append", {"text": huge}),
        post(http, f"/v1/sessions/{fitting['id']}/update", {"docs": [huge[:30_000], huge[-30_000:]]}),
    ]
    health_times = []

    async def health_probe() -> None:
        for _ in range(10):
            t = time.monotonic()
            async with http.get("/health") as r:
                assert r.status == 200
            health_times.append(time.monotonic() - t)
            await asyncio.sleep(0.05)

    answers = await asyncio.gather(*big, health_probe())
    result = await asyncio.wait_for(reader, 60)
    worst = lag.stop()
    (s1, too_long), (s2, cut), (s3, updated), _ = answers
    assert s1 == 400 and too_long["error"]["code"] == "context_length_exceeded", too_long
    assert "maximum context length is 4096 tokens" in too_long["error"]["message"]
    assert s2 == 200 and cut["prompt_tokens_sent"] <= engine.config.max_model_len, cut
    assert s3 in (200, 400), updated  # fits or not: either way it was tokenized off the loop
    assert time.monotonic() - t0 < 30
    assert worst < MAX_LAG_S, f"the event loop stalled for {worst:.2f} s"
    assert max(health_times) < MAX_LAG_S, health_times
    assert result["type"] == "result" and result["completion_tokens"] == 200
    reference = await oneshot(engine, QUESTION, context, _greedy(200))
    assert result["token_ids"] == reference.token_ids
    for sid in (rejected["id"], truncating["id"], fitting["id"]):
        async with http.delete(f"/v1/sessions/{sid}") as r:
            assert r.status == 200


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
