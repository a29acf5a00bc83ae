"""From retriever event streams to one request's context: ordering, merging, back-pressure, layout.

Several retrievers may feed one request (e.g. an ANN search that refines a top-k and a crawler that
appends pages). Each keeps its own ``seq`` numbering; ``merge`` interleaves their events as they come,
``SequenceCheck`` puts each retriever's events in order (late ones are held until the gap closes,
duplicates are dropped and counted), and ``ContextAssembler`` keeps one section per retriever and
renders the whole context body after every event. The engine works out what changed (an extension is
prefilled as an append, anything else as an update that keeps KV up to the longest common prefix), so
the assembler only has to keep the text stable where it can: sections stay in the order the retrievers
were given, and an update section keeps surviving documents in place (``layout``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from stream2llm.context.events import ContextEvent, Op
from stream2llm.context.prompt import DOC_SEPARATOR
from stream2llm.errors import InvalidEvent, SequenceError

# (previous documents in their current order, new documents in score order) -> new order
Layout = Callable[[Sequence[str], Sequence[str]], list[str]]


def score_order(previous: Sequence[str], new: Sequence[str]) -> list[str]:
    """The documents as the retriever ranked them (what a naive assembler sends)."""
    return list(new)


@dataclass(frozen=True)
class RetrieverFailed:
    """A retriever's stream raised: the others go on, and the request keeps what arrived."""

    retriever: str
    error: BaseException


class SequenceCheck:
    """One request's (or one retriever's) ``seq`` rule: events are numbered from 0, each once, and
    none comes after the final one.

    Two ways to apply it: ``accept`` puts events in order (late ones wait until the gap closes,
    duplicates are dropped and counted): for retriever streams merged as they come. ``expect`` and
    ``advance`` reject what is not the next event: for a caller that pushes events one by one and
    must hear at once that it skipped or repeated one (``Session.push``)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_seq = 0
        self.duplicates = 0
        self.finished = False
        self._held: dict[int, ContextEvent] = {}

    def _check(self, event: ContextEvent) -> bool:
        """Whether ``event`` is new (else a duplicate); raises for another request or after the final."""
        if event.request_id != self.request_id:
            raise InvalidEvent(f"event for {event.request_id!r} in the stream of {self.request_id!r}")
        if self.finished:
            raise SequenceError(f"event {event.seq} for {self.request_id!r} after its final event")
        return event.seq >= self.next_seq and event.seq not in self._held

    def accept(self, event: ContextEvent) -> list[ContextEvent]:
        """The events that are now in order (possibly none, possibly several held ones)."""
        if not self._check(event):
            self.duplicates += 1
            return []
        self._held[event.seq] = event
        ready = []
        while self.next_seq in self._held and not self.finished:
            ready.append(self._held.pop(self.next_seq))
            self.advance(ready[-1])
        return ready

    def expect(self, event: ContextEvent) -> None:
        """Raise SequenceError unless ``event`` is the next one; ``advance`` once it was applied."""
        if not self._check(event):
            raise SequenceError(
                f"duplicate event {event.seq} for {self.request_id!r} (next is {self.next_seq})"
            )
        if event.seq > self.next_seq:
            raise SequenceError(
                f"out-of-order event {event.seq} for {self.request_id!r}: expected {self.next_seq}"
            )

    def advance(self, event: ContextEvent) -> None:
        """``event``, the next one, was applied."""
        self.next_seq = event.seq + 1
        self.finished = event.final

    @property
    def waiting(self) -> int:
        """Events held back because an earlier one has not come."""
        return len(self._held)


async def merge(
    streams: Mapping[str, AsyncIterator[ContextEvent]], *, max_pending: int = 64
) -> AsyncIterator[tuple[str, ContextEvent] | RetrieverFailed]:
    """Interleave several retrievers' events as they arrive.

    A bounded queue gives back-pressure: a retriever that runs ahead of the consumer waits instead of
    piling up memory. A failing retriever yields ``RetrieverFailed`` and the rest continue. Closing the
    merged stream cancels every retriever."""
    queue: asyncio.Queue[tuple[str, ContextEvent] | RetrieverFailed | None] = asyncio.Queue(max_pending)

    async def pump(name: str, stream: AsyncIterator[ContextEvent]) -> None:
        try:
            async for event in stream:
                await queue.put((name, event))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(RetrieverFailed(name, exc))
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
        await queue.put(None)  # not when cancelled: nobody reads the queue any more

    tasks = [asyncio.create_task(pump(name, stream)) for name, stream in streams.items()]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Section:
    docs: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    final: bool = False


class ContextAssembler:
    """One request's context from several retrievers, one section per retriever in the given order."""

    def __init__(self, retrievers: Sequence[str], *, layout: Layout = score_order) -> None:
        if len(set(retrievers)) != len(retrievers):
            raise InvalidEvent(f"retriever names must be distinct, got {list(retrievers)}")
        self._sections = {name: _Section() for name in retrievers}
        self._layout = layout

    def apply(self, retriever: str, event: ContextEvent) -> bool:
        """Fold an event into the retriever's section; True when the context text changed."""
        section = self._sections[retriever]
        before = list(section.docs)
        if event.op is Op.APPEND:
            if event.text:
                section.docs.append(event.text)
                section.sources.append(event.sources[0] if event.sources else "")
        else:
            self._replace(section, event)
        section.final = section.final or event.final
        return section.docs != before

    def _replace(self, section: _Section, event: ContextEvent) -> None:
        sources = dict(zip(event.docs, event.sources or [""] * len(event.docs)))
        section.docs = self._layout(section.docs, list(sources))  # a repeated document counts once
        section.sources = [sources.get(doc, "") for doc in section.docs]

    def finish(self, retriever: str) -> None:
        """The retriever ended (or failed): its section is as final as it will get."""
        self._sections[retriever].final = True

    @property
    def complete(self) -> bool:
        return all(s.final for s in self._sections.values())

    @property
    def body(self) -> str:
        return DOC_SEPARATOR.join(doc for s in self._sections.values() for doc in s.docs)

    @property
    def sources(self) -> list[str]:
        return [src for s in self._sections.values() for src in s.sources if src]

    @property
    def documents(self) -> int:
        return sum(len(s.docs) for s in self._sections.values())
