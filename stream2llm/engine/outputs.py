"""A session's outputs: the generated text as it comes, the result, and the engine core's counters.

Handover turns the engine's outputs into ``Generated`` (the answer's tokens only: the throw-away
tokens of intermediate chunks never get here). Text is pushed as deltas, holding back an
incomplete UTF-8 character until the next token completes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from stream2llm.context.prompt import TextTokenizer
from stream2llm.errors import StreamError


@dataclass(frozen=True)
class Generated:
    """The answer so far (cumulative), whoever generated it: the real tokens, their top logprobs
    (when asked for), why generation ended (with the last one) and the engine core's counters."""

    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    counters: dict[str, Any] | None = None


@dataclass
class ChunkTiming:
    """When a chunk was handed to the engine and when its prefill was seen finished."""

    sent: float
    done: float | None = None
    tokens: int = 0


@dataclass
class SessionResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    ttft_final_s: float  # from the hand-off of the final chunk to the first generated token
    ttft_open_s: float  # from open() to the first generated token
    tokens_prefilled: int  # prompt tokens the engine computed for this session
    tokens_recomputed: int  # of those, computed again: past what an update kept, or after an eviction
    tokens_discarded: int  # computed KV that updates threw away (the cost over a one-shot prefill)
    updates: list[dict[str, int]]
    chunks: list[ChunkTiming]
    finish_reason: str | None
    mode: str
    # monotonic clock, shared with the engine's step log: the final event, its hand-off to vLLM
    # (after the whole prompt was tokenized), the first generated token
    final_event_at: float | None = None
    tokens_loaded: int = 0  # brought back from the KV tier after an eviction instead of recomputed
    final_handoff_at: float | None = None
    first_token_at: float | None = None
    # the prompt the engine core computed (what the answer attended to), not what was sent: its
    # length and token_digest (core.protocol), from the core's counters
    computed_prompt_len: int = 0
    computed_prompt_digest: str | None = None
    # per generated token, {token id: logprob} of the top ``sampling.logprobs`` (None if not asked)
    logprobs: list[dict[int, float]] | None = None
    # disaggregated (engine.remote_decode): blocks the prefill instance saved (in all, after the
    # final chunk), their size, and the decode instance's prompt tokens, cached and computed
    kv_transfer: dict[str, int] | None = None
    prefill_steps: list[float] = field(default_factory=list)  # when its prefill steps started


class SessionOutput:
    """The caller's side of one session: text deltas, then the result (or the error that ended it)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []  # generated so far, throw-away tokens excluded
        self.logprobs: list[dict[int, float]] | None = None
        self.first_token_at: float | None = None
        self._finish_reason: str | None = None
        self._counters: dict[str, Any] = {}
        self._emitted_chars = 0
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()
        self._done: asyncio.Future[SessionResult] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self._done.done()

    def on_output(self, generated: Generated, now: float) -> None:
        """Take the answer so far (``now``: when it arrived)."""
        if not generated.token_ids:
            return
        if self.first_token_at is None:
            self.first_token_at = now
        self._emit(list(generated.token_ids))
        if generated.logprobs is not None:
            self.logprobs = generated.logprobs
        if generated.finish_reason is not None:
            self._finish_reason = generated.finish_reason
        if generated.counters is not None:
            self._counters = generated.counters

    def _emit(self, real: list[int]) -> None:
        """Push the new part of the decoded text (holding back an incomplete UTF-8 character)."""
        self.token_ids = real
        text = self._tokenizer.decode(real)
        if not text.endswith("\ufffd"):
            self._push_text(text)

    def _push_text(self, text: str) -> None:
        if len(text) > self._emitted_chars:
            self._deltas.put_nowait(text[self._emitted_chars :])
            self._emitted_chars = len(text)

    def complete(
        self,
        *,
        prompt_ids: list[int],
        chunks: list[ChunkTiming],
        mode: str,
        opened_at: float,
        final_event_at: float | None,
    ) -> SessionResult:
        """Generation ended: push the rest of the text and settle the result (returned)."""
        text = self._tokenizer.decode(self.token_ids)
        self._push_text(text)
        self._deltas.put_nowait(None)
        t_first = self.first_token_at if self.first_token_at is not None else time.monotonic()
        counters = self._counters
        result = SessionResult(
            text=text,
            token_ids=list(self.token_ids),
            prompt_token_ids=list(prompt_ids),
            ttft_final_s=t_first - (final_event_at or t_first),
            ttft_open_s=t_first - opened_at,
            tokens_prefilled=int(counters.get("tokens_prefilled", 0)),
            tokens_recomputed=int(counters.get("tokens_recomputed", 0)),
            tokens_discarded=int(counters.get("tokens_discarded", 0)),
            tokens_loaded=int(counters.get("tokens_loaded", 0)),
            updates=list(counters.get("updates", [])),
            chunks=list(chunks),
            finish_reason=self._finish_reason,
            mode=mode,
            final_event_at=final_event_at,
            final_handoff_at=chunks[-1].sent if final_event_at and chunks else None,
            first_token_at=self.first_token_at,
            computed_prompt_len=int(counters.get("computed_prompt_len", 0)),
            computed_prompt_digest=counters.get("computed_prompt_digest"),
            logprobs=self.logprobs,
            kv_transfer=counters.get("kv_transfer"),
            prefill_steps=list(counters.get("prefill_steps", [])),
        )
        self._done.set_result(result)
        return result

    def fail(self, error: StreamError, *, expected: bool = False) -> None:
        """End the stream with ``error``; ``expected`` (an abort, an expiry) is no unhandled error."""
        self._deltas.put_nowait(None)
        if not self._done.done():
            self._done.set_exception(error)
            if expected:
                self._done.exception()  # mark retrieved

    async def stream(self) -> AsyncIterator[str]:
        """The text deltas; a session that ended with an error (engine death, abort) raises it
        after the last delta, so a reader never mistakes a cut-off answer for a whole one."""
        while True:
            delta = await self._deltas.get()
            if delta is None:
                break
            yield delta
        if self._done.done() and (error := self._done.exception()) is not None:
            raise error

    async def result(self) -> SessionResult:
        return await asyncio.shield(self._done)
