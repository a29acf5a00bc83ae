"""The StreamingRetriever protocol: retrieval that emits context the moment it has some.

A retriever turns one query into an async stream of ``ContextEvent``s for one request id:
``seq`` counts from 0, every event carries ``t`` (``time.monotonic()`` when it was produced), and the
last event has ``final=True`` (an empty final append is allowed when the end is only known after the
last page). Append retrievers (a crawler) add text; update retrievers (progressive ANN search) replace
the document list. Cancelling the iteration (``aclose`` or task cancellation) must stop the
retrieval work and release its resources.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from stream2llm.context.events import ContextEvent, Op


@runtime_checkable
class StreamingRetriever(Protocol):
    """Anything with ``stream(query, request_id=...)`` yielding ContextEvents."""

    name: str
    mode: Op  # APPEND or UPDATE: how its events change the context

    def stream(self, query: str, *, request_id: str = "") -> AsyncIterator[ContextEvent]: ...


class EventNumberer:
    """Hands out a request's ContextEvents with consecutive ``seq`` numbers (one per retrieval)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._seq = itertools.count()

    def append(
        self, text: str, *, final: bool = False, source: str = "", sources: tuple[str, ...] = ()
    ) -> ContextEvent:
        """An append of ``text``: from one ``source`` (a page) or several ``sources`` (a shard's hits)."""
        return ContextEvent(
            self.request_id,
            next(self._seq),
            Op.APPEND,
            text,
            final=final,
            sources=((source,) if source else ()) + tuple(sources),
        )

    def update(
        self, docs: tuple[str, ...] | list[str], *, final: bool = False, sources: tuple[str, ...] = ()
    ) -> ContextEvent:
        return ContextEvent(
            self.request_id, next(self._seq), Op.UPDATE, tuple(docs), final=final, sources=sources
        )

    def end(self) -> ContextEvent:
        """An empty final append: the retrieval ended after its last piece was already sent."""
        return ContextEvent(self.request_id, next(self._seq), Op.APPEND, "", final=True)
