"""Handing a session's chunks to vLLM: one streaming request, fed one chunk at a time.

This is the only place where prompt ids become chunks and the engine's outputs become the answer's
tokens. The token diff of what was sent and what the context now tokenizes to says what each chunk
is (the one append-or-update decision of the front end): new tokens after everything sent are an
append (whatever changed the context); anything else (an update, or an append whose tokens do not
extend what was sent: a BPE merge reaching back) is an update that carries the whole new prompt,
and the engine core keeps KV up to the longest common prefix. Stock ``vllm`` mode aborts the
request on an update and submits the whole prompt again. Every chunk but the one that answers
ends with a throw-away token (``core.protocol.throwaway_tokens``: sampled, or a placeholder where
a later chunk took it over in the engine core); the final chunk samples the answer (or, with a
decode instance, its first token) and the decode backend says who answers the rest
(``engine.decode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from stream2llm.core.protocol import (
    CONFIG_KEY,
    KV_PARAMS_KEY,
    THROWAWAY_TOKENS_PER_CHUNK,
    ChunkMeta,
    ChunkOp,
    split_transfer_params,
    throwaway_tokens,
)
from stream2llm.engine.config import Mode
from stream2llm.engine.decode import FinalPrompt
from stream2llm.engine.host import SessionHost
from stream2llm.engine.outputs import ChunkTiming, Generated


class Chunk(NamedTuple):
    """Token ids for the engine: the new tail (append) or the whole prompt (update)."""

    op: ChunkOp
    ids: list[int]
    final: bool


def chunk_op(sent: Sequence[int], target: Sequence[int], final: bool) -> ChunkOp | None:
    """The op of the chunk that takes the engine from ``sent`` to ``target`` (None: nothing to send).

    Tokens that extend what was sent are an append even when an update produced them (the engine
    keeps all it holds); tokens that do not are an update, even when an append produced them."""
    if len(target) > len(sent) and target[: len(sent)] == sent:
        return ChunkOp.APPEND
    if list(target) == list(sent) and not final:
        return None  # nothing new is safe to prefill yet
    return ChunkOp.UPDATE


def chunk_params(final_sampling: Any, meta: ChunkMeta) -> Any:
    """One chunk's sampling parameters. vLLM has no prefill-only request, so an intermediate chunk
    samples one throw-away token (cumulative output, so the session can count them); the final
    chunk samples with the caller's parameters. The chunk's metadata rides in ``extra_args``."""
    import vllm

    # an intermediate chunk asks for the final chunk's logprobs too: vLLM sizes a streaming
    # request's logprob lists from its first chunk, and the front end drops the throw-away ones
    logprobs = final_sampling.logprobs
    base = (
        final_sampling
        if meta.final
        else vllm.SamplingParams(temperature=0, max_tokens=THROWAWAY_TOKENS_PER_CHUNK, logprobs=logprobs)
    )
    params = base.clone()
    params.extra_args = {**(params.extra_args or {}), **meta.as_extra_args()}
    if not meta.final:
        params.output_kind = vllm.sampling_params.RequestOutputKind.CUMULATIVE
    return params


def tokens_prompt(ids: Sequence[int], cache_salt: str | None) -> dict[str, Any]:
    """vLLM's prompt for token ids (a copy: vLLM extends lists in place)."""
    prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    return prompt


def _answer_logprobs(logprobs: Any, answer_tokens: int) -> list[dict[int, float]] | None:
    """The answer's logprobs: the last ``answer_tokens`` entries (a chunk another took over ends
    with a placeholder token that has none)."""
    if logprobs is None:
        return None
    return [{t: lp.logprob for t, lp in d.items()} for d in logprobs[len(logprobs) - answer_tokens :]]


def _joined(first: list[dict[int, float]] | None, rest: list[dict[int, float]] | None) -> Any:
    """The first token's logprobs and the decode instance's, as one answer's (None if not asked)."""
    return None if first is None or rest is None else first + rest


async def _input_stream(queue: asyncio.Queue) -> AsyncIterator[Any]:
    while (item := await queue.get()) is not None:
        yield item


async def _wait_for(task: asyncio.Task) -> None:
    await asyncio.shield(task)


def _ended(*_: Any) -> None:
    """What an ended session's callbacks become: it takes no more tokens, outcomes or errors."""


