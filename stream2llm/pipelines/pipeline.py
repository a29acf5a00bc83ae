"""A RAG pipeline: retrievers, the context assembler and the engine, for many queries at once.

Each query opens a session first (in ``stream`` mode the instructions and the question start
prefilling right away), then runs its retrievers concurrently; every event is folded into the
context and handed to the session at once, so prefill overlaps retrieval. When every retriever has
ended, the session is finished and the answer streams. ``mode="nonstream"`` sends the context only
after retrieval (the baseline); ``mode="vllm"`` uses stock vLLM streaming sessions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from stream2llm.context.assembler import ContextAssembler, Layout, RetrieverFailed, SequenceCheck, merge
from stream2llm.context.events import ContextEvent, Op
from stream2llm.engine.engine import Session, StreamingEngine
from stream2llm.retrievers.base import StreamingRetriever


@dataclass(frozen=True)
class ContextArrived:
    """A retriever delivered a piece of context (``t_s``: seconds since the query arrived)."""

    retriever: str
    seq: int
    op: str
    sources: tuple[str, ...]
    chars: int
    t_s: float
    final: bool


@dataclass(frozen=True)
class TokenDelta:
    """Generated answer text."""

    text: str


@dataclass
class RagAnswer:
    question: str
    text: str
    sources: list[str]
    mode: str
    timings: dict[str, float]  # retrieval_s, ttft_final_s, ttft_query_s, total_s
    prompt_tokens: int = 0
    tokens_prefilled: int = 0
    tokens_recomputed: int = 0
    events: int = 0
    errors: list[str] = field(default_factory=list)  # "retriever: error", one per failed retriever
    failed: list[str] = field(default_factory=list)  # the retrievers that failed (their context is missing)
    context: str = ""  # the context body the answer was generated from
    prompt_digest: str | None = None  # of the prompt token ids the engine computed (its counters)


PipelineItem = ContextArrived | TokenDelta | RagAnswer


class RagPipeline:
    """Answers questions with streamed retrieval on a shared engine."""

    def __init__(
        self,
        engine: StreamingEngine,
        retrievers: Sequence[StreamingRetriever],
        *,
        mode: str = "stream",
        sampling: Any = None,
        layout: Layout | None = None,
        max_doc_chars: int = 4000,
    ) -> None:
        if not retrievers:
            raise ValueError("a RAG pipeline needs at least one retriever")
        self.engine = engine
        self.retrievers = list(retrievers)
        self.mode = mode
        self.sampling = sampling
        self.layout = layout or _default_layout()
        self.max_doc_chars = max_doc_chars

    async def events(self, question: str) -> AsyncIterator[PipelineItem]:
        """Context arrivals and answer tokens as they happen; the last item is the RagAnswer."""
        run = _Run(self, question)
        session = await self.engine.open(question, self.sampling, mode=self.mode, truncate=True)  # type: ignore[arg-type]
        try:
            async for item in run.retrieve(session):
                yield item
            await session.finish()
            async for delta in session.stream():
                yield TokenDelta(delta)
            yield await run.answer(session)
        finally:
            if session.is_open:
                await session.abort()

    async def answer(self, question: str) -> RagAnswer:
        async for item in self.events(question):
            if isinstance(item, RagAnswer):
                return item
        raise RuntimeError("pipeline ended without an answer")  # pragma: no cover

    async def answer_many(self, questions: Sequence[str], *, concurrency: int = 8) -> list[RagAnswer]:
        """Answer many questions at once on the shared engine (at most ``concurrency`` in flight)."""
        gate = asyncio.Semaphore(concurrency)

        async def one(question: str) -> RagAnswer:
            async with gate:
                return await self.answer(question)

        return list(await asyncio.gather(*(one(q) for q in questions)))


class _Run:
    """One question's trip through the pipeline: retrieval folded into one session."""

    def __init__(self, pipeline: RagPipeline, question: str) -> None:
        self.pipeline = pipeline
        self.question = question
        self.t0 = time.monotonic()
        self.t_retrieved = self.t0
        names = [r.name for r in pipeline.retrievers]
        self.assembler = ContextAssembler(names, layout=pipeline.layout)
        self.events = 0
        self.errors: list[str] = []
        self.failed: list[str] = []

    async def retrieve(self, session: Session) -> AsyncIterator[ContextArrived]:
        retrievers = self.pipeline.retrievers
        checks = {r.name: SequenceCheck(session.request_id) for r in retrievers}
        streams = {r.name: r.stream(self.question, request_id=session.request_id) for r in retrievers}
        async for item in merge(streams):
            if isinstance(item, RetrieverFailed):
                self.errors.append(f"{item.retriever}: {item.error}")
                self.failed.append(item.retriever)
                self.assembler.finish(item.retriever)
                if session.trace is not None:
                    session.trace.retriever_done(item.retriever, error=str(item.error))
                continue
            name, event = item
            for ready in checks[name].accept(event):
                arrived = self._arrived(name, ready)
                if session.trace is not None:
                    session.trace.context_arrived(name, arrived.op, arrived.chars, arrived.final, arrived.seq)
                yield arrived
                await self._fold(session, name, ready)
        self.t_retrieved = time.monotonic()

    def _arrived(self, name: str, event: ContextEvent) -> ContextArrived:
        self.events += 1
        chars = len(event.text) if event.op is Op.APPEND else sum(len(d) for d in event.docs)
        return ContextArrived(
            name, event.seq, event.op.value, event.sources, chars, time.monotonic() - self.t0, event.final
        )

    async def _fold(self, session: Session, name: str, event: ContextEvent) -> None:
        """Hand the context as it now reads to the session. Whether that reaches the engine as an
        append (new tokens at the end) or an update is decided once, by handover's token diff."""
        if self.assembler.apply(name, _clipped(event, self.pipeline.max_doc_chars)) and self.assembler.body:
            await session.update(self.assembler.body)

    async def answer(self, session: Session) -> RagAnswer:
        result = await session.result()
        done = time.monotonic()
        return RagAnswer(
            question=self.question,
            text=result.text,
            sources=self.assembler.sources,
            mode=session.mode,
            timings={
                "retrieval_s": self.t_retrieved - self.t0,
                "ttft_final_s": result.ttft_final_s,
                "ttft_query_s": result.ttft_open_s,
                "total_s": done - self.t0,
            },
            prompt_tokens=len(result.prompt_token_ids),
            prompt_digest=result.computed_prompt_digest,
            tokens_prefilled=result.tokens_prefilled,
            tokens_recomputed=result.tokens_recomputed,
            events=self.events,
            errors=self.errors,
            failed=self.failed,
            context=self.assembler.body,
        )


def _clipped(event: ContextEvent, max_chars: int) -> ContextEvent:
    """Long pages would crowd everything else out of the context window; keep each one's head."""
    if event.op is Op.APPEND:
        return replace(event, payload=event.text[:max_chars]) if len(event.text) > max_chars else event
    return replace(event, payload=tuple(d[:max_chars] for d in event.docs))


def _default_layout() -> Layout:
    """Surviving documents keep their place, so an update invalidates as little KV as it can."""
    from stream2llm.context.layout import DEFAULT_LAYOUT, layout_named

    return layout_named(DEFAULT_LAYOUT)
