"""StreamingEngine and Session: streamed context in, generated tokens out, over vLLM's AsyncLLM.

A Session is one request whose context arrives in pieces. Modes, all on the same engine:

- ``stream`` (default): each piece is prefilled on arrival through vLLM's streaming-input sessions.
  Intermediate chunks carry ``max_tokens=1`` (vLLM has no prefill-only request); their throw-away
  tokens never reach the caller. ``update`` replaces the context: the chunk carries the whole new
  prompt and the scheduler keeps KV up to the token-exact longest common prefix.
- ``vllm``: stock behaviour for comparison: appends as above, an update aborts the request and
  resubmits the whole prompt (vLLM's prefix cache reuses whole cached blocks).
- ``nonstream``: nothing is sent before ``finish()``; then the whole prompt at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from stream2llm.context.events import ContextEvent, Op
from stream2llm.context.prompt import PromptBuilder, PromptTemplate, TextTokenizer
from stream2llm.core.policies import POLICIES
from stream2llm.core.protocol import CONFIG_KEY, ChunkMeta
from stream2llm.core.stats_board import EngineStats, StatsBoard
from stream2llm.engine import models
from stream2llm.errors import (
    AdmissionRejected,
    InvalidEvent,
    SequenceError,
    SessionClosed,
    SessionExpired,
    StreamError,
    UnknownSession,
)

Mode = Literal["stream", "vllm", "nonstream"]
MODES: tuple[str, ...] = ("stream", "vllm", "nonstream")
SCHEDULER_CLS = "stream2llm.core.scheduler.StreamScheduler"


def _vllm() -> Any:
    """vLLM's public API, imported lazily: `import vllm` costs seconds and most callers need none of it."""
    import vllm

    return vllm


@dataclass
class EngineConfig:
    """How to start the engine. Sizes are explicit: vLLM on CPU refuses to guess the KV cache."""

    model: str = models.DEFAULT_MODEL
    policy: str = "stream2llm"
    max_model_len: int = 4096
    kv_cache_bytes: int = 1 << 30
    block_size: int | None = None  # vLLM's default: 128 tokens on CPU
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_sessions: int = 1024  # open sessions admitted at once
    session_ttl_s: float | None = 600.0  # abort a session whose next event does not come in time
    parked_kv_cap: float = 1.0  # fraction of KV blocks parked sessions may hold before eviction
    step_log: str | None = None  # a file the engine core appends one JSON line per step to
    dtype: str = "bfloat16"
    seed: int = 0
    fast_start: bool = False  # fork the engine processes (~4 s start; slower steps; tests only)
    engine_args: dict[str, Any] = field(default_factory=dict)  # passed to vLLM's AsyncEngineArgs


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
    tokens_recomputed: int  # of those, prefilled after an update, past what it kept
    tokens_discarded: int  # computed KV that updates threw away (the cost over a one-shot prefill)
    updates: list[dict[str, int]]
    chunks: list[ChunkTiming]
    finish_reason: str | None
    mode: str
    # monotonic clock, shared with the engine's step log: the final event, its hand-off to vLLM
    # (after the whole prompt was tokenized), the first generated token
    final_event_at: float | None = None
    final_handoff_at: float | None = None
    first_token_at: float | None = None


