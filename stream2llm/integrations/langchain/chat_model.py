"""LangChain chat model over StreamingEngine: ``ChatStream2LLM``.

Give it an engine you started (``engine=engine``, used on that engine's event loop) or a model name
(``model="tiny"``: a shared engine on a background loop thread, one per configuration for the whole
process). Sync and async calls, streaming included, work in both cases; sync calls on the engine's
own loop are refused (they would block it). Messages become the prompt through the renderer every
surface shares (``stream2llm.context.chat``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field, PrivateAttr

from stream2llm.context.chat import StopScanner, Turn, render_chat
from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.engine.models import DEFAULT_MODEL
from stream2llm.integrations.langchain.bridge import EngineHandle, EngineRef, shared_engine

PROVIDER = "stream2llm"
# LangChain message types -> the shared renderer's roles (a "chat" message names its own role)
ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool", "function": "function"}

# -- messages -> the engine's prompt ---------------------------------------------------------------


def message_text(message: BaseMessage) -> str:
    """The text of a message; the engine takes text only, so other content blocks are an error."""
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type", "?") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatStream2LLM takes text only; a {message.type} message has a {kind!r} block")
    return "".join(parts)


def render_messages(messages: Sequence[BaseMessage]) -> tuple[str, str]:
    """(question, context) for the engine's prompt template, by the shared ``render_chat``: the
    last human message is the question, every other message a ``Role: text`` paragraph."""
    if not messages:
        raise ValueError("ChatStream2LLM needs at least one message")
    return render_chat([message_turn(m) for m in messages])


def message_turn(message: BaseMessage) -> Turn:
    """A LangChain message as the renderer's turn."""
    if message.type == "chat":
        role = str(getattr(message, "role", None) or "Chat")
    else:
        role = ROLES.get(message.type, message.type.capitalize())
    return Turn(role, message_text(message), message.name)


# -- one chat request on the engine --------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    question: str
    context: str
    sampling: Any
    stop: tuple[str, ...]
    mode: str
    truncate: bool
    timeout_s: float | None


