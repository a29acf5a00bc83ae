"""The engine's host KV tier: a parked session evicted to the tier resumes with exactly the one-shot
answer, its KV loaded back instead of recomputed; with its stored blocks damaged or deleted between
eviction and resumption it still gets the one-shot answer (recomputed), and the counters say which
happened.

One session parks holding ~1,500 tokens of KV; a one-shot request then needs more blocks than are
free, so the broker evicts the parked session to the tier (``preemption="offload"``), and the
one-shot reuses some of its freed blocks (which also drops them from vLLM's prefix cache).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import EXACT_DTYPE, corpus_text
from tests.engine.helpers import oneshot
from tests.engine.test_equivalence import GREEDY, QUESTION, assert_same_computation

FIRST, SECOND, PRESSURE = 3600, 1000, 5000  # characters: the parked context, the final, the one-shot


@pytest.fixture(scope="module")
async def tier_engine(tiny_model):
    from stream2llm.engine.engine import EngineConfig, StreamingEngine

    # 3 MiB of float32 KV: 3,072 tokens, 24 blocks of 128
    eng = await StreamingEngine.start(
        EngineConfig(
            model="tiny",
            kv_cache_bytes=3 << 20,
            max_model_len=2816,
            session_ttl_s=None,
            dtype=EXACT_DTYPE,
            preemption="offload",
        )
    )
    yield eng
    await eng.shutdown()


async def wait_parked(engine, session, prefilled_before: int) -> None:
    """Until the engine prefilled everything the session sent and holds it parked."""
    for _ in range(500):
        stats = engine.stats()
        if stats.parked == 1 and stats.tokens_prefilled - prefilled_before >= len(session.prompt_ids) - 1:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the session never parked: {engine.stats()}")


async def evict_then_resume(engine, seed: int, between: Callable[[Path], None] = lambda _: None):
    """Park a session, evict it to the tier with a one-shot request, run ``between`` on the tier's
    directory, then send the final chunk; returns (result, context, stats before the final)."""
    first, second = corpus_text(FIRST, seed=seed), corpus_text(SECOND, seed=seed + 1)
    prefilled = engine.stats().tokens_prefilled
    # a salt of its own: a chunk taken over before any of it was computed looks the prefix cache up
    session = await engine.open(QUESTION, GREEDY, cache_salt=f"tier-{seed}-{uuid.uuid4().hex}")
    await session.append(first)
    await wait_parked(engine, session, prefilled)
    offloads = engine.stats().offloads
    pressure = await engine.open(QUESTION, GREEDY, mode="nonstream", cache_salt=f"pressure-{seed}")
    await pressure.append(corpus_text(PRESSURE, seed=seed + 2), final=True)
    await pressure.result()
    assert engine.stats().offloads == offloads + 1, "the parked session was not evicted to the tier"
    between(Path(engine.kv_tier_path))
    before = engine.stats()
    await session.append(second, final=True)
    return await session.result(), first + second, before


async def test_a_session_evicted_to_the_tier_resumes_with_the_one_shot_answer(tier_engine):
    streamed, context, before = await evict_then_resume(tier_engine, seed=10)
    assert_same_computation(
        tier_engine, streamed, await oneshot(tier_engine, QUESTION, context, GREEDY), context
    )
    assert streamed.tokens_loaded >= 128  # at least one whole block came back from the tier
    assert streamed.tokens_recomputed < 128  # only the partial last block was computed again
    after = tier_engine.stats()
    assert after.tier_bytes_loaded > before.tier_bytes_loaded and after.tier_load_failures == 0


def _damage(tier: Path) -> None:
    for path in tier.glob("*.safetensors"):
        raw = bytearray(path.read_bytes())
        raw[-11] ^= 0x10  # one bit of the KV: only the checksum notices
        path.write_bytes(bytes(raw))


def _delete(tier: Path) -> None:
    for path in tier.glob("*.safetensors"):
        path.unlink()


@pytest.mark.parametrize("fault", [_damage, _delete], ids=["damaged", "deleted"])
async def test_a_tier_that_lost_or_damaged_the_blocks_still_gives_the_one_shot_answer(tier_engine, fault):
    streamed, context, before = await evict_then_resume(
        tier_engine, seed=20 + len(fault.__name__), between=fault
    )
    assert_same_computation(
        tier_engine, streamed, await oneshot(tier_engine, QUESTION, context, GREEDY), context
    )
    assert streamed.tokens_loaded == 0 and streamed.tokens_recomputed >= 128  # nothing came back
    failures = tier_engine.stats().tier_load_failures - before.tier_load_failures
    assert failures > 0 if fault is _damage else failures == 0  # a deleted block is never asked for


async def test_a_bad_tier_configuration_is_refused_at_start_up(tmp_path):
    from stream2llm.engine.engine import EngineConfig, StreamingEngine
    from stream2llm.errors import StreamError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for config, what in [
        (EngineConfig(model="tiny", preemption="swap"), "preemption='swap'"),
        (EngineConfig(model="tiny", kv_tier_bytes=0), "kv_tier_bytes=0"),
        (EngineConfig(model="tiny", kv_tier_path=str(blocker / "tier")), "kv_tier_path"),
        (EngineConfig(model="tiny", cost_profile="nope"), "no cost profile 'nope'"),
    ]:
        with pytest.raises(StreamError, match=what):
            await StreamingEngine.start(config)
