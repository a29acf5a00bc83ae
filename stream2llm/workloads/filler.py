"""Deterministic filler text of about a given token count, for synthetic traces (``n_tokens``).

Words are drawn from real English (Python's help topics) with a seed derived from a key, so the
same key always yields the same text, and hence the same tokens, in every replay.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import cached_property

from stream2llm.connectors.prompt import TextTokenizer


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
        rng = random.Random(0)
        sample = " ".join(rng.choice(self._words) for _ in range(2000))
        return (len(self._tokenizer.encode(" " + sample)) - 1) / 2000

    def text(self, key: str, n_tokens: int) -> str:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        rng = random.Random(seed)
        n_words = max(1, round(n_tokens / self._tokens_per_word))
        words = [rng.choice(self._words) for _ in range(n_words)]
        for i in range(11, n_words, 12):  # sentences, so the text reads as text
            words[i] += "."
        return " " + " ".join(words)
