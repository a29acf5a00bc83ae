"""LangChain Runnable over the RAG pipeline: ``StreamingRAG``.

Its stream is the answer's tokens; context arrivals are reported as ``on_custom_event`` "context"
events before the first token, and a "rag_answer" event follows the last token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import Runnable, RunnableConfig

from stream2llm.engine.engine import StreamingEngine
from stream2llm.integrations.langchain.bridge import EngineHandle, EngineRef
from stream2llm.pipelines.pipeline import ContextArrived, RagAnswer, RagPipeline, TokenDelta
from stream2llm.retrievers.base import StreamingRetriever

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
