"""Each chunk is prefilled while the next one is still being retrieved."""

from __future__ import annotations

import asyncio

from stream2llm.context.prompt import PromptTemplate
from tests.conftest import corpus_text
from tests.engine.helpers import GREEDY, oneshot, split_at_random

QUESTION = "What is described here?"
GAP_S = 0.5


async def test_each_chunk_is_prefilled_before_the_next_arrives(engine):
    import random

    context = corpus_text(7000, seed=3)
    t = PromptTemplate()
    n_tokens = len(engine.tokenizer.encode(t.render_prefix(QUESTION) + context + t.render_suffix(QUESTION)))
    assert 2500 <= n_tokens <= 3100
    pieces = split_at_random(context, 5, random.Random(3))

    session = await engine.open(QUESTION, GREEDY)
    for piece in pieces:  # retrieval: a page every GAP_S seconds, the first one too
        await asyncio.sleep(GAP_S)
        await session.append(piece)
    await asyncio.sleep(GAP_S)
    await session.finish()
    streamed = await session.result()
    reference = await oneshot(engine, QUESTION, context)

    chunks = streamed.chunks
    assert len(chunks) >= len(pieces) + 1  # prefix, pages, final
    for chunk, following in zip(chunks, chunks[1:]):
        assert chunk.done is not None and chunk.done < following.sent  # prefill done before the next
    assert streamed.token_ids == reference.token_ids
    # only the held-back tail and the answer cue remain for the final chunk
    assert chunks[-1].tokens < 40
    assert streamed.ttft_final_s < reference.ttft_final_s
