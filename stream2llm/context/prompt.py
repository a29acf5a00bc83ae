"""Prompt layout and tokenization with no drift at chunk boundaries.

A prompt is ``prefix`` (instructions and the question), ``body`` (the retrieved context) and
``suffix`` (the answer cue). Context arrives in pieces, but what the engine has prefilled must equal
the tokenization of the *final* full prompt text, token for token. Tokenizing each piece on its own
breaks that (BPE merges across a boundary: "retri" + "eval" is not "retrieval"), so:

1. every event re-tokenizes the text from the last committed token on (all of it after an update;
   the final event: all of it, so that it equals one-shot tokenization);
2. only tokens that end at least ``holdback_chars`` before the end of the text are *committed*
   (sent to the engine); the tail may still merge with text that has not arrived yet;
3. if the committed ids of an event are not an extension of what was sent before (a merge reached
   further back than the hold-back), the difference is sent as an *update*: the engine keeps the
   longest common prefix and recomputes the rest. So equality with one-shot tokenization holds in
   every case, and the hold-back only keeps such updates rare.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from stream2llm.errors import ContextTooLong
from stream2llm.tokens import ceil_div

# re-exported from its old home (benchmarks/ann_layout.py imports it from here)
from stream2llm.tokens import common_prefix_len as common_prefix_len

HOLDBACK_CHARS = 32
# No token of the models served here spans more characters than this: a text longer than this many
# characters per token of the window cannot fit, and is rejected (or cut) before it is tokenized.
MAX_CHARS_PER_TOKEN = 16
DOC_SEPARATOR = "\n\n"
GIL_FREE_CHARS = 8192  # texts longer than this are tokenized without holding the GIL


def clearly_too_long(n_chars: int, limit: int, output_tokens: int = 0) -> ContextTooLong:
    """ContextTooLong for a text that cannot fit even at the longest tokens (not tokenized)."""
    error = ContextTooLong(ceil_div(n_chars, MAX_CHARS_PER_TOKEN), limit, output_tokens=output_tokens)
    error.args = (
        f"This model's maximum context length is {limit + output_tokens} tokens. However, your "
        f"prompt contains {n_chars} characters (more than {MAX_CHARS_PER_TOKEN * limit} characters, "
        f"the upper bound for {limit} input tokens with {output_tokens} in the completion). Please "
        "reduce the length of the context or the completion, or open the session with "
        "truncate=True to drop the oldest context.",
    )
    return error


class TextTokenizer:
    """The model's tokenizer, used directly (the engine runs with ``skip_tokenizer_init``)."""

    def __init__(self, model_dir: Path, bos_token_id: int | None) -> None:
        self._tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.bos_token_id = bos_token_id

    def encode_with_ends(self, text: str, bos: bool = True) -> tuple[list[int], list[int]]:
        """Token ids (BOS first) and, for each, the character offset where it ends.

        A long text goes through ``encode_batch``, which gives the same ids and offsets but
        releases the GIL while it works: ``encode`` holds it (0.26 s for 512k characters here), so
        a huge context tokenized in a worker thread still stalled the event loop, and every
        other session with it, for as long."""
        if len(text) > GIL_FREE_CHARS:
            enc = self._tok.encode_batch([text], add_special_tokens=False)[0]
        else:
            enc = self._tok.encode(text, add_special_tokens=False)
        ids, ends = list(enc.ids), [end for _, end in enc.offsets]
        if bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
            ends.insert(0, 0)
        return ids, ends

    def encode(self, text: str) -> list[int]:
        return self.encode_with_ends(text)[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


@dataclass(frozen=True)
class PromptTemplate:
    """Where the question, the context and the answer cue go."""

    prefix: str = "Answer the question using the context. Be brief.\nQuestion: {question}\n\nContext:\n"
    suffix: str = "\n\nAnswer:"

    @classmethod
    def for_chat_turn(cls, turn: tuple[str, str] | None) -> PromptTemplate:
        """A chat model's user turn: context first, then the question, then the model's turn.

        Small chat models tend to echo instructions placed before a long context, so the question
        goes last (it is short, so prefilling it with the final chunk costs little).
        """
        if turn is None:
            return cls()
        return cls(prefix=turn[0], suffix="\n\n{question}" + turn[1])

    def render_prefix(self, question: str) -> str:
        return self.prefix.format(question=question)

    def render_suffix(self, question: str) -> str:
        return self.suffix.format(question=question)


@dataclass(frozen=True)
class PromptIds:
    """The token ids to hand to the engine after one event."""

    ids: list[int]  # committed ids (all of them once final)
    full_len: int  # tokens of the whole prompt, suffix included, if the context ended now


class PromptBuilder:
    """Accumulates one request's context and says which token ids are safe to prefill."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        question: str,
        *,
        template: PromptTemplate | None = None,
        max_prompt_tokens: int | None = None,
        truncate: bool = False,
        holdback_chars: int = HOLDBACK_CHARS,
        output_tokens: int = 0,
    ) -> None:
        template = template or PromptTemplate()
        self._tok = tokenizer
        self.prefix = template.render_prefix(question)
        self.suffix = template.render_suffix(question)
        self.body = ""
        self.max_prompt_tokens = max_prompt_tokens
        self.output_tokens = output_tokens  # reserved for the completion: named in errors
        self.truncate = truncate
        self.holdback_chars = holdback_chars
        self.truncated_chars = 0
        n_chars = len(self.prefix) + len(self.suffix)
        if max_prompt_tokens is not None and n_chars > MAX_CHARS_PER_TOKEN * max_prompt_tokens:
            raise clearly_too_long(n_chars, max_prompt_tokens, output_tokens)  # before tokenizing it
        self._suffix_len = len(tokenizer.encode_with_ends(self.suffix, bos=False)[0])
        self._last: tuple[str, list[int], list[int]] | None = None  # text, ids, ends at the last call

    def append(self, text: str) -> None:
        self.body += text

    def replace(self, docs: str | Sequence[str]) -> None:
        self.body = docs if isinstance(docs, str) else DOC_SEPARATOR.join(docs)

    def text(self, final: bool = True) -> str:
        return self.prefix + self.body + (self.suffix if final else "")

    def ids(self, final: bool) -> PromptIds:
        """Committed ids for the context so far; everything when ``final``.

        Raises ContextTooLong (naming size and limit) unless ``truncate`` drops the oldest context.
        """
        self._bound_size()
        if final or self.truncate:
            ids, ends = self._fit()
            if final:
                self._last = None
                return PromptIds(ids, len(ids))
        else:
            ids, ends = self._encode_incrementally()
        stable_end = len(self.prefix) + len(self.body) - self.holdback_chars
        n = max(bisect.bisect_right(ends, stable_end), 1)
        self._last = (self.prefix + self.body, ids, ends)
        return PromptIds(ids[:n], len(ids))

    def _bound_size(self) -> None:
        """Reject (or, with ``truncate``, cut the head of) a context whose text alone is clearly too
        long for the window, before tokenizing it: tokenizing megabytes takes seconds."""
        limit = self.max_prompt_tokens
        if limit is None:
            return
        excess = len(self.prefix) + len(self.body) + len(self.suffix) - MAX_CHARS_PER_TOKEN * limit
        if excess <= 0:
            return
        if self.truncate and excess <= len(self.body):
            self.body = self.body[excess:]
            self.truncated_chars += excess
            return
        n_chars = len(self.prefix) + len(self.body) + len(self.suffix)
        raise clearly_too_long(n_chars, limit, self.output_tokens)

    def _encode_incrementally(self) -> tuple[list[int], list[int]]:
        """Tokens of prefix + body, re-tokenizing only after the last committed token when the body
        grew by appending (the final call always tokenizes everything, so this is only a saving)."""
        text = self.prefix + self.body
        last = self._last
        if last is None or not text.startswith(last[0]):
            ids, ends = self._tok.encode_with_ends(text)
        else:
            old_text, old_ids, old_ends = last
            keep = max(bisect.bisect_right(old_ends, len(old_text) - self.holdback_chars), 1)
            restart = old_ends[keep - 1]
            tail_ids, tail_ends = self._tok.encode_with_ends(text[restart:], bos=False)
            ids = old_ids[:keep] + tail_ids
            ends = old_ends[:keep] + [restart + e for e in tail_ends]
        size = len(ids) + self._suffix_len
        if self.max_prompt_tokens is not None and size > self.max_prompt_tokens:
            raise ContextTooLong(size, self.max_prompt_tokens, output_tokens=self.output_tokens)
        return ids, ends

    def _fit(self) -> tuple[list[int], list[int]]:
        ids, ends = self._tok.encode_with_ends(self.text(final=True))
        limit = self.max_prompt_tokens
        while limit is not None and len(ids) > limit:
            if not self.truncate or not self.body:
                raise ContextTooLong(len(ids), limit, output_tokens=self.output_tokens)
            self._drop_oldest(ids, ends, len(ids) - limit)
            ids, ends = self._tok.encode_with_ends(self.text(final=True))
        return ids, ends

    def _drop_oldest(self, ids: list[int], ends: list[int], excess: int) -> None:
        """Cut the head of the body by about ``excess`` tokens (plus one for the merge at the cut)."""
        first_body = bisect.bisect_right(ends, len(self.prefix))
        cut_token = min(first_body + excess, len(ids) - 1)
        cut_char = max(ends[cut_token] - len(self.prefix), 1)
        cut_char = min(cut_char, len(self.body))
        self.body = self.body[cut_char:]
        self.truncated_chars += cut_char