class StreamingEngine:
    """One vLLM engine shared by many streaming sessions."""

    def __init__(self, config: EngineConfig, llm: Any, model: models.ModelInfo, board: StatsBoard) -> None:
        self.config = config
        self.model = model
        self.tokenizer = TextTokenizer(model.path, model.bos_token_id)
        self.template = PromptTemplate.for_chat_turn(model.chat_turn)
        self._llm = llm
        self._board = board
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count()
        self._reaper: asyncio.Task | None = None

    @classmethod
    async def start(cls, config: EngineConfig | None = None) -> StreamingEngine:
        config = config or EngineConfig()
        model = await asyncio.to_thread(models.resolve, config.model)
        fd, board_path = tempfile.mkstemp(prefix="stream2llm-stats-")
        os.close(fd)
        board = StatsBoard(board_path, create=True)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from stream2llm.core import vllm_compat

        llm = vllm_compat.start_async_llm(_engine_args(config, model, board_path), fork=config.fast_start)
        return cls(config, llm, model, board)

    # -- sessions -----------------------------------------------------------------------------

    async def open(
        self,
        question: str,
        sampling: Any = None,
        *,
        mode: Mode = "stream",
        request_id: str | None = None,
        truncate: bool = False,
        template: PromptTemplate | None = None,
        cache_salt: str | None = None,
        policy: str | None = None,
    ) -> Session:
        """Open a session; in ``stream`` mode the instructions and question start prefilling now.

        ``cache_salt`` isolates the session's prefix-cache entries (per tenant, or for references
        that must not reuse another request's KV). ``policy`` names the scheduling policy the
        engine should apply while this session runs (default: the engine's)."""
        if mode not in MODES:
            raise StreamError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if policy is not None and policy not in POLICIES:
            raise StreamError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
        if len(self._sessions) >= self.config.max_sessions:
            raise AdmissionRejected(
                f"engine has {len(self._sessions)} open sessions (max_sessions={self.config.max_sessions})"
            )
        request_id = request_id or f"s2l-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if request_id in self._sessions:
            raise StreamError(f"a session with id {request_id!r} is already open")
        sampling = sampling if sampling is not None else _vllm().SamplingParams(temperature=0, max_tokens=64)
        _check_sampling(sampling)
        sampling = self.with_eos_stop(sampling)
        max_prompt = self.config.max_model_len - (sampling.max_tokens or 0)
        builder = PromptBuilder(
            self.tokenizer,
            question,
            template=template or self.template,
            max_prompt_tokens=max_prompt,
            truncate=truncate,
        )
        session = Session(self, request_id, builder, sampling, mode, cache_salt, policy or self.config.policy)
        self._sessions[request_id] = session
        self._ensure_reaper()
        try:
            await session._start()
        except BaseException:
            self._sessions.pop(request_id, None)  # a session that failed to open holds no slot
            raise
        return session

    def with_eos_stop(self, sampling: Any) -> Any:
        """vLLM runs without its tokenizer here, so it does not know the end-of-sequence token:
        name it (unless ``ignore_eos``), or generation only stops at ``max_tokens``."""
        eos = [t for t in self.model.eos_token_ids if t not in (sampling.stop_token_ids or ())]
        if sampling.ignore_eos or not eos:
            return sampling
        sampling = sampling.clone()
        sampling.stop_token_ids = [*(sampling.stop_token_ids or ()), *eos]
        return sampling

    def _ensure_reaper(self) -> None:
        if self.config.session_ttl_s and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.get_running_loop().create_task(self._reap_expired())

    async def _reap_expired(self) -> None:
        """Abort sessions whose next event never came: a stalled retriever must not hold KV forever."""
        while self._sessions and self.config.session_ttl_s:
            ttl = self.config.session_ttl_s
            await asyncio.sleep(min(ttl / 4, 1.0))
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if session.is_open and now - session.last_activity > ttl:
                    await session._expire(ttl)

    def session(self, request_id: str) -> Session:
        """The open session with this id (UnknownSession otherwise)."""
        try:
            return self._sessions[request_id]
        except KeyError:
            raise UnknownSession(f"no open session with id {request_id!r}") from None

    def open_sessions(self) -> list[Session]:
        """The sessions that are neither finished nor aborted yet."""
        return list(self._sessions.values())

    def _closed(self, session: Session) -> None:
        self._sessions.pop(session.request_id, None)

    def stats(self) -> EngineStats:
        return self._board.read()

    async def complete(
        self, prompt_ids: Sequence[int], sampling: Any, *, use_prefix_cache: bool = True
    ) -> list[int]:
        """One plain request on given token ids (the one-shot reference)."""
        request_id = f"s2l-oneshot-{uuid.uuid4().hex[:12]}"
        sampling = self.with_eos_stop(sampling)
        prompt = _tokens_prompt(prompt_ids, None if use_prefix_cache else uuid.uuid4().hex)
        final = None
        async for out in self._llm.generate(prompt, sampling, request_id=request_id):
            final = out
        return list(final.outputs[0].token_ids) if final is not None else []

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for session in list(self._sessions.values()):
            with contextlib.suppress(Exception):
                await session.abort()
        self._llm.shutdown()
        self._board.close()
        with contextlib.suppress(OSError):
            os.unlink(self._board.path)

    async def __aenter__(self) -> StreamingEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


