"""Bridges between LangChain retrievers and stream2llm's StreamingRetriever protocol.

- ``StreamingRetrieverAdapter`` (``as_langchain_retriever``): any streaming retriever as a LangChain
  ``BaseRetriever``. LangChain retrievers return one document list, so the stream is run to its end:
  the final document list of an update retriever, every page of an append retriever.
- ``OneShotStream``: any LangChain ``BaseRetriever`` as a streaming retriever that emits its whole
  result as one final update (no overlap, but it plugs into the same pipeline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from stream2llm.context.events import ContextEvent, Op
from stream2llm.retrievers.base import EventNumberer, StreamingRetriever

T = TypeVar("T")


class StreamingRetrieverAdapter(BaseRetriever):
    """A StreamingRetriever as a LangChain retriever (sync and async).

    ``k`` (constructor or ``invoke(..., k=n)``) caps the documents returned; retrievers whose
    ``stream`` takes ``k`` are asked for exactly that many.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Any
    k: int | None = None

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return _run_in_own_loop(self._collect(query, kwargs.get("k", self.k)))

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        return await self._collect(query, kwargs.get("k", self.k))

    async def _collect(self, query: str, k: int | None) -> list[Document]:
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive integer, got {k!r}")
        extra = {"k": k} if k is not None and _takes_k(self.retriever) else {}
        stream = self.retriever.stream(query, request_id=f"lc-{uuid.uuid4().hex[:12]}", **extra)
        docs: list[Document] = []
        try:
            async for event in stream:
                if event.op is Op.UPDATE:
                    docs = _update_documents(event)
                elif event.text.strip():
                    docs.append(_page_document(event))
        finally:
            await stream.aclose()
        return docs if k is None else docs[:k]


def as_langchain_retriever(retriever: StreamingRetriever, k: int | None = None) -> StreamingRetrieverAdapter:
    return StreamingRetrieverAdapter(retriever=retriever, k=k)


class OneShotStream:
    """A LangChain retriever as a StreamingRetriever: one final update with all its documents (an
    empty final append when it found nothing, since an update needs at least one document)."""

    mode = Op.UPDATE

    def __init__(self, retriever: BaseRetriever, *, name: str | None = None) -> None:
        if not isinstance(retriever, BaseRetriever):
            raise TypeError(f"OneShotStream wraps a LangChain BaseRetriever, got {type(retriever).__name__}")
        self.retriever = retriever
        self.name = name or retriever.get_name()

    async def stream(self, query: str, *, request_id: str = "") -> AsyncIterator[ContextEvent]:
        numberer = EventNumberer(request_id)
        found = await self.retriever.ainvoke(query)
        found = [d for d in found if d.page_content.strip()]
        if not found:
            yield numberer.end()
            return
        sources = tuple(str(d.id or d.metadata.get("source") or "") for d in found)
        yield numberer.update(
            [d.page_content for d in found], final=True, sources=sources if any(sources) else ()
        )


def _update_documents(event: ContextEvent) -> list[Document]:
    sources = event.sources or ("",) * len(event.docs)
    return [
        Document(page_content=text, id=source or None, metadata={"source": source, "seq": event.seq})
        for text, source in zip(event.docs, sources)
    ]


def _page_document(event: ContextEvent) -> Document:
    sources = list(event.sources)
    return Document(
        page_content=event.text.strip(),
        metadata={"source": sources[0] if len(sources) == 1 else sources, "seq": event.seq},
    )


def _takes_k(retriever: Any) -> bool:
    try:
        return "k" in inspect.signature(retriever.stream).parameters
    except (TypeError, ValueError):
        return False


def _run_in_own_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, in a worker thread with its own event loop,
    so it works whether or not the calling thread already runs a loop (and leaves that loop alone)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
