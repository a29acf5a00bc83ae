"""StreamingEngine: one vLLM engine shared by many streaming sessions.

The engine starts vLLM (with stream2llm's scheduler), opens sessions, keeps the registry of open
ones (with their admission limit and idle expiry) and serves plain one-shot requests. What a
session does with its context lives in ``session``, ``handover`` and ``outputs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stream2llm.context.prompt import PromptBuilder, PromptTemplate, TextTokenizer
from stream2llm.core.kv_store import DEFAULT_ROOT
from stream2llm.core.policies import POLICIES, PREEMPTIONS
from stream2llm.core.stats_board import EngineStats, StatsBoard
from stream2llm.engine import models
from stream2llm.engine.config import (
    MODES,
    EngineConfig,
    Mode,
    check_config,
    engine_args,
    has_kv_tier,
    tier_bytes,
)
from stream2llm.engine.decode import DecodeBackend, LocalDecode
from stream2llm.engine.handover import tokens_prompt
from stream2llm.engine.health import Watchdog, explain_unguarded_main, refuse_unguarded_start, start_off_loop
from stream2llm.engine.host import SessionHost
from stream2llm.engine.outputs import SessionResult
from stream2llm.engine.remote_decode import RemoteDecode
from stream2llm.engine.sampling import check_sampling, default_sampling, with_eos_stop
from stream2llm.engine.session import Session
from stream2llm.engine.tracing import Tracing
from stream2llm.errors import AdmissionRejected, EngineDied, OutputTooLong, StreamError, UnknownSession

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 10.0  # session aborts, then vLLM's own shutdown, half each
TRACE_FLUSH_S = 2.0  # the last spans' export at shutdown, at most

__all__ = ["EngineConfig", "Session", "SessionResult", "StreamingEngine"]


class StreamingEngine:
    """One vLLM engine shared by many streaming sessions."""

    def __init__(
        self,
        config: EngineConfig,
        llm: Any,
        model: models.ModelInfo,
        board: StatsBoard,
        tier_path: str | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = TextTokenizer(model.path, model.bos_token_id)
        self.template = PromptTemplate.for_chat_turn(model.chat_turn)
        self._llm = llm
        self._board = board
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count()
        self._reaper: asyncio.Task | None = None
        self._policy = config.policy
        self._preemption = config.preemption
        self.kv_tier_path = tier_path  # the host KV tier's directory (removed at shutdown)
        self._watchdog = Watchdog(llm, self._fail_all)
        self._shutdown: asyncio.Task | None = None
        self._decode = decode_backend(config)
        self.tracing = Tracing(config.otlp_traces_endpoint) if config.otlp_traces_endpoint else None
        self._host = SessionHost(
            generate=llm.generate,
            decode=self._decode,
            abort=llm.abort,
            closed=self._forget,
            tokenizer=self.tokenizer,
            engine_died=self._watchdog.check,
            policy=lambda: (self._policy, self._preemption),
        )

    @classmethod
    async def start(cls, config: EngineConfig | None = None) -> StreamingEngine:
        refuse_unguarded_start()  # a spawned engine core re-importing an unguarded script
        config = config or EngineConfig()
        try:
            check_config(config)
        except ValueError as error:
            raise StreamError(f"EngineConfig: {error}") from None
        tier_path = _make_tier_dir(config) if has_kv_tier(config) else None
        fd, board_path = tempfile.mkstemp(prefix="stream2llm-stats-")
        os.close(fd)
        board = StatsBoard(board_path, create=True)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

        def start_vllm() -> tuple[models.ModelInfo, Any]:
            # importing vLLM alone takes 10-20 s on a small machine: done here, off the event
            # loop, like the start itself, so that a signal during start-up is handled at once
            from stream2llm.core import vllm_compat

            model = models.resolve(config.model)
            args = engine_args(config, model, board_path, tier_path)
            return model, vllm_compat.start_async_llm(args, fork=config.fast_start)

        try:
            model, llm = await start_off_loop(explain_unguarded_main(start_vllm), _shut_down_started)
        except BaseException:
            board.close()
            os.unlink(board_path)
            _remove_tier_dir(config, tier_path)
            raise
        engine = cls(config, llm, model, board, tier_path)
        engine._watchdog.start()
        _freeze_start_up_heap()
        return engine

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
        trace_headers: Mapping[str, str] | None = None,
    ) -> Session:
        """Open a session; in ``stream`` mode the instructions and question start prefilling now.

        ``cache_salt`` isolates the session's prefix-cache entries (per tenant, or for references
        that must not reuse another request's KV); ``trace_headers`` (a caller's ``traceparent``)
        continue the caller's trace when tracing is on. Raises EngineDied once the engine core died."""
        request_id = self._admit(mode, request_id)
        sampling = sampling if sampling is not None else default_sampling()
        check_sampling(sampling)
        if sampling.max_tokens > self.config.max_model_len:
            raise OutputTooLong(sampling.max_tokens, self.config.max_model_len)
        sampling = self.with_eos_stop(sampling)
        builder = PromptBuilder(
            self.tokenizer,
            question,
            template=template or self.template,
            max_prompt_tokens=self.config.max_model_len - sampling.max_tokens,
            truncate=truncate,
            output_tokens=sampling.max_tokens,
        )
        trace = self.tracing.session(request_id, mode, trace_headers) if self.tracing is not None else None
        session = Session(self._host, request_id, builder, sampling, mode, cache_salt, trace)
        self._sessions[request_id] = session
        self._ensure_reaper()
        try:
            await session.begin()
        except BaseException as exc:
            self._sessions.pop(request_id, None)  # a session that failed to open holds no slot
            session.end_trace_with(exc)
            raise
        return session

    def _admit(self, mode: str, request_id: str | None) -> str:
        """Check a session's options, the engine's health and the session limit; the session's id."""
        if (died := self._watchdog.check()) is not None:
            raise died
        if self._shutdown is not None:
            raise StreamError("the engine is shutting down")
        if mode not in MODES:
            raise StreamError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if len(self._sessions) >= self.config.max_sessions:
            raise AdmissionRejected(
                f"engine has {len(self._sessions)} open sessions (max_sessions={self.config.max_sessions})"
            )
        request_id = request_id or f"s2l-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        if request_id in self._sessions:
            raise StreamError(f"a session with id {request_id!r} is already open")
        return request_id

    def with_eos_stop(self, sampling: Any) -> Any:
        """vLLM runs without its tokenizer here, so it does not know the end-of-sequence token:
        name it (unless ``ignore_eos``), or generation only stops at ``max_tokens``."""
        return with_eos_stop(sampling, self.model.eos_token_ids)

    def _ensure_reaper(self) -> None:
        if self.config.session_ttl_s and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.get_running_loop().create_task(self._reap_expired())

    async def _reap_expired(self) -> None:
        """Abort sessions whose next event never came: a stalled retriever must not hold KV forever.
        One session's failing abort is logged and the others are still reaped."""
        while self._sessions and self.config.session_ttl_s:
            ttl = self.config.session_ttl_s
            await asyncio.sleep(min(ttl / 4, 1.0))
            now = time.monotonic()
            for session in list(self._sessions.values()):
                try:
                    await session.expire_if_idle(ttl, now)
                except Exception:
                    log.exception("expiring session %s failed; the reaper goes on", session.request_id)

    def session(self, request_id: str) -> Session:
        """The open session with this id (UnknownSession otherwise)."""
        try:
            return self._sessions[request_id]
        except KeyError:
            raise UnknownSession(f"no open session with id {request_id!r}") from None

    def open_sessions(self) -> list[Session]:
        """The sessions that are neither finished nor aborted yet."""
        return list(self._sessions.values())

    def _forget(self, request_id: str) -> None:
        """A session ended (finished, aborted, expired or failed): it holds no slot any more."""
        self._sessions.pop(request_id, None)

    # -- the engine ----------------------------------------------------------------------------

    @property
    def policy(self) -> str:
        """The scheduling policy the engine core applies to every request."""
        return self._policy

    @property
    def kv_tier_bytes(self) -> int | None:
        """The host KV tier's bound (None without a tier)."""
        return tier_bytes(self.config) if self.kv_tier_path is not None else None

    @property
    def preemption(self) -> str:
        """How the engine core gives an evicted session's KV back (``EngineConfig.preemption``)."""
        return self._preemption

    def set_policy(self, name: str, preemption: str | None = None) -> None:
        """Switch the engine's scheduling policy, and optionally how victims give KV back (for the
        chunks sent from now on). The engine's owner decides it, for every session at once: no
        session or HTTP client can. Offloading needs the tier the engine started with."""
        if name not in POLICIES:
            raise StreamError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}")
        if preemption is not None:
            if preemption not in PREEMPTIONS:
                raise StreamError(
                    f"unknown preemption {preemption!r}; expected one of {', '.join(PREEMPTIONS)}"
                )
            if preemption != "recompute" and self.kv_tier_path is None:
                started = f"preemption={self.config.preemption!r}, kv_transfer={self.config.kv_transfer!r}"
                raise StreamError(
                    f"preemption {preemption!r} needs the KV tier; this engine started with {started}"
                )
            self._preemption = preemption
        self._policy = name

    @property
    def died(self) -> EngineDied | None:
        """Why the engine core died, or None while it lives."""
        return self._watchdog.check()

    async def wait_died(self) -> EngineDied:
        """Wait until the engine core dies (forever, if it does not); returns why."""
        return await self._watchdog.wait()

    def _fail_all(self, error: EngineDied) -> None:
        for session in list(self._sessions.values()):
            session.engine_died(error)

    def stats(self) -> EngineStats:
        return self._board.read()

    async def reset_prefix_cache(self) -> bool:
        """Drop every cached block no request holds (vLLM's own reset, announced to KV-event
        subscribers as AllBlocksCleared); False while running requests hold blocks."""
        return await self._llm.reset_prefix_cache()

    async def complete(
        self, prompt_ids: Sequence[int], sampling: Any, *, use_prefix_cache: bool = True
    ) -> list[int]:
        """One plain request on given token ids (the one-shot reference)."""
        request_id = f"s2l-oneshot-{uuid.uuid4().hex[:12]}"
        sampling = self.with_eos_stop(sampling)
        prompt = tokens_prompt(prompt_ids, None if use_prefix_cache else uuid.uuid4().hex)
        if (died := self._watchdog.check()) is not None:
            raise died
        final = None
        try:
            async for out in self._llm.generate(prompt, sampling, request_id=request_id):
                final = out
        except Exception as exc:
            raise self._watchdog.check() or exc from exc  # vLLM's EngineDeadError -> EngineDied
        return list(final.outputs[0].token_ids) if final is not None else []

    async def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Abort every session, then stop vLLM, in bounded time. Idempotent, and safe to cancel:
        the shutdown goes on to its end (a second call waits for the first)."""
        if self._shutdown is None:
            self._shutdown = asyncio.get_running_loop().create_task(self._shut_down(timeout_s))
        await asyncio.shield(self._shutdown)

    async def _shut_down(self, timeout_s: float) -> None:
        from stream2llm.core import vllm_compat

        self._watchdog.stop()
        if self._reaper is not None:
            self._reaper.cancel()
        aborts = [session.abort() for session in list(self._sessions.values())]
        if aborts:
            await asyncio.wait([asyncio.ensure_future(a) for a in aborts], timeout=timeout_s / 2)
        vllm_compat.shut_down(self._llm, timeout_s / 2)
        await self._decode.close()
        if self.tracing is not None:  # the last spans, in bounded time: a collector may be down
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(self.tracing.shutdown), TRACE_FLUSH_S)
        self._board.close()
        with contextlib.suppress(OSError):
            os.unlink(self._board.path)
        _remove_tier_dir(self.config, self.kv_tier_path)

    async def __aenter__(self) -> StreamingEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


def decode_backend(config: EngineConfig) -> DecodeBackend:
    """This engine answers, or (disaggregated) the decode instance at ``config.decode_url`` does."""
    if config.decode_url is None:
        return LocalDecode()
    return RemoteDecode(config.decode_url, config.decode_model, pulls_kv=config.decode_pulls_kv)


def _shut_down_started(started: tuple[models.ModelInfo, Any]) -> None:
    """An engine that came up after its starter gave up waiting (a signal during start-up)."""
    from stream2llm.core import vllm_compat

    vllm_compat.shut_down(started[1])


def _freeze_start_up_heap() -> None:
    """Take what start-up made (vLLM, torch, the tokenizer: ~500k objects) out of the garbage
    collector's full passes, as vLLM's engine core does with its own heap: on 2 vCPUs one full
    pass over it took 0.4 s in this front end, and every session's next chunk waited through it."""
    gc.collect()
    gc.freeze()


def _make_tier_dir(config: EngineConfig) -> str:
    """The host KV tier's directory: the configured one (made if missing), else a fresh one in
    shared memory; a path that cannot be written is refused at start-up."""
    if config.kv_tier_path is None:
        return tempfile.mkdtemp(prefix="stream2llm-tier-", dir=DEFAULT_ROOT)
    try:
        os.makedirs(config.kv_tier_path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=config.kv_tier_path)  # noqa: SIM115 - closed below
        probe.close()
    except OSError as error:
        raise StreamError(
            f"EngineConfig.kv_tier_path={config.kv_tier_path!r} cannot hold the KV tier: {error}"
        ) from None
    return config.kv_tier_path


def _remove_tier_dir(config: EngineConfig, path: str | None) -> None:
    """Remove a tier directory the engine made itself (a configured one is emptied, not removed)."""
    if path is None:
        return
    if config.kv_tier_path is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    for entry in Path(path).glob("*.safetensors"):
        with contextlib.suppress(OSError):
            entry.unlink()
