from __future__ import annotations

import random
import uuid

from vllm import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def split_at_random(text: str, k: int, rng: random.Random) -> list[str]:
    """k non-empty pieces, every boundary inside a word (where BPE merges across it)."""
    inside_words = [i for i in range(1, len(text)) if text[i - 1].isalnum() and text[i].isalnum()]
    cuts = sorted(rng.sample(inside_words, k - 1))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


async def oneshot(engine, question: str, context: str | list[str], sampling=GREEDY):
    """The reference: the whole final prompt in one request on the same engine. Its own cache salt
    keeps it from reusing any streamed session's KV, so a corrupt KV cannot agree with itself."""
    s = await engine.open(question, sampling, mode="nonstream", cache_salt=uuid.uuid4().hex)
    if isinstance(context, str):
        await s.append(context)
    else:
        await s.update(context)
    await s.finish()
    return await s.result()