def _engine_args(config: EngineConfig, model: models.ModelInfo, board_path: str) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = {
        "model": str(model.path),
        "skip_tokenizer_init": True,  # stream2llm tokenizes: token-exact chunking needs it anyway
        "enforce_eager": True,  # torch.compile adds ~40 s to start-up on CPU
        "enable_prefix_caching": True,
        "dtype": config.dtype,
        "seed": config.seed,
        "max_model_len": config.max_model_len,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_num_seqs": config.max_num_seqs,
        "kv_cache_memory_bytes": config.kv_cache_bytes,
        "scheduler_cls": SCHEDULER_CLS,
        "additional_config": {
            CONFIG_KEY: {
                "policy": config.policy,
                "stats_path": board_path,
                "parked_kv_cap": config.parked_kv_cap,
                "step_log": config.step_log,
            }
        },
        "disable_log_stats": True,
        **model.engine_overrides,
        **config.engine_args,
    }
    if config.block_size is not None:
        kwargs["block_size"] = config.block_size
    return AsyncEngineArgs(**kwargs)


def merge_chunks(
    held: tuple[str, list[int], bool] | None, new: tuple[str, list[int], bool]
) -> tuple[str, list[int], bool]:
    """One chunk with the effect of two: an update carries the whole new prompt, so it replaces
    whatever was held; an append extends what was held (an update's prompt or an append's tail)."""
    if held is None:
        return new
    op, ids, _ = held
    new_op, new_ids, final = new
    if new_op == "update":
        return new
    return op, ids + new_ids, final


def _tokens_prompt(ids: Sequence[int], cache_salt: str | None) -> dict[str, Any]:
    prompt: dict[str, Any] = {"prompt_token_ids": list(ids)}  # a copy: vLLM extends lists in place
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    return prompt


def _check_sampling(sampling: Any) -> None:
    """Reject what vLLM's streaming sessions cannot do, before anything reaches the engine."""
    if getattr(sampling, "n", 1) != 1:
        raise StreamError("streamed sessions support n=1 only")
    if getattr(sampling, "stop", None):
        raise StreamError("streamed sessions do not support stop strings; use stop_token_ids")
    if not sampling.max_tokens or sampling.max_tokens < 1:
        raise StreamError("sampling.max_tokens must be at least 1")


