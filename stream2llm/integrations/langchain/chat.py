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
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import Field, PrivateAttr

from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.engine.models import DEFAULT_MODEL
from stream2llm.integrations.langchain.bridge import EngineHandle, EngineRef, shared_engine
from stream2llm.pipelines.pipeline import ContextArrived, RagAnswer, RagPipeline, TokenDelta
from stream2llm.retrievers.base import StreamingRetriever

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


# -- the streaming RAG Runnable --------------------------------------------------------------------

RagInput = str | dict[str, Any]


class StreamingRAG(Runnable[RagInput, str]):
    """The RAG pipeline as a LangChain Runnable: question in, answer tokens out, as they come.

    Input: a question string or ``{"question": ...}``. ``astream``/``stream`` yield answer text
    chunks, so ``StreamingRAG(...) | StrOutputParser()`` streams chunk by chunk. Every context
    arrival is dispatched as a custom event ``"context"`` (``retriever, seq, op, sources, chars, t_s,
    final``; ``t_s`` in seconds since the question arrived) before the first token, and a custom event
    ``"rag_answer"`` (sources, timings, token counts, retriever errors) follows the last token; both
    show in ``astream_events(version="v2")`` as ``on_custom_event``.

    ``engine`` is a StreamingEngine the caller started (make the Runnable inside that engine's event
    loop) or an EngineHandle (e.g. ``shared_engine(config)``). Async calls work on any loop; sync
    calls work from any thread but the engine's loop thread.
    """

    def __init__(
        self,
        engine: StreamingEngine | EngineHandle,
        retrievers: Sequence[StreamingRetriever],
        *,
        mode: str = "stream",
        sampling: Any = None,
        name: str | None = None,
        **pipeline_kwargs: Any,
    ) -> None:
        self._ref = EngineRef(engine)
        self.pipeline = RagPipeline(
            self._ref.engine, retrievers, mode=mode, sampling=sampling, **pipeline_kwargs
        )
        self.name = name or "StreamingRAG"

    @property
    def InputType(self) -> Any:
        return RagInput

    @property
    def OutputType(self) -> type[str]:
        return str

    # -- sync -------------------------------------------------------------------------------

    def invoke(self, input: RagInput, config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return "".join(self.stream(input, config, **kwargs))

    def stream(self, input: RagInput, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[str]:
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(
        self, input: Iterator[RagInput], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[str]:
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)

    def _transform(self, inputs: Iterator[RagInput], config: RunnableConfig) -> Iterator[str]:
        question = rag_question(list(inputs))
        for item in self._ref.handle().iterate(lambda _e: self.pipeline.events(question)):
            if isinstance(item, TokenDelta):
                yield item.text
            else:
                dispatch_custom_event(*_custom_event(item), config=config)

    # -- async ------------------------------------------------------------------------------

    async def ainvoke(self, input: RagInput, config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return "".join([chunk async for chunk in self.astream(input, config, **kwargs)])

    async def astream(
        self, input: RagInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        async def one() -> AsyncIterator[RagInput]:
            yield input

        async for chunk in self.atransform(one(), config, **kwargs):
            yield chunk

    async def atransform(
        self, input: AsyncIterator[RagInput], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, **kwargs):
            yield chunk

    async def _atransform(
        self, inputs: AsyncIterator[RagInput], config: RunnableConfig
    ) -> AsyncIterator[str]:
        question = rag_question([item async for item in inputs])
        async for item in self._ref.handle().aiterate(lambda _e: self.pipeline.events(question)):
            if isinstance(item, TokenDelta):
                yield item.text
            else:
                await adispatch_custom_event(*_custom_event(item), config=config)


def rag_question(chunks: Sequence[Any]) -> str:
    """The question from StreamingRAG's input (a string, or a dict with "question"; streamed input
    arrives in chunks, which are joined)."""
    if chunks and all(isinstance(c, str) for c in chunks):
        question = "".join(chunks)
    elif chunks and all(isinstance(c, dict) for c in chunks):
        parts = [c["question"] for c in chunks if "question" in c]
        if not parts or not all(isinstance(p, str) for p in parts):
            keys = sorted({k for c in chunks for k in c})
            raise ValueError(f"StreamingRAG input dict needs a 'question' string; got keys {keys}")
        question = "".join(parts)
    else:
        kinds = sorted({type(c).__name__ for c in chunks}) or ["nothing"]
        raise ValueError(
            f"StreamingRAG takes a question string or {{'question': str}}; got {', '.join(kinds)}"
        )
    if not question.strip():
        raise ValueError("StreamingRAG got an empty question")
    return question


def _custom_event(item: ContextArrived | RagAnswer) -> tuple[str, dict[str, Any]]:
    if isinstance(item, ContextArrived):
        data = dataclasses.asdict(item)
        data["sources"] = list(item.sources)
        return "context", data
    return "rag_answer", {
        "question": item.question,
        "sources": list(item.sources),
        "mode": item.mode,
        "timings": dict(item.timings),
        "prompt_tokens": item.prompt_tokens,
        "tokens_prefilled": item.tokens_prefilled,
        "tokens_recomputed": item.tokens_recomputed,
        "events": item.events,
        "errors": list(item.errors),
    }
