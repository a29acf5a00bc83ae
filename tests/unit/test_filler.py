"""Filler text: the token count a synthetic trace asks for, the same text for the same key."""

from __future__ import annotations

import pytest

from stream2llm.context.prompt import TextTokenizer
from stream2llm.workloads.filler import FillerText


@pytest.fixture(scope="module")
def filler(tiny_model):
    tokenizer = TextTokenizer(tiny_model.path, tiny_model.bos_token_id)
    return FillerText(tokenizer), tokenizer


@pytest.mark.parametrize("n_tokens", [1, 2, 7, 31, 100, 543, 2048, 12000])
def test_filler_has_the_asked_token_count_within_part_of_a_word(filler, n_tokens):
    text_of, tokenizer = filler
    counts = [
        len(tokenizer.encode_with_ends(text_of.text(f"doc-{k}", n_tokens), bos=False)[0]) for k in range(8)
    ]
    assert all(abs(c - n_tokens) <= 6 for c in counts), counts
    if n_tokens < 30:
        return  # shorter than a few words: at least one whole word
    # no bias: what a trace of many events asks for is what the replay prefills
    assert abs(sum(counts) - 8 * n_tokens) <= max(8, 0.004 * 8 * n_tokens), counts


def test_filler_is_deterministic_and_words_join_cleanly(filler):
    text_of, tokenizer = filler
    a, b = text_of.text("a", 500), text_of.text("b", 300)
    assert a == text_of.text("a", 500) and a != b
    assert a.startswith(" ") and not a.endswith(" ") and "  " not in a
    # appended one after another, events tokenize as they do alone (the stream's appends)
    alone = len(tokenizer.encode_with_ends(a, bos=False)[0]) + len(
        tokenizer.encode_with_ends(b, bos=False)[0]
    )
    assert len(tokenizer.encode_with_ends(a + b, bos=False)[0]) == alone
