"""Handing a session's chunks to vLLM: one streaming request, fed one chunk at a time.

The token diff of what was sent and what the context now tokenizes to says what each chunk is:
new tokens after everything sent are an append (whatever changed the context); anything else (an
update, or an append whose tokens do not extend what was sent: a BPE merge reaching back) is an
update that carries the whole new prompt, and the engine core keeps KV up to the longest common
prefix. Stock ``vllm`` mode aborts the request on an update and submits the whole prompt again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, NamedTuple

from stream2llm.context.events import Op
from stream2llm.core.protocol import ChunkMeta
from stream2llm.engine.config import Mode
from stream2llm.engine.host import SessionHost
from stream2llm.engine.outputs import ChunkTiming
from stream2llm.engine.sampling import chunk_params


class Chunk(NamedTuple):
    """Token ids for the engine: the new tail (append) or the whole prompt (update)."""

    op: Op
    ids: list[int]
    final: bool


def chunk_op(sent: Sequence[int], target: Sequence[int], final: bool) -> Op | None:
    """The op of the chunk that takes the engine from ``sent`` to ``target`` (None: nothing to send).

    Tokens that extend what was sent are an append even when an update produced them (the engine
    keeps all it holds); tokens that do not are an update, even when an append produced them."""
    if len(target) > len(sent) and target[: len(sent)] == sent:
        return Op.APPEND
    if list(target) == list(sent) and not final:
        return None  # nothing new is safe to prefill yet
    return Op.UPDATE


def merge_chunks(held: Chunk | None, new: Chunk) -> Chunk:
    """One chunk with the effect of two: an update carries the whole new prompt, so it replaces
    whatever was held; an append extends what was held (an update's prompt or an append's tail)."""
    if held is None or new.op is Op.UPDATE:
        return new
    return Chunk(held.op, held.ids + new.ids, new.final)


def tokens_prompt(ids: Sequence[int], cache_salt: str | None) -> dict[str, Any]:
    """vLLM's prompt for token ids (a copy: vLLM extends lists in place)."""
    prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    return prompt


async def _input_stream(queue: asyncio.Queue) -> AsyncIterator[Any]:
    while (item := await queue.get()) is not None:
        yield item


async def _wait_for(task: asyncio.Task) -> None:
    await asyncio.shield(task)


class Handover:
    """One session's vLLM request: its input queue, the chunk in flight, held chunks, the runner.

    The runner reports each output to ``on_tokens(out, n_throwaway, now)`` once the final chunk
    is sent, then ``on_end()``, or ``on_error(exc)`` when the engine fails the request."""

    def __init__(
        self,
        host: SessionHost,
        request_id: str,
        mode: Mode,
        sampling: Any,
        *,
        cache_salt: str | None,
        on_tokens: Callable[[Any, int, float], None],
        on_end: Callable[[], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        self._host, self._request_id, self._mode = host, request_id, mode
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
        self._chunks_done = 0  # chunks of the current vLLM request whose prefill has finished
        self._held: Chunk | None = None  # waits for the chunk in flight
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
            if op is Op.APPEND:
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
        """Hand a chunk to the engine, or hold it while the previous one is still in flight.

        vLLM takes one queued chunk per round (prefill, sample, park, resume), and its scheduler
        only sees the chunk at the head: a backlog of k chunks costs k rounds and hides the final
        one (and so the session's place in the ranking). Held chunks are merged and sent as one
        as soon as the chunk in flight is done; the final chunk goes at once (merged with what was
        held), so the scheduler learns that the stream is complete. An update may queue behind
        the chunk in flight: it replaces that chunk's context, so the engine core ends the chunk
        early instead of prefilling what is about to be thrown away. Stock ``vllm`` mode keeps
        vLLM's behaviour."""
        chunk = merge_chunks(self._held, chunk)
        self._held = None
        if self._mode == "stream" and not chunk.final and not self._may_send(chunk.op):
            self._held = chunk
            return
        self._hand_over(chunk)

    def _may_send(self, op: Op) -> bool:
        """An update may wait in vLLM behind the chunk in flight; anything else waits here."""
        outstanding = len(self.chunks) - self._chunks_before - self._chunks_done
        return outstanding < (2 if op is Op.UPDATE else 1)

    def _release_held(self) -> None:
        if self._held is not None and self._may_send(self._held.op):
            chunk, self._held = self._held, None
            self._hand_over(chunk)

    def _hand_over(self, chunk: Chunk) -> None:
        from vllm.engine.protocol import StreamingInput

        prompt = tokens_prompt(chunk.ids, self._cache_salt)
        params = chunk_params(self._sampling, ChunkMeta(chunk.op, chunk.final, self._host.policy()))
        self._inputs.put_nowait(StreamingInput(prompt, params))
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
        self._chunks_done, self._held = 0, None
        self._put(Chunk(Op.APPEND, ids, final))
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

    async def _run(self, prompt: Any, internal_id: str) -> None:
        final_sampling = chunk_params(self._sampling, ChunkMeta(Op.APPEND, True, self._host.policy()))
        try:
            async for out in self._host.generate(prompt, final_sampling, request_id=internal_id):
                now = time.monotonic()
                n_throwaway = self._account(out, now)
                if n_throwaway is not None:
                    self._on_tokens(out, n_throwaway, now)
            self._on_end()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine failed this request; others go on
            self._on_error(exc)

    def _account(self, out: Any, now: float) -> int | None:
        """Mark the chunks whose prefill finished (one output token each) and send what was held.
        Returns how many of the output's tokens are throw-away, or None before the final chunk."""
        n_ids = len(out.outputs[0].token_ids)
        current = self.chunks[self._chunks_before :]
        n_throwaway = len(current) - 1 if self._final_sent else None
        for i, chunk in enumerate(current):
            if i < n_ids and chunk.done is None:
                chunk.done = now
        if n_throwaway is None:
            self._chunks_done = max(self._chunks_done, min(n_ids, len(current)))
            self._release_held()
        return n_throwaway

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

    def drop(self) -> None:
        """The engine is gone: cancel the runner, abort nothing."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
