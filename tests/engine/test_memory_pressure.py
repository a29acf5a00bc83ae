"""Many concurrent sessions with long gaps on a small KV budget: parked sessions hold the memory.

Stock vLLM never preempts a parked session, so the sessions that need blocks for their next chunk
wait for memory that only parked sessions hold: the engine stalls. stream2llm's broker evicts
parked sessions (the one whose next chunk is furthest off first) and every session completes,
each with exactly the one-shot output.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from vllm import SamplingParams

from tests.conftest import EXACT_DTYPE, corpus_text

QUESTION = "What is this about?"
SESSIONS, PIECES, GAP_S = 16, 4, 0.3
SAMPLING = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
async def small_engine(tiny_model):
    from stream2llm.engine.engine import EngineConfig, StreamingEngine

    # 6 MiB of KV: 12,288 tokens, 96 blocks; sixteen sessions of ~1,800 tokens need ~240
    eng = await StreamingEngine.start(
        EngineConfig(
            model="tiny", kv_cache_bytes=6 << 20, max_model_len=4096, session_ttl_s=None, dtype=EXACT_DTYPE
        )
    )
    yield eng
    await eng.shutdown()


def contexts() -> list[str]:
    return [corpus_text(4200, seed=100 + i) for i in range(SESSIONS)]


async def one_session(engine, i: int, context: str, policy: str):
    await asyncio.sleep(0.05 * i)
    session = await engine.open(QUESTION, SAMPLING, cache_salt=f"{policy}-{i}")
    size = -(-len(context) // PIECES)
    for k in range(PIECES):
        await asyncio.sleep(GAP_S)
        await session.append(context[k * size : (k + 1) * size], final=k == PIECES - 1)
    return session, await session.result()


async def test_stock_policy_stalls_and_stream2llm_completes_every_session_exactly(small_engine):
    texts = contexts()
    references = []
    for text in texts:  # one at a time: each fits on its own
        s = await small_engine.open(QUESTION, SAMPLING, mode="nonstream", cache_salt=uuid.uuid4().hex)
        await s.append(text, final=True)
        references.append(await s.result())

    small_engine.set_policy("vllm")
    stock = [asyncio.create_task(one_session(small_engine, i, t, "vllm")) for i, t in enumerate(texts)]
    _, pending = await asyncio.wait(stock, timeout=8 * GAP_S * PIECES + 10)
    assert pending, "stock vLLM was expected to stall with parked sessions holding the KV"
    stalled = small_engine.stats()
    # deadlock: KV full of sessions that each wait for blocks to take their next chunk
    assert stalled.running == 0 and stalled.kv_usage > 0.9 and stalled.requests == len(pending)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for session in small_engine.open_sessions():
        await session.abort()
    for _ in range(100):
        if small_engine.stats().requests == 0:
            break
        await asyncio.sleep(0.05)

    small_engine.set_policy("stream2llm")
    before = small_engine.stats().preemptions
    results = await asyncio.wait_for(
        asyncio.gather(*(one_session(small_engine, i, t, "stream2llm") for i, t in enumerate(texts))),
        timeout=120,
    )
    assert small_engine.stats().preemptions > before  # parked sessions were evicted
    for (_, result), reference in zip(results, references):
        assert result.prompt_token_ids == reference.prompt_token_ids
        assert result.token_ids == reference.token_ids
