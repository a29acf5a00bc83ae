"""Bad input gets a clear error and harms no other session; finish and abort free all KV."""

from __future__ import annotations

import asyncio
import random

import pytest
from vllm import SamplingParams

from stream2llm.context.events import ContextEvent, Op
from stream2llm.errors import (
    ContextTooLong,
    InvalidEvent,
    SequenceError,
    SessionClosed,
    SessionExpired,
    UnknownSession,
)
from tests.conftest import corpus_text
from tests.engine.helpers import GREEDY, oneshot, split_at_random

QUESTION = "Summarise the context."


async def wait_for_idle(engine, timeout_s: float = 10.0):
    """The engine's own board: no request known, nothing parked, no KV in use."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        stats = engine.stats()
        if (stats.requests, stats.parked, stats.kv_usage) == (0, 0, 0.0):
            return stats
        if asyncio.get_running_loop().time() > deadline:
            return stats
        await asyncio.sleep(0.05)


async def _one_session(engine, rng: random.Random, i: int) -> str:
    """Open a session, feed it a few chunks, and abort it at a random point (or let it finish)."""
    session = await engine.open(QUESTION, SamplingParams(temperature=0, max_tokens=rng.choice([1, 8, 40])))
    pieces = split_at_random(corpus_text(rng.randrange(300, 5000), seed=i), rng.randrange(1, 5), rng)
    plan = rng.choice(["after-open", "mid-prefill", "parked", "decoding", "complete"])
    if plan == "after-open":
        await session.abort()
        return plan
    for n, piece in enumerate(pieces):
        await session.append(piece)
        if plan == "mid-prefill" and n == len(pieces) - 1:
            await session.abort()  # the chunk was just handed over: its prefill is queued or running
            return plan
        await asyncio.sleep(rng.random() * 0.02)
    if plan == "parked":
        await asyncio.sleep(0.05)
        await session.abort()
        return plan
    await session.finish()
    if plan == "decoding":
        await asyncio.sleep(rng.random() * 0.05)
        await session.abort()
        return plan
    result = await session.result()
    assert result.token_ids
    return plan


async def test_hundred_sessions_with_random_aborts_free_all_kv(engine):
    rng = random.Random(7)
    plans = []
    for batch in range(10):
        plans += await asyncio.gather(*(_one_session(engine, rng, batch * 10 + j) for j in range(10)))
    assert len(plans) == 100 and len(set(plans)) == 5  # every kind of abort happened
    stats = await wait_for_idle(engine)
    assert stats.requests == 0 and stats.parked == 0 and stats.running == 0
    assert stats.kv_usage == 0.0
    # the engine is healthy afterwards
    context = corpus_text(3000, seed=99)
    s = await engine.open(QUESTION, GREEDY)
    await s.append(context)
    await s.finish()
    assert (await s.result()).token_ids == (await oneshot(engine, QUESTION, context)).token_ids


async def test_bad_input_gets_clear_errors_and_harms_no_other_session(engine):
    context = corpus_text(4000, seed=5)
    bystander = await engine.open(QUESTION, GREEDY)
    await bystander.append(context[:2000])

    # an unknown session
    with pytest.raises(UnknownSession, match="no open session with id 'nope'"):
        engine.session("nope")
    assert engine.session(bystander.request_id) is bystander

    victim = await engine.open(QUESTION, GREEDY)
    # empty chunks
    with pytest.raises(InvalidEvent, match="non-empty text"):
        await victim.append("")
    with pytest.raises(InvalidEvent, match="empty"):
        ContextEvent(victim.request_id, 0, Op.APPEND, "")
    with pytest.raises(InvalidEvent, match="unknown op 'insert'"):
        ContextEvent(victim.request_id, 0, "insert", "x")
    # out-of-order and duplicate sequence numbers
    await victim.push(ContextEvent(victim.request_id, 0, Op.APPEND, "first. "))
    with pytest.raises(SequenceError, match=r"out-of-order event 2 .* expected 1"):
        await victim.push(ContextEvent(victim.request_id, 2, Op.APPEND, "third. "))
    with pytest.raises(SequenceError, match="duplicate event 0"):
        await victim.push(ContextEvent(victim.request_id, 0, Op.APPEND, "first again. "))
    # context beyond max_model_len: the error names the size and the limit; the session survives
    with pytest.raises(ContextTooLong, match=r"maximum context length is 4096 tokens. However, you") as err:
        await victim.append(corpus_text(20000, seed=6))
    assert err.value.size > err.value.limit == 4096 - GREEDY.max_tokens
    await victim.push(ContextEvent(victim.request_id, 1, Op.APPEND, "second.", final=True))
    # events after finish
    with pytest.raises(SessionClosed, match="already finished"):
        await victim.append("late")
    with pytest.raises(SessionClosed):
        await victim.finish()
    victim_result = await victim.result()
    assert victim_result.token_ids == (await oneshot(engine, QUESTION, "first. second.")).token_ids

    # an abort in the middle of a prefill
    doomed = await engine.open(QUESTION, GREEDY)
    await doomed.append(corpus_text(7000, seed=8))
    await doomed.abort()
    with pytest.raises(SessionClosed, match="aborted"):
        await doomed.result()
    with pytest.raises(SessionClosed):
        await doomed.append("after abort")

    await bystander.append(context[2000:])
    await bystander.finish()
    assert (await bystander.result()).token_ids == (await oneshot(engine, QUESTION, context)).token_ids
    stats = await wait_for_idle(engine)
    assert stats.kv_usage == 0.0 and stats.requests == 0


async def test_truncate_drops_the_oldest_context_to_fit(engine):
    session = await engine.open(QUESTION, GREEDY, truncate=True)
    long_context = corpus_text(16000, seed=9)
    for piece in split_at_random(long_context, 4, random.Random(1)):
        await session.append(piece)
    await session.finish()
    result = await session.result()
    limit = 4096 - GREEDY.max_tokens
    assert limit - 64 <= len(result.prompt_token_ids) <= limit
    # the newest context survived, the oldest was dropped
    text = engine.tokenizer.decode(result.prompt_token_ids)
    assert long_context[-500:] in text and long_context[:500] not in text
    direct = await engine.complete(result.prompt_token_ids, GREEDY, use_prefix_cache=False)
    assert result.token_ids == direct


async def test_a_session_whose_next_chunk_never_comes_expires_and_frees_its_kv(engine):
    ttl = engine.config.session_ttl_s
    engine.config.session_ttl_s = 0.6
    try:
        stalled = await engine.open(QUESTION, GREEDY)
        await stalled.append(corpus_text(2000, seed=12))
        await asyncio.sleep(0.3)
        assert engine.stats().parked == 1  # prefilled, holding KV, waiting for more
        with pytest.raises(SessionExpired, match="session_ttl_s"):
            await asyncio.wait_for(stalled.result(), timeout=5)
        with pytest.raises(SessionClosed):
            await stalled.append("too late")
    finally:
        engine.config.session_ttl_s = ttl
    stats = await wait_for_idle(engine)
    assert (stats.parked, stats.kv_usage) == (0, 0.0)


async def test_a_session_that_cannot_open_holds_no_slot(engine):
    """max_tokens leaves no room for even the instructions: open() fails and nothing lingers."""
    from vllm import SamplingParams

    before = len(engine.open_sessions())
    too_long = SamplingParams(temperature=0, max_tokens=engine.config.max_model_len - 4)
    with pytest.raises(ContextTooLong):
        await engine.open("a question whose prompt cannot fit", too_long)
    assert len(engine.open_sessions()) == before


def test_requests_stop_at_the_models_end_of_sequence_unless_told_not_to(engine):
    """vLLM runs without its tokenizer here and would not stop at EOS on its own."""
    from vllm import SamplingParams

    eos = list(engine.model.eos_token_ids)
    assert eos
    assert engine.with_eos_stop(SamplingParams(max_tokens=4)).stop_token_ids == eos
    assert not engine.with_eos_stop(SamplingParams(max_tokens=4, ignore_eos=True)).stop_token_ids
    mine = SamplingParams(max_tokens=4, stop_token_ids=[7])
    assert engine.with_eos_stop(mine).stop_token_ids == [7, *eos]
    assert mine.stop_token_ids == [7]  # the caller's params are not changed


def test_the_start_up_heap_is_out_of_the_garbage_collectors_way(engine):
    """What start-up made (vLLM, torch, the tokenizer) is frozen: a full collection no longer
    walks it. Walking it took 0.4 s on 2 vCPUs, and every session's next chunk waited."""
    import gc

    assert gc.get_freeze_count() > 50_000
    assert not any(o is engine.config for o in gc.get_objects())  # made before the freeze
    made_after = [engine.config]
    assert any(o is made_after for o in gc.get_objects())  # collected as before


async def test_an_ended_session_is_freed_without_the_garbage_collector(engine):
    """A session and its hand-over, once ended (finished, aborted or failed), are no reference
    cycle: reference counting frees them. Cycles of ended sessions piled up between full
    collections (26-31k objects each under load) and one such collection paused serving 175 ms."""
    import gc
    import weakref

    async def ended(how: str) -> weakref.ref:
        session = await engine.open(QUESTION, SamplingParams(temperature=0, max_tokens=4))
        await session.append(corpus_text(600, 7), final=how == "finish")
        if how == "finish":
            await session.result()
        else:
            await session.abort()
        await asyncio.sleep(0.05)  # the runner's and the stop's tasks end
        return weakref.ref(session)

    gc.collect()
    gc.disable()
    try:
        for how in ("finish", "abort"):
            ref = await ended(how)
            await asyncio.sleep(0.05)
            assert ref() is None, (
                f"a {how}ed session is alive: {[type(r).__name__ for r in gc.get_referrers(ref())]}"
            )
    finally:
        gc.enable()