@dataclass(frozen=True)
class ChatOutcome:
    """How a request ended (the last item of ``run_chat``)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    ttft_s: float | None
    stop_sequence: str | None = None


async def run_chat(engine: StreamingEngine, request: ChatRequest) -> AsyncIterator[str | ChatOutcome]:
    """Answer text as it is generated, then a ChatOutcome. Runs on the engine's loop. A stop string
    ends the session early (its KV is freed); leaving the iteration early aborts it."""
    deadline = None if request.timeout_s is None else time.monotonic() + request.timeout_s
    t0 = time.monotonic()
    session = await engine.open(
        request.question, request.sampling, mode=request.mode, truncate=request.truncate
    )  # type: ignore[arg-type]
    finished = False
    try:
        if request.context:
            await session.append(request.context, final=True)
        else:
            await session.finish()
        scanner = StopScanner(request.stop)
        emitted: list[str] = []
        t_first = None
        async for delta in _before(session.stream(), deadline, request.timeout_s):
            t_first = t_first or time.monotonic()
            text = scanner.feed(delta)
            if text:
                emitted.append(text)
                yield text
            if scanner.stopped:
                break
        ttft = None if t_first is None else t_first - t0
        if scanner.stopped:
            await session.abort()
            finished = True
            completion = len(engine.tokenizer.encode_with_ends("".join(emitted), bos=False)[0])
            yield ChatOutcome(len(session.prompt_ids), completion, "stop", ttft, scanner.matched)
            return
        if rest := scanner.flush():
            yield rest
        result = await session.result()
        finished = True
        yield ChatOutcome(len(result.prompt_token_ids), len(result.token_ids), result.finish_reason, ttft)
    finally:
        if not finished:
            await session.abort()


async def _before(
    stream: AsyncIterator[str], deadline: float | None, timeout_s: float | None
) -> AsyncIterator[str]:
    """``stream``, failing with a clear TimeoutError when ``deadline`` passes."""
    iterator = stream.__aiter__()
    while True:
        try:
            if deadline is None:
                item = await iterator.__anext__()
            else:
                item = await asyncio.wait_for(iterator.__anext__(), max(deadline - time.monotonic(), 0))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise TimeoutError(f"ChatStream2LLM request took longer than timeout={timeout_s:g} s") from None
        yield item


# -- the chat model --------------------------------------------------------------------------------


class ChatStream2LLM(BaseChatModel):
    """A LangChain chat model answering on a stream2llm StreamingEngine (vLLM).

    Messages become the engine's prompt (see ``render_messages``); ``temperature``, ``max_tokens``,
    ``top_p`` and ``seed`` map to vLLM SamplingParams (``sampling_kwargs`` passes any other field);
    ``stop`` strings are applied to the decoded text. Usage metadata counts the engine's tokens.
    """

    model: str = DEFAULT_MODEL
    """Model name (``tiny``, ``gemma-270m``) or local HF directory; ignored when ``engine`` is given."""
    engine: Any = Field(default=None, exclude=True)
    """A started StreamingEngine (or an EngineHandle); None starts a shared background engine."""
    engine_config: dict[str, Any] = Field(default_factory=dict)
    """EngineConfig fields for the shared background engine (e.g. kv_cache_bytes, max_model_len)."""
    temperature: float | None = None
    max_tokens: int | None = 256
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float | None = None
    """Seconds a whole request may take (TimeoutError after that; the session is aborted)."""
    mode: Literal["stream", "vllm", "nonstream"] = "nonstream"
    """Session mode. A chat prompt is complete at once, so one plain request is the default."""
    truncate: bool = False
    """Drop the oldest context instead of failing when the prompt exceeds max_model_len."""
    streaming: bool = False
    sampling_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More vLLM SamplingParams fields (e.g. ``ignore_eos``, ``min_tokens``)."""

    _ref: EngineRef | None = PrivateAttr(default=None)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if self.engine is not None:
            self._ref = EngineRef(self.engine)  # an engine the caller started: its loop is running now
            self.model = self._ref.engine.model.name

    # -- LangChain's required surface --------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return PROVIDER

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
            "mode": self.mode,
            **self.sampling_kwargs,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model") or self.model,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        handle = self._handle_sync()
        return self._result(list(handle.iterate(lambda e: run_chat(e, request))))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        handle = await self._handle_async()
        return self._result([item async for item in handle.aiterate(lambda e: run_chat(e, request))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        for item in self._handle_sync().iterate(lambda e: run_chat(e, request)):
            yield self._chunk(item)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        handle = await self._handle_async()
        async for item in handle.aiterate(lambda e: run_chat(e, request)):
            yield self._chunk(item)

    # -- internals ---------------------------------------------------------------------------

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> ChatRequest:
        from vllm import SamplingParams

        model = kwargs.pop("model", None)
        if model is not None and model != self.model:
            raise ValueError(
                f"ChatStream2LLM serves {self.model!r}; a per-call model={model!r} is not supported"
            )
        fields = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
        fields = {k: kwargs.pop(k, v) for k, v in fields.items()}
        fields = {k: v for k, v in fields.items() if v is not None}
        max_tokens = kwargs.pop("max_tokens", self.max_tokens)
        extra = {**self.sampling_kwargs, **kwargs.pop("sampling_kwargs", {})}
        kwargs.pop("stream", None)  # LangChain's own switch
        if kwargs:
            raise ValueError(f"ChatStream2LLM got unknown call arguments: {', '.join(sorted(kwargs))}")
        try:
            sampling = SamplingParams(max_tokens=max_tokens, **fields, **extra)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ChatStream2LLM: invalid sampling parameters: {exc}") from exc
        question, context = render_messages(messages)
        stops = tuple(stop if stop is not None else (self.stop or ()))
        return ChatRequest(question, context, sampling, stops, self.mode, self.truncate, self.timeout)

    def _engine_config(self) -> EngineConfig:
        try:
            return EngineConfig(model=self.model, **self.engine_config)
        except TypeError as exc:
            raise ValueError(f"ChatStream2LLM: invalid engine_config: {exc}") from exc

    def _handle_sync(self) -> EngineHandle:
        return self._ref.handle() if self._ref else shared_engine(self._engine_config())

    async def _handle_async(self) -> EngineHandle:
        if self._ref:
            return self._ref.handle()
        # Starting takes ~20 s the first time: not on the caller's loop.
        return await asyncio.to_thread(shared_engine, self._engine_config())

    def _metadata(self, outcome: ChatOutcome) -> tuple[UsageMetadata, dict[str, Any]]:
        usage = UsageMetadata(
            input_tokens=outcome.prompt_tokens,
            output_tokens=outcome.completion_tokens,
            total_tokens=outcome.prompt_tokens + outcome.completion_tokens,
        )
        meta: dict[str, Any] = {
            "model_name": self.model,
            "model_provider": PROVIDER,
            "finish_reason": outcome.finish_reason,
            "ttft_s": outcome.ttft_s,
            "mode": self.mode,
        }
        if outcome.stop_sequence is not None:
            meta["stop_sequence"] = outcome.stop_sequence
        return usage, meta

    def _result(self, items: list[str | ChatOutcome]) -> ChatResult:
        outcome = items[-1]
        assert isinstance(outcome, ChatOutcome)
        text = "".join(i for i in items[:-1] if isinstance(i, str))
        usage, meta = self._metadata(outcome)
        message = AIMessage(content=text, usage_metadata=usage, response_metadata=meta)
        info = {"finish_reason": outcome.finish_reason}
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=info)], llm_output=meta
        )

    def _chunk(self, item: str | ChatOutcome) -> ChatGenerationChunk:
        if isinstance(item, str):
            return ChatGenerationChunk(message=AIMessageChunk(content=item))
        usage, meta = self._metadata(item)
        last = AIMessageChunk(content="", usage_metadata=usage, response_metadata=meta, chunk_position="last")
        return ChatGenerationChunk(message=last, generation_info={"finish_reason": item.finish_reason})
