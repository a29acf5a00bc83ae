"""Prompt layout: committed ids are always a prefix of the final tokenization, or become an update."""

from __future__ import annotations

import random

import pytest

from stream2llm.context.prompt import PromptBuilder, TextTokenizer
from stream2llm.errors import ContextTooLong
from stream2llm.tokens import common_prefix_len
from tests.conftest import corpus_text


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return TextTokenizer(tiny_model.path, tiny_model.bos_token_id)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model):
    """The model's Hugging Face tokenizer: BOS from its own post-processor, not TextTokenizer's
    code, so comparing with it is not comparing TextTokenizer with itself."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model.path)


def test_bos_is_added_once(tokenizer, tiny_model):
    ids = tokenizer.encode("hello world")
    assert ids[0] == tiny_model.bos_token_id and ids.count(tiny_model.bos_token_id) == 1
    assert tokenizer.decode(ids) == "hello world"


@pytest.mark.parametrize("seed", range(30))
def test_streamed_ids_match_final_tokenization(tokenizer, hf_tokenizer, seed):
    """Feed text in random pieces; each step's committed ids either extend what was sent (append) or
    the difference is an update; the final ids equal one tokenization of the whole prompt."""
    rng = random.Random(seed)
    text = corpus_text(rng.randrange(200, 4000), seed=seed)
    builder = PromptBuilder(tokenizer, "Why?")
    sent: list[int] = []
    drift_tokens = 0
    cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(1, 30)))
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        builder.append(text[a:b])
        ids = builder.ids(final=False).ids
        drift_tokens += len(sent) - common_prefix_len(sent, ids)
        sent = ids
    final = builder.ids(final=True).ids
    assert final == hf_tokenizer(builder.prefix + text + builder.suffix)["input_ids"]
    assert final[: len(sent)] == sent or common_prefix_len(sent, final) >= len(sent) - 8
    assert drift_tokens == 0  # the hold-back kept every committed token stable on this corpus


def test_context_too_long_names_size_and_limit_as_vllm_does(tokenizer):
    builder = PromptBuilder(tokenizer, "Q?", max_prompt_tokens=100, output_tokens=28)
    builder.append("word " * 250)  # 1,250 characters: tokenized, ~250 tokens
    pattern = r"context length is 128 tokens. However, you requested \d+ tokens \(\d+ in the prompt, 28"
    with pytest.raises(ContextTooLong, match=pattern) as err:
        builder.ids(final=False)
    assert err.value.size > 100 and err.value.limit == 100
    assert f"requested {err.value.size + 28} tokens ({err.value.size} in the prompt" in str(err.value)
    huge = PromptBuilder(tokenizer, "Q?", max_prompt_tokens=100, output_tokens=28)
    huge.append("x" * 5000)  # not even tokenized: 16 characters a token at most
    with pytest.raises(ContextTooLong, match=r"is 128 tokens. However, your prompt contains \d+ characters"):
        huge.ids(final=False)


def test_truncate_keeps_the_newest_context(tokenizer):
    builder = PromptBuilder(tokenizer, "Q?", max_prompt_tokens=200, truncate=True)
    text = " ".join(f"item{i}" for i in range(400))
    builder.append(text)
    ids = builder.ids(final=True).ids
    assert 150 < len(ids) <= 200
    assert builder.body.endswith("item399") and "item0 " not in builder.body
    assert builder.truncated_chars > 0


def test_long_texts_tokenize_the_same_without_holding_the_gil(tokenizer):
    """Above GIL_FREE_CHARS the tokenizer's batch path runs (it releases the GIL, so a worker
    thread tokenizing a huge context leaves the event loop free); ids and offsets are the same
    as the single-text path's, so streamed prefill still equals one-shot tokenization."""
    from stream2llm.context.prompt import GIL_FREE_CHARS

    text = "Retrieval streams context into the engine, chunk by chunk. " * (3 * GIL_FREE_CHARS // 60)
    assert len(text) > GIL_FREE_CHARS
    single = tokenizer._tok.encode(text, add_special_tokens=False)
    ids, ends = tokenizer.encode_with_ends(text, bos=False)
    assert ids == single.ids and ends == [end for _, end in single.offsets]
    short = text[: GIL_FREE_CHARS // 2]
    plain = tokenizer._tok.encode(short, add_special_tokens=False)
    assert tokenizer.encode_with_ends(short, bos=False)[0] == plain.ids