class Handover:
    """One session's vLLM request: its input queue, the chunks sent and their timings, the runner.

    The runner reports the answer so far to ``on_tokens(generated, now)``, then ``on_end()``, or
    ``on_error(exc)`` when the engine (or the decode instance) fails the request."""

    def __init__(
        self,
        host: SessionHost,
        request_id: str,
        mode: Mode,
        sampling: Any,
        *,
        cache_salt: str | None,
        on_tokens: Callable[[Generated, float], None],
        on_end: Callable[[], None],
        on_error: Callable[[Exception], None],
        decode_trace: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self._host, self._request_id, self._mode = host, request_id, mode
        self._decode_trace = decode_trace  # starts the decode call's span; its traceparent
        self._decode = host.decode
        self._sampling, self._cache_salt = sampling, cache_salt
        self._on_tokens, self._on_end, self._on_error = on_tokens, on_end, on_error
        self.sent: list[int] = []  # the prompt the engine holds (or will, once queued chunks run)
        self.chunks: list[ChunkTiming] = []
        self._inputs: asyncio.Queue[Any] = asyncio.Queue()
        self._runner: asyncio.Task | None = None
        self._stopping: asyncio.Task | None = None
        self._aborts: set[asyncio.Task] = set()  # aborts of superseded requests (vllm mode), kept alive
        self._attempt = 0
        self._internal_id: str | None = None  # vLLM's request id (changes when vllm mode resubmits)
        self._chunks_before = 0  # chunks sent before the current vLLM request started
        self._final_sent = False

    # -- sending -------------------------------------------------------------------------------

    def send(self, target: list[int], final: bool) -> None:
        """Take the engine from what was sent to ``target`` (stream and vllm modes)."""
        if not self.sent:
            self._launch_stream(target, final)
        else:
            op = chunk_op(self.sent, target, final)
            if op is None:
                return
            if op is ChunkOp.APPEND:
                self._put(Chunk(op, target[len(self.sent) :], final))
            elif self._mode == "vllm":
                self._restart(target, final)
            else:
                self._put(Chunk(op, list(target), final))
        self.sent = list(target)

    def send_whole(self, ids: list[int]) -> None:
        """The whole prompt as one plain request (nonstream mode, once the context is final)."""
        internal_id = self._next_request()
        self.chunks.append(ChunkTiming(sent=time.monotonic(), tokens=len(ids)))
        self._chunks_before = len(self.chunks) - 1
        self._final_sent = True
        self.sent = list(ids)
        self._start_runner(tokens_prompt(ids, self._cache_salt), internal_id)

    def _put(self, chunk: Chunk) -> None:
        """Hand a chunk to the engine at once. In stream mode the engine core applies a chunk that
        queues behind the one in work in place of it (an update replaces it, an append extends
        it; ``core.updates``), so nothing waits here for a round trip; stock ``vllm`` mode's
        chunks wait in vLLM's queue, one round each, as vLLM does."""
        self._hand_over(chunk)

    def _hand_over(self, chunk: Chunk) -> None:
        from vllm.engine.protocol import StreamingInput

        prompt = tokens_prompt(chunk.ids, self._cache_salt)
        self._inputs.put_nowait(StreamingInput(prompt, self._chunk_sampling(chunk.op, chunk.final)))
        self.chunks.append(ChunkTiming(sent=time.monotonic(), tokens=len(chunk.ids)))
        if chunk.final:
            self._final_sent = True
            self._inputs.put_nowait(None)

    # -- the vLLM request ----------------------------------------------------------------------

    def _next_request(self) -> str:
        self._attempt += 1
        self._internal_id = self._request_id if self._attempt == 1 else f"{self._request_id}#{self._attempt}"
        return self._internal_id

    def _launch_stream(self, ids: list[int], final: bool) -> None:
        internal_id = self._next_request()
        self._inputs = asyncio.Queue()
        self._chunks_before = len(self.chunks)
        self._put(Chunk(ChunkOp.APPEND, ids, final))
        self.sent = list(ids)
        self._start_runner(_input_stream(self._inputs), internal_id)

    def _restart(self, target: list[int], final: bool) -> None:
        """vllm mode's update: abort the request and submit the whole new prompt."""
        old_runner, old_id = self._runner, self._internal_id
        self._runner = None
        if old_runner is not None:
            old_runner.cancel()
        abort = asyncio.get_running_loop().create_task(self._host.abort(old_id))  # type: ignore[arg-type]
        self._aborts.add(abort)
        abort.add_done_callback(self._aborts.discard)
        self._launch_stream(target, final)

    def _start_runner(self, prompt: Any, internal_id: str) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(prompt, internal_id))

    def _chunk_sampling(self, op: ChunkOp, final: bool) -> Any:
        meta = ChunkMeta(op, final, *self._host.policy(), in_place=self._mode == "stream")
        return self._decode.chunk_sampling(chunk_params(self._sampling, meta), meta)

    async def _run(self, prompt: Any, internal_id: str) -> None:
        final_sampling = self._chunk_sampling(ChunkOp.APPEND, True)
        last, answer = None, None
        try:
            async for out in self._host.generate(prompt, final_sampling, request_id=internal_id):
                now = time.monotonic()
                if (generated := self._account(out, now)) is not None:
                    self._on_tokens(generated, now)
                    answer = generated
                last = out
            if answer is not None and answer.finish_reason is None and last is not None and last.finished:
                await self._decode_remotely(last, answer)  # the first token did not end the answer
            self._on_end()
            self._detach()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine failed this request; others go on
            self._on_error(exc)
            self._detach()

    def _detach(self) -> None:
        """The session has its outcome: drop the callbacks into it, so that an ended session and
        its hand-over are no reference cycle (only a full garbage collection, which pauses every
        session, would free them)."""
        self._on_tokens = self._on_end = self._on_error = _ended
        self._decode_trace = None

    def _account(self, out: Any, now: float) -> Generated | None:
        """Mark the chunks whose prefill finished or that a later chunk took over (one output
        token each). Returns the answer so far once the final chunk is sent (None before, or while the output
        holds throw-away tokens only)."""
        completion = out.outputs[0]
        n_ids = len(completion.token_ids)
        current = self.chunks[self._chunks_before :]
        for i, chunk in enumerate(current):
            if i < n_ids and chunk.done is None:
                chunk.done = now
        if not self._final_sent:
            return None
        skip = throwaway_tokens(len(current))
        if n_ids <= skip:
            return None
        finish = completion.finish_reason
        if finish is not None and not self._decode.ends_here(finish, self._sampling):
            finish = None  # a decode instance goes on from this first token
        return Generated(
            list(completion.token_ids)[skip:],
            _answer_logprobs(completion.logprobs, n_ids - skip),
            finish,
            split_transfer_params(out.kv_transfer_params)[0].get(CONFIG_KEY),
        )

    async def _decode_remotely(self, prefilled: Any, first: Generated) -> None:
        """Another instance answers the rest: hand it the prompt prefilled here and the first
        token sampled here (``RemoteDecode.decode``), with the KV connector's parameters; the
        engine core's counters and the KV moved go with its last output."""
        ours, foreign = split_transfer_params(prefilled.kv_transfer_params)
        counters, moved = dict(ours.get(CONFIG_KEY) or {}), dict(ours.get(KV_PARAMS_KEY) or {})
        trace = self._decode_trace() if self._decode_trace is not None else {}
        prompt = FinalPrompt(list(self.sent), self._cache_salt, foreign, trace)
        async for rest in self._decode.decode(prompt, self._sampling, first.token_ids[0]):
            generated = Generated(
                first.token_ids + rest.token_ids,
                _joined(first.logprobs, rest.logprobs),
                rest.finish_reason,
                rest.counters,
            )
            if generated.finish_reason is not None:  # the decode instance's own counts come last
                moved.update((generated.counters or {}).get("kv_transfer") or {})
                generated = replace(generated, counters={**counters, "kv_transfer": moved})
            self._on_tokens(generated, time.monotonic())

    def stop(self) -> Coroutine[Any, Any, None]:
        """Cancel the runner and abort the vLLM request (its KV is freed). Idempotent and
        cancellation-safe: the first call starts the stop at once (not at the caller's first
        step), every call's coroutine waits for it, and a cancelled caller leaves it running."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
        return _wait_for(self._stopping)

    async def _stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        if self._internal_id is not None and self._host.engine_died() is None:
            await self._host.abort(self._internal_id)
        self._detach()

    def drop(self) -> None:
        """The engine is gone: cancel the runner, abort nothing."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
        self._detach()