class Session:
    """One request whose context arrives in pieces. Create it with ``StreamingEngine.open``."""

    def __init__(
        self,
        engine: StreamingEngine,
        request_id: str,
        builder: PromptBuilder,
        sampling: Any,
        mode: Mode,
        cache_salt: str | None = None,
        policy: str | None = None,
    ) -> None:
        self.engine = engine
        self._cache_salt = cache_salt
        self._policy = policy
        self.request_id = request_id
        self.mode = mode
        self._builder = builder
        self._sampling = sampling
        self._sent: list[int] = []  # the prompt the engine holds (or will, once queued chunks run)
        self._chunks: list[ChunkTiming] = []
        self._inputs: asyncio.Queue[Any] = asyncio.Queue()
        self._runner: asyncio.Task | None = None
        self._attempt = 0
        self._internal_id: str | None = None  # vLLM's request id (changes when vllm mode resubmits)
        self._chunks_before = 0  # chunks sent before the current vLLM request started
        self._chunks_done = 0  # chunks of the current vLLM request whose prefill has finished
        self._held: tuple[str, list[int], bool] | None = None  # waits for the chunk in flight
        self._final_sent = False
        self._next_seq = 0
        self._state: Literal["open", "finished", "aborted", "failed"] = "open"
        self._t_open = time.monotonic()
        self.last_activity = self._t_open
        self._t_final: float | None = None
        self._t_first: float | None = None
        self._out_ids: list[int] = []
        self._emitted_chars = 0
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()
        self._done: asyncio.Future[SessionResult] = asyncio.get_running_loop().create_future()
        self._counters: dict[str, Any] = {}
        self._finish_reason: str | None = None

    # -- public API ------------------------------------------------------------------------------

    @property
    def prompt_ids(self) -> list[int]:
        """The token ids handed to the engine so far (a copy)."""
        return list(self._sent)

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    async def append(self, text: str, *, final: bool = False) -> None:
        """Add text after the context sent so far; ``final`` also ends the context (one chunk)."""
        self._check_open("append")
        if not isinstance(text, str) or not text:
            raise InvalidEvent(f"append to {self.request_id!r} needs non-empty text")
        self._change(lambda b: b.append(text), final)

    async def update(self, docs: str | Sequence[str], *, final: bool = False) -> None:
        """Replace the context; KV is kept up to the longest common prefix."""
        self._check_open("update")
        if isinstance(docs, str):
            docs = [docs]
        if not docs or not any(isinstance(d, str) and d.strip() for d in docs):
            raise InvalidEvent(f"update of {self.request_id!r} needs at least one non-empty document")
        self._change(lambda b: b.replace(list(docs)), final)

    async def push(self, event: ContextEvent) -> None:
        """Apply a retriever's event, checking its sequence number; ``final`` finishes the session."""
        if event.request_id != self.request_id:
            raise InvalidEvent(f"event for {event.request_id!r} pushed to session {self.request_id!r}")
        self._check_open(f"event {event.seq}")
        if event.seq < self._next_seq:
            raise SequenceError(
                f"duplicate event {event.seq} for {self.request_id!r} (next is {self._next_seq})"
            )
        if event.seq > self._next_seq:
            raise SequenceError(
                f"out-of-order event {event.seq} for {self.request_id!r}: expected {self._next_seq}"
            )
        if event.op is Op.APPEND and event.text:
            await self.append(event.text, final=event.final)
        elif event.op is Op.UPDATE:
            await self.update(event.docs, final=event.final)
        elif event.final:
            await self.finish()
        self._next_seq += 1

    async def finish(self) -> None:
        """No more context: prefill the rest and start generating."""
        self._check_open("finish")
        self._change(lambda b: None, final=True)

    async def abort(self) -> None:
        """Stop the session and free all of its KV. Safe to call at any time, more than once."""
        await self._close(SessionClosed(f"session {self.request_id!r} was aborted"))

    async def _expire(self, ttl: float) -> None:
        await self._close(
            SessionExpired(f"session {self.request_id!r} got no event for {ttl:g} s (session_ttl_s); aborted")
        )

    async def _close(self, error: StreamError) -> None:
        if self._state in ("aborted", "failed"):
            return
        self._state = "aborted"
        self.engine._closed(self)
        await self._stop_runner()
        self._deltas.put_nowait(None)
        if not self._done.done():
            self._done.set_exception(error)
            self._done.exception()  # mark retrieved: an abort is not an unhandled error

    async def stream(self) -> AsyncIterator[str]:
        """Generated text as it is produced (never the throw-away tokens of intermediate chunks)."""
        while True:
            delta = await self._deltas.get()
            if delta is None:
                return
            yield delta

    async def result(self) -> SessionResult:
        return await asyncio.shield(self._done)

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise SessionClosed(f"{what} on session {self.request_id!r}, which is already {self._state}")

    async def _start(self) -> None:
        if self.mode != "nonstream":
            self._apply(lambda b: None, final=False)

    def _change(self, change: Any, final: bool) -> None:
        self.last_activity = time.monotonic()
        if final:
            self._t_final = time.monotonic()
        self._apply(change, final)
        if final:
            self._state = "finished"

    def _apply(self, change: Any, final: bool) -> None:
        """Change the context, then send what became safe to prefill. A failing change leaves the
        session as it was."""
        before = self._builder.body
        change(self._builder)
        try:
            target = self._builder.ids(final=final).ids
        except StreamError:
            self._builder.body = before
            raise
        if self.mode == "nonstream":
            if final:
                self._launch(target, as_stream=False)
            return
        self._send(target, final)

    def _send(self, target: list[int], final: bool) -> None:
        extends = target[: len(self._sent)] == self._sent and len(target) > len(self._sent)
        if not self._sent:
            self._launch(target, as_stream=True, final=final)
        elif extends:
            self._put_chunk(target[len(self._sent) :], "append", final)
        elif target == self._sent and not final:
            return  # nothing new is safe to prefill yet
        elif self.mode == "vllm":
            self._restart_runner(target, final)
        else:
            self._put_chunk(list(target), "update", final)
        self._sent = list(target)

    def _chunk_params(self, op: str, final: bool) -> Any:
        base = self._sampling if final else _vllm().SamplingParams(temperature=0, max_tokens=1)
        params = base.clone()
        meta = ChunkMeta(Op(op), final, self._policy)
        params.extra_args = {**(params.extra_args or {}), **meta.as_extra_args()}
        if not final:
            params.output_kind = _vllm().sampling_params.RequestOutputKind.CUMULATIVE
        return params

    def _put_chunk(self, ids: list[int], op: str, final: bool) -> None:
        """Hand a chunk to the engine, or hold it while the previous one is still in flight.

        vLLM takes one queued chunk per round (prefill, sample, park, resume), and its scheduler
        only sees the chunk at the head: a backlog of k chunks costs k rounds and hides the final
        one (and so the session's place in the ranking). Held chunks are merged and sent as one
        as soon as the chunk in flight is done; the final chunk goes at once (merged with what was
        held), so the scheduler learns that the stream is complete. An update may queue behind
        the chunk in flight: it replaces that chunk's context, so the engine core ends the chunk
        early instead of prefilling what is about to be thrown away. Stock ``vllm`` mode keeps
        vLLM's behaviour."""
        op, ids, final = merge_chunks(self._held, (op, ids, final))
        self._held = None
        if self.mode == "stream" and not final and not self._may_send(op):
            self._held = (op, ids, final)
            return
        self._hand_over(ids, op, final)

    def _may_send(self, op: str) -> bool:
        """An update may wait in vLLM behind the chunk in flight; anything else waits here."""
        outstanding = len(self._chunks) - self._chunks_before - self._chunks_done
        return outstanding < (2 if op == "update" else 1)

    def _release_held(self) -> None:
        if self._held is not None and self._may_send(self._held[0]):
            (op, ids, final), self._held = self._held, None
            self._hand_over(ids, op, final)

    def _hand_over(self, ids: list[int], op: str, final: bool) -> None:
        from vllm.engine.protocol import StreamingInput

        prompt = _tokens_prompt(ids, self._cache_salt)
        self._inputs.put_nowait(StreamingInput(prompt, self._chunk_params(op, final)))
        self._chunks.append(ChunkTiming(sent=time.monotonic(), tokens=len(ids)))
        if final:
            self._final_sent = True
            self._inputs.put_nowait(None)

    def _launch(self, ids: list[int], as_stream: bool, final: bool = True) -> None:
        self._attempt += 1
        internal_id = self.request_id if self._attempt == 1 else f"{self.request_id}#{self._attempt}"
        self._internal_id = internal_id
        if as_stream:
            self._inputs = asyncio.Queue()
            self._chunks_before = len(self._chunks)
            self._chunks_done, self._held = 0, None
            self._put_chunk(ids, "append", final)
            prompt: Any = self._input_stream(self._inputs)
        else:
            self._chunks.append(ChunkTiming(sent=time.monotonic(), tokens=len(ids)))
            prompt = _tokens_prompt(ids, self._cache_salt)
            self._chunks_before = len(self._chunks) - 1
            self._final_sent = True
        self._sent = list(ids)
        self._runner = asyncio.get_running_loop().create_task(self._run(prompt, internal_id))

    def _restart_runner(self, target: list[int], final: bool) -> None:
        """vllm mode's update: abort the request and submit the whole new prompt."""
        old_runner, old_id = self._runner, self._internal_id
        self._runner = None
        if old_runner is not None:
            old_runner.cancel()
        asyncio.get_running_loop().create_task(self.engine._llm.abort(old_id))
        self._launch(target, as_stream=True, final=final)

    @staticmethod
    async def _input_stream(queue: asyncio.Queue) -> AsyncIterator[Any]:
        while (item := await queue.get()) is not None:
            yield item

    async def _run(self, prompt: Any, internal_id: str) -> None:
        final_sampling = self._chunk_params("append", final=True)
        try:
            async for out in self.engine._llm.generate(prompt, final_sampling, request_id=internal_id):
                self._on_output(out)
            self._complete()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine failed this request; others go on
            self._fail(exc)

    def _on_output(self, out: Any) -> None:
        now = time.monotonic()
        ids = list(out.outputs[0].token_ids)
        n_throwaway = len(self._chunks) - 1 - self._chunks_before if self._final_sent else None
        for i, chunk in enumerate(self._chunks[self._chunks_before :]):
            if i < len(ids) and chunk.done is None:
                chunk.done = now
        if n_throwaway is None:
            self._chunks_done = max(self._chunks_done, min(len(ids), len(self._chunks) - self._chunks_before))
            self._release_held()
        if n_throwaway is None or len(ids) <= n_throwaway:
            return
        real = ids[n_throwaway:]
        if self._t_first is None:
            self._t_first = now
        self._emit(real)
        if out.outputs[0].finish_reason is not None:
            self._finish_reason = out.outputs[0].finish_reason
        if out.kv_transfer_params and CONFIG_KEY in out.kv_transfer_params:
            self._counters = out.kv_transfer_params[CONFIG_KEY]

    def _emit(self, real: list[int]) -> None:
        """Push the new part of the decoded text (holding back an incomplete UTF-8 character)."""
        self._out_ids = real
        text = self.engine.tokenizer.decode(real)
        if not text.endswith("\ufffd"):
            self._push_text(text)

    def _push_text(self, text: str) -> None:
        if len(text) > self._emitted_chars:
            self._deltas.put_nowait(text[self._emitted_chars :])
            self._emitted_chars = len(text)

    def _complete(self) -> None:
        if self._done.done():
            return
        self.engine._closed(self)
        text = self.engine.tokenizer.decode(self._out_ids)
        self._push_text(text)
        self._deltas.put_nowait(None)
        t_first = self._t_first if self._t_first is not None else time.monotonic()
        self._done.set_result(
            SessionResult(
                text=text,
                token_ids=list(self._out_ids),
                prompt_token_ids=list(self._sent),
                ttft_final_s=t_first - (self._t_final or t_first),
                ttft_open_s=t_first - self._t_open,
                tokens_prefilled=int(self._counters.get("tokens_prefilled", 0)),
                tokens_recomputed=int(self._counters.get("tokens_recomputed", 0)),
                tokens_discarded=int(self._counters.get("tokens_discarded", 0)),
                updates=list(self._counters.get("updates", [])),
                chunks=list(self._chunks),
                finish_reason=self._finish_reason,
                mode=self.mode,
                final_event_at=self._t_final,
                final_handoff_at=self._chunks[-1].sent if self._t_final and self._chunks else None,
                first_token_at=self._t_first,
            )
        )

    def _fail(self, exc: Exception) -> None:
        self._state = "failed"
        self.engine._closed(self)
        self._deltas.put_nowait(None)
        if not self._done.done():
            self._done.set_exception(StreamError(f"session {self.request_id!r} failed in the engine: {exc}"))

    async def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        if self._internal_id is not None:
            await self.engine._llm.abort(self._internal_id)
