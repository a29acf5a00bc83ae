"""Deterministic filler text of a given token count, for synthetic traces (``n_tokens``).

Words are drawn from real English (Python's help topics) with a seed derived from a key, so the
same key always yields the same text, and hence the same tokens, in every replay. The text is cut
at the word boundary nearest the asked count, so a replay prefills what the trace says (within a
word's tokens) and a model of the engine fed the same trace sees the same work.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import re
from functools import cached_property

from stream2llm.context.prompt import TextTokenizer

SENTENCE_WORDS = 12  # a period every so many words, so the text reads as text


class FillerText:
    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer

    @cached_property
    def _words(self) -> list[str]:
        from pydoc_data.topics import topics

        words = {w for text in topics.values() for w in re.findall(r"[a-z]{3,10}", text)}
        return sorted(words)

    @cached_property
    def _tokens_per_word(self) -> float:
        sample = self._draw(random.Random(0), [], 2000)
        return len(self._encode(sample)[0]) / 2000

    def text(self, key: str, n_tokens: int) -> str:
        """A leading space and whole words, ``n_tokens`` tokens long give or take part of a word."""
        rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        words: list[str] = []
        while True:
            text = self._draw(rng, words, round(n_tokens / self._tokens_per_word) + 8)
            ids, ends = self._encode(text)
            if len(ids) > n_tokens:
                return text[: _nearest_word_cut(text, ends, n_tokens)]

    def _draw(self, rng: random.Random, words: list[str], n_words: int) -> str:
        """Extend ``words`` to ``n_words`` (the same key draws the same sequence) and join them."""
        for i in range(len(words), max(n_words, len(words) + 1)):
            words.append(rng.choice(self._words) + ("." if i % SENTENCE_WORDS == SENTENCE_WORDS - 1 else ""))
        return " " + " ".join(words)

    def _encode(self, text: str) -> tuple[list[int], list[int]]:
        return self._tokenizer.encode_with_ends(text, bos=False)


def _nearest_word_cut(text: str, ends: list[int], n_tokens: int) -> int:
    """The character offset of the word boundary whose prefix tokenizes closest to ``n_tokens``
    (words tokenize on their own, so a prefix ending at a space keeps the whole text's tokens)."""
    end = ends[n_tokens - 1]
    if end >= len(text) or text[end] == " ":
        return end
    before, after = text.rfind(" ", 0, end), text.find(" ", end)
    after = len(text) if after < 0 else after
    tokens_before, tokens_after = bisect.bisect_right(ends, before), bisect.bisect_right(ends, after)
    if before <= 0:  # inside the first word
        return after
    return before if n_tokens - tokens_before <= tokens_after - n_tokens else after
