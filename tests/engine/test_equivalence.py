"""Streamed prefill gives exactly what one-shot prefill gives: the same prompt computed by the
engine (its own digest of the token ids it handed the model, against an independent tokenization of
the final prompt), the same greedy tokens, the same top-5 candidates with float32 logprobs equal to 1e-4."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import uuid

import pytest
from vllm import SamplingParams

from stream2llm.context.prompt import DOC_SEPARATOR, PromptTemplate
from stream2llm.core.protocol import token_digest
from stream2llm.tokens import common_prefix_len
from tests.conftest import corpus_text
from tests.engine.helpers import oneshot, split_at_random

QUESTION = "What does the documentation say about this?"
# greedy, plus the top-5 logprobs of every generated token (float32 engine: compared exactly)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
# float32 attention over a prompt cut into many chunks sums in another order than one-shot's: up to
# 20 chunks gave logprobs equal to ~2e-6 (often bit for bit); one stale KV entry 500 tokens back
# moves them by ~1e-2 on the trained tiny model (tests/unit/test_models.py measures it)
LOGPROB_TOL = 1e-4


@functools.cache
def _hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def full_prompt_ids(engine, context: str | list[str]) -> list[int]:
    """The final prompt tokenized in one go by the model's Hugging Face tokenizer (its own BOS
    post-processor): independent of the front end's incremental tokenizer."""
    t = PromptTemplate()
    body = context if isinstance(context, str) else DOC_SEPARATOR.join(context)
    ids = _hf_tokenizer(str(engine.model.path))(t.render_prefix(QUESTION) + body + t.render_suffix(QUESTION))
    return list(ids["input_ids"])


def assert_same_computation(engine, streamed, reference, context: str | list[str]) -> None:
    """What the engine core computed for the streamed session is the one-shot prompt, and the
    answer's logprobs are the one-shot's, bit for bit."""
    expected = full_prompt_ids(engine, context)
    assert reference.computed_prompt_len == len(expected)
    assert reference.computed_prompt_digest == token_digest(expected)
    assert streamed.computed_prompt_len == len(expected)
    assert streamed.computed_prompt_digest == token_digest(expected)
    assert streamed.token_ids == reference.token_ids
    assert streamed.logprobs is not None and len(streamed.logprobs) == len(streamed.token_ids)
    assert all(len(d) >= 5 for d in streamed.logprobs)
    assert [d.keys() for d in streamed.logprobs] == [d.keys() for d in reference.logprobs]  # same top-5
    worst = max(abs(d[t] - r[t]) for d, r in zip(streamed.logprobs, reference.logprobs) for t in d)
    assert worst <= LOGPROB_TOL, worst


@pytest.mark.parametrize(("k", "n_chars"), [(1, 2000), (2, 4000), (5, 6000), (20, 6800)])
async def test_append_session_equals_oneshot(engine, k, n_chars):
    rng = random.Random(k)
    context = corpus_text(n_chars, seed=k)
    pieces = split_at_random(context, k, rng)

    # its own salt: a chunk taken over before any of it was computed looks the prefix cache up,
    # and earlier tests cached this text; here every token must be prefilled by the session
    session = await engine.open(QUESTION, GREEDY, cache_salt=uuid.uuid4().hex)
    for piece in pieces:
        await session.append(piece)
        await asyncio.sleep(rng.choice([0, 0, 0.005, 0.03]))  # some chunks queue, some find it parked
    await session.finish()
    streamed = await session.result()

    expected_prompt = full_prompt_ids(engine, context)
    assert streamed.prompt_token_ids == expected_prompt  # no drift at chunk boundaries
    assert 700 < len(expected_prompt) <= 3000
    reference = await oneshot(engine, QUESTION, context, GREEDY)
    assert reference.prompt_token_ids == expected_prompt
    assert_same_computation(engine, streamed, reference, context)
    assert len(streamed.token_ids) == GREEDY.max_tokens  # no throw-away token reached the caller
    direct = await engine.complete(expected_prompt, GREEDY, use_prefix_cache=False)
    assert streamed.token_ids == direct
    # every prompt token was prefilled exactly once (the prefix cache was not used by the session)
    assert streamed.tokens_prefilled == len(expected_prompt)


