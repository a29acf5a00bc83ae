"""LangChain surfaces: a chat model over StreamingEngine and a streaming RAG Runnable.

``ChatStream2LLM`` is a ``BaseChatModel``: give it an engine you started (``engine=engine``, used on
that engine's event loop) or a model name (``model="tiny"``: a shared engine on a background loop
thread, one per configuration for the whole process). Sync and async calls, streaming included,
work in both cases; sync calls on the engine's own loop are refused (they would block it).

``StreamingRAG`` is a ``Runnable`` over the RAG pipeline: its stream is the answer's tokens, and
context arrivals are reported as ``on_custom_event`` "context" events before the first token.
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
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field, PrivateAttr

from stream2llm.serving.background import EngineHandle, shared_engine
from stream2llm.serving.engine import EngineConfig, StreamingEngine
from stream2llm.serving.models import DEFAULT_MODEL

PROVIDER = "stream2llm"
ROLE_NAMES = {"system": "System", "human": "User", "ai": "Assistant", "tool": "Tool", "function": "Function"}

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
    """(question, context) for the engine's prompt template.

    The last human message is the question; every other message, in order, becomes the context as
    ``Role: text`` (``Role (name): text`` when named) paragraphs. Deterministic, so a conversation
    always maps to the same prompt (and prefix-cache hits across turns)."""
    if not messages:
        raise ValueError("ChatStream2LLM needs at least one message")
    humans = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
    last = humans[-1] if humans else len(messages) - 1
    question = message_text(messages[last])
    context = "\n\n".join(_render_turn(m) for i, m in enumerate(messages) if i != last)
    return question, context


def _render_turn(message: BaseMessage) -> str:
    role = getattr(message, "role", None) if message.type == "chat" else ROLE_NAMES.get(message.type)
    role = str(role or message.type.capitalize())
    if message.name:
        role = f"{role} ({message.name})"
    return f"{role}: {message_text(message)}"


# -- stop strings --------------------------------------------------------------------------------


class StopScanner:
    """Cuts streamed text at the first stop string.

    The engine runs without a tokenizer in vLLM (stream2llm tokenizes), so vLLM cannot apply stop
    strings; this does, on the decoded text. Text that could be the start of a stop string is held
    back until the next delta decides, so no stop string (or part of one) is ever emitted."""

    def __init__(self, stops: Sequence[str] | None) -> None:
        self.stops = [s for s in (stops or ()) if s]
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self._pending = ""

    def feed(self, delta: str) -> str:
        """The part of ``pending + delta`` that is safe to emit now."""
        if self.stopped:
            return ""
        text = self._pending + delta
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self.stopped, self._pending = True, ""
            return text[:at]
        hold = max((_overlap(text, s) for s in self.stops), default=0)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """What was held back, once the stream ended without a stop string."""
        rest, self._pending = self._pending, ""
        return rest


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


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

    _loop: asyncio.AbstractEventLoop | None = PrivateAttr(default=None)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if isinstance(self.engine, EngineHandle):
            self.model = self.engine.engine.model.name
        elif self.engine is not None:
            if not isinstance(self.engine, StreamingEngine):
                raise TypeError(f"engine must be a StreamingEngine or EngineHandle, not {type(self.engine)}")
            self.model = self.engine.model.name
            try:  # an engine the caller started lives on the loop running now
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None

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

    def _user_handle(self) -> EngineHandle | None:
        if isinstance(self.engine, EngineHandle):
            return self.engine
        if self.engine is None:
            return None
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()  # first async call: the engine's loop
            except RuntimeError:
                raise RuntimeError(
                    "ChatStream2LLM(engine=...) does not know the engine's event loop: create it inside "
                    "that loop (or pass an EngineHandle), or make an async call first"
                ) from None
        return EngineHandle(self.engine, self._loop)

    def _handle_sync(self) -> EngineHandle:
        return self._user_handle() or shared_engine(self._engine_config())

    async def _handle_async(self) -> EngineHandle:
        handle = self._user_handle()
        if handle is None:  # starting blocks for ~20 s the first time: not on the caller's loop
            handle = await asyncio.to_thread(shared_engine, self._engine_config())
        return handle

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