async def _wait_parked(engine, prefilled_before: int, expected: int = 1, timeout_s: float = 30.0) -> None:
    """Until the engine core has prefilled the update (``expected`` tokens: what lies past the
    kept prefix) and parked the session again, not a fixed sleep: on a loaded machine 0.15 s was
    too short, and a board that had moved by a token or two of earlier work let the next update
    find this one's prefill not even started."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        stats = engine.stats()
        idle = stats.parked >= 1 and stats.running == 0 and stats.waiting == 0
        if idle and stats.tokens_prefilled - prefilled_before >= expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the session did not park")


@contextlib.contextmanager
def engine_policy(engine, name: str):
    """The engine's policy for the chunks sent inside (fcfs: every update applied as it comes,
    no speculation gate), restored after."""
    before = engine.policy
    engine.set_policy(name)
    try:
        yield
    finally:
        engine.set_policy(before)


async def _run_updates(engine, series: list[list[str]], wait: bool):
    session = await engine.open(QUESTION, GREEDY)
    snapshots = []
    for docs in series:
        before = session.prompt_ids
        prefilled_before = engine.stats().tokens_prefilled
        await session.update(docs)
        after = session.prompt_ids
        snapshots.append((before, after))
        if wait:
            kept = min(common_prefix_len(before, after), len(after) - 1)
            await _wait_parked(engine, prefilled_before, max(len(after) - kept, 1))
    await session.finish()
    return session, snapshots, await session.result()


@pytest.mark.parametrize("wait", [True, False], ids=["parked", "queued"])
async def test_update_session_equals_oneshot_and_recomputes_only_past_lcp(engine, wait):
    a = corpus_text(7000, seed=11)
    b = corpus_text(6000, seed=12)
    docs_a = [a[:2500], a[2500:5000], a[5000:]]
    series = [
        docs_a,
        [docs_a[0], docs_a[1], "A different final document replaces the old tail. " * 20],  # tail changed
        [docs_a[0], docs_a[1][:900] + " EDITED IN THE MIDDLE " + docs_a[1][900:], docs_a[2]],  # middle
        [b[:3000], b[3000:]],  # everything replaced
        [b[:1700]],  # shorter than before (a prefix of the old context)
    ]
    with engine_policy(engine, "fcfs"):  # each update applied: stream2llm's gate would hold some
        _, snapshots, result = await _run_updates(engine, series, wait)

    reference = await oneshot(engine, QUESTION, series[-1], GREEDY)
    assert result.prompt_token_ids == reference.prompt_token_ids
    assert_same_computation(engine, result, reference, series[-1])
    if not wait:
        # sent faster than the engine prefills: each update took over the one in work in place
        # (nothing held back), and recomputes exactly what lies past its LCP with what was computed
        assert len(result.updates) == len(series) - 1
        assert any(r["old_len"] < len(before) for r, (before, _) in zip(result.updates, snapshots[1:]))
        for record in result.updates:
            assert record["kept"] == min(record["lcp"], record["new_len"] - 1)
            assert record["recomputed"] == record["new_len"] - record["kept"]
        # the last update carries the last docs (and the finishing tail, when they went as one)
        assert result.updates[-1]["new_len"] in (len(snapshots[-1][1]), len(result.prompt_token_ids))
        assert result.tokens_recomputed == sum(r["recomputed"] for r in result.updates)
        return
    assert len(result.updates) == len(series) - 1  # the first docs open the context (an append)
    for record, (before, after) in zip(result.updates, snapshots[1:]):
        lcp = common_prefix_len(before, after)
        assert record["old_len"] == len(before)
        assert record["new_len"] == len(after)
        assert record["lcp"] == lcp
        # token-exact: everything up to the LCP is kept (one token is always recomputed for logits)
        assert record["kept"] == min(lcp, len(after) - 1)
        assert record["recomputed"] == len(after) - record["kept"]
        assert record["discarded"] == len(before) - record["kept"]
    prefix_len = len(engine.tokenizer.encode(PromptTemplate().render_prefix(QUESTION)))
    assert result.updates[2]["lcp"] <= prefix_len  # "everything replaced" keeps only the instructions
    assert any(r["lcp"] % 128 for r in result.updates)  # cuts inside KV blocks were exercised
    assert {r["tail"] for r in result.updates} & {"unhashed", "private"}
    assert result.tokens_recomputed == sum(r["recomputed"] for r in result.updates)


async def test_update_cut_inside_a_block_shared_with_another_request(engine):
    """A one-shot request hits a parked session's cached blocks; cutting the session inside one of
    those shared blocks must copy it, never write it, and both must still equal one-shot."""
    from vllm import SamplingParams

    long_decode = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    context = corpus_text(4000, seed=21)
    session = await engine.open(QUESTION, GREEDY)
    await session.update([context])
    await asyncio.sleep(0.3)  # prefilled and parked; its full blocks are in the prefix cache
    other = asyncio.create_task(_shared_oneshot(engine, context, long_decode))
    await asyncio.sleep(0.15)  # the other request now holds the same blocks while it decodes
    cut = context[:1500] + " a replacement that diverges inside a shared block " * 5
    await session.update([cut])
    await session.finish()
    streamed, shared = await session.result(), await other
    assert shared.tokens_prefilled < len(shared.prompt_token_ids)  # it really reused the blocks
    assert streamed.updates[-1]["kept"] % 128 != 0
    assert streamed.updates[-1]["tail"] == "copied"  # the shared block was copied, never written
    assert shared.token_ids == await engine.complete(
        shared.prompt_token_ids, long_decode, use_prefix_cache=False
    )
    assert_same_computation(engine, streamed, await oneshot(engine, QUESTION, [cut], GREEDY), [cut])


async def _shared_oneshot(engine, context, sampling):
    """A one-shot request that may reuse cached blocks (no salt)."""
    s = await engine.open(QUESTION, sampling, mode="nonstream")
    await s.update([context])
    await s.finish()
    return await s.result()


async def test_vllm_mode_update_resubmits_and_equals_oneshot(engine):
    a = corpus_text(5000, seed=31)
    session = await engine.open(QUESTION, GREEDY, mode="vllm")
    await session.update([a])
    await asyncio.sleep(0.1)
    await session.update([a[:3000] + " changed tail " * 10])
    await session.finish()
    result = await session.result()
    final_docs = [a[:3000] + " changed tail " * 10]
    reference = await oneshot(engine, QUESTION, final_docs, GREEDY)
    assert_same_computation(engine, result, reference, final_docs)
    assert result.updates == []  # stock path: no in-place update happened


@pytest.mark.parametrize("policy", ["fcfs", "stream2llm"])
async def test_an_update_that_arrives_mid_prefill_cuts_the_one_in_flight(engine, policy):
    """An ANN pipeline refines faster than a long update prefills. Each update here replaces the
    first document, so almost nothing of the previous one survives; sent back to back, the engine
    core ends the update in flight after the tokens it already scheduled (the next update's LCP
    shows it held fewer tokens than that update's prompt), and the answer is still the one-shot's.
    How much an update threw away depends on whether a step of the one before it started before
    it arrived (a race with the engine core): at most that one step, never the whole update."""
    text = corpus_text(16000, seed=21)
    series = [[f"Refinement {i}: " + text[i * 50 : 4000 + i * 50], text[8000:11000]] for i in range(5)]
    with engine_policy(engine, policy):  # salted: no KV from the other run or the reference
        session = await engine.open(QUESTION, GREEDY, cache_salt=uuid.uuid4().hex)
        for docs in series:
            await session.update(docs)
        await session.finish()
        result = await session.result()

    reference = await oneshot(engine, QUESTION, series[-1], GREEDY)
    assert result.prompt_token_ids == reference.prompt_token_ids
    assert_same_computation(engine, result, reference, series[-1])
    applied = result.updates
    # an update found the one before it only partly prefilled, and kept what was computed of it
    assert any(later["old_len"] < earlier["new_len"] for earlier, later in zip(applied, applied[1:])), applied
    # each update threw away at most the step in flight when it came (each full one: ~3,300)
    step = engine.config.max_num_batched_tokens
    assert all(update["discarded"] <= step for update in applied), applied
    # exactly: what streaming prefilled beyond one-shot is the KV that updates threw away
    assert result.tokens_prefilled == len(result.prompt_token_ids) + result.tokens_discarded


async def test_a_session_whose_updates_throw_away_most_stops_speculating_and_equals_oneshot(engine):
    """stream2llm's speculation gate: each refinement replaces the first document, so once one has
    thrown away most of what was prefilled, the session's next refinements wait in the engine
    core and go in with its final (as one chunk). Fewer updates are applied and fewer tokens
    prefilled than under fcfs (no gate), and both answers are the one-shot's."""
    text = corpus_text(12000, seed=41)
    series = [[f"Refinement {i}: " + text[i * 300 : 2000 + i * 300], text[6000:9000]] for i in range(6)]
    results = {}
    for policy in ("fcfs", "stream2llm"):
        with engine_policy(engine, policy):
            session = await engine.open(QUESTION, GREEDY)
            for i, docs in enumerate(series):
                before, prefilled_before = session.prompt_ids, engine.stats().tokens_prefilled
                await session.update(docs)
                if policy == "fcfs" or i < 3:  # stream2llm's gate closes at the fourth (see below)
                    kept = min(common_prefix_len(before, session.prompt_ids), len(session.prompt_ids) - 1)
                    await _wait_parked(engine, prefilled_before, len(session.prompt_ids) - kept)
            await session.finish()
            results[policy] = await session.result()
    reference = await oneshot(engine, QUESTION, series[-1], GREEDY)
    for result in results.values():
        assert_same_computation(engine, result, reference, series[-1])
    ungated, gated = results["fcfs"], results["stream2llm"]
    assert len(ungated.updates) == len(series) - 1
    # the second refinement threw away ~all the first had prefilled (49% of all prefilled so far),
    # the third ~all of the second (66%): the fourth and fifth are held, then go in with the last
    assert len(gated.updates) == 3 and gated.updates[:2] == ungated.updates[:2]
    held = sum(u["recomputed"] for u in ungated.updates[2:4])
    assert gated.tokens_prefilled == pytest.approx(ungated.tokens_prefilled - held, rel=0.02)


# temperature 1 with a seed: what one request with this seed samples is reproducible (vLLM seeds a
# generator of its own per request), and a streamed session must sample the same
SEEDED = SamplingParams(temperature=1.0, seed=2027, max_tokens=32, ignore_eos=True)


@pytest.mark.parametrize("mode", ["append", "update"])
async def test_a_seeded_streamed_session_samples_what_one_seeded_request_does(engine, mode):
    """Its earlier chunks run greedy; the final chunk samples with the caller's seed from a fresh
    generator, so two streamed runs and the one-shot request give the same 32 tokens."""
    docs = [corpus_text(1500, seed=51 + i) for i in range(3)]
    answers = []
    for _ in range(2):
        session = await engine.open(QUESTION, SEEDED, cache_salt=uuid.uuid4().hex)
        for i, doc in enumerate(docs):
            await (session.append(doc + DOC_SEPARATOR) if mode == "append" else session.update(docs[: i + 1]))
            await asyncio.sleep(0.05)  # each chunk prefilled and parked before the next
        await session.finish()
        answers.append((await session.result()).token_ids)
    context = "".join(d + DOC_SEPARATOR for d in docs) if mode == "append" else docs
    reference = await oneshot(engine, QUESTION, context, SEEDED)
    greedy = await oneshot(engine, QUESTION, context, GREEDY)
    assert reference.token_ids[:24] != greedy.token_ids  # sampled, not the greedy answer
    assert answers[0] == reference.token_ids
    assert answers[1] == reference.token_ids
    assert len(reference.token_ids) == 32


async def test_nonstream_computes_the_rendered_prompt(engine):
    """nonstream mode (one request after the last event) against a second one-shot and a direct
    request on the tokenizer's ids: the same computed prompt, tokens and logprobs."""
    docs = [corpus_text(3000, seed=41), corpus_text(2000, seed=42)]
    session = await engine.open(QUESTION, GREEDY, mode="nonstream")
    await session.update(docs[:1])
    await session.update(docs)
    await session.finish()
    result = await session.result()
    assert_same_computation(engine, result, await oneshot(engine, QUESTION, docs, GREEDY), docs)
    assert result.token_ids == await engine.complete(
        full_prompt_ids(engine, docs), GREEDY, use_prefix_cache=False
    )


async def test_a_logprob_mismatch_is_visible(engine):
    """The oracle can fail: a prompt that differs in one token far back gives other logprobs."""
    context = corpus_text(3000, seed=51)
    a = await oneshot(engine, QUESTION, context, GREEDY)
    changed = context[:1000] + ("X" if context[1000] != "X" else "Y") + context[1001:]
    b = await oneshot(engine, QUESTION, changed, GREEDY)
    assert a.computed_prompt_digest != b.computed_prompt_digest
    worst = max(abs(d[t] - r.get(t, 0.0)) for d, r in zip(a.logprobs, b.logprobs) for t in d)
    assert worst > 100 * LOGPROB_TOL, worst


async def test_delta_output_is_refused(engine):
    """The session strips throw-away tokens off a cumulative output; DELTA would drop real ones."""
    from vllm.sampling_params import RequestOutputKind

    from stream2llm.errors import StreamError

    delta = SamplingParams(temperature=0, max_tokens=4, output_kind=RequestOutputKind.DELTA)
    for mode in ("stream", "vllm", "nonstream"):
        with pytest.raises(StreamError, match="output_kind=CUMULATIVE"):
            await engine.open(QUESTION, delta, mode=mode)
