"""Context events: what a retriever emits and the context assembler turns into engine input."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from stream2llm.errors import InvalidEvent


class Op(str, Enum):
    """How an event changes a request's context."""

    APPEND = "append"  # add text after what was sent (crawler pages)
    UPDATE = "update"  # replace the context (ANN top-k refined)


@dataclass(frozen=True)
class ContextEvent:
    """One piece of retrieved context for one request.

    ``payload`` is the text to append (APPEND) or the new document list (UPDATE). ``seq`` numbers a
    request's events from 0 so that reordering and duplicates are caught. ``t`` is when the
    retriever produced it (``time.monotonic()``).
    """

    request_id: str
    seq: int
    op: Op
    payload: str | tuple[str, ...]
    final: bool = False
    t: float = field(default_factory=time.monotonic)
    sources: tuple[str, ...] = ()  # where it came from: the page URL (append) or one id per document (update)

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", _coerce_op(self.op))
        if not isinstance(self.seq, int) or self.seq < 0:
            raise InvalidEvent(f"event seq must be a non-negative integer, got {self.seq!r}")
        if self.op is Op.APPEND:
            if not isinstance(self.payload, str):
                raise InvalidEvent(f"append event {self.seq} needs text, got {type(self.payload).__name__}")
            if not self.payload and not self.final:
                raise InvalidEvent(f"append event {self.seq} of {self.request_id!r} is empty")
        else:
            docs = self.payload
            if isinstance(docs, str) or not isinstance(docs, Sequence):
                raise InvalidEvent(f"update event {self.seq} needs a list of documents")
            docs = tuple(docs)
            if not all(isinstance(d, str) for d in docs):
                raise InvalidEvent(f"update event {self.seq}: every document must be text")
            if not any(d.strip() for d in docs):
                raise InvalidEvent(f"update event {self.seq} of {self.request_id!r} has no document text")
            object.__setattr__(self, "payload", docs)
            if self.sources and len(self.sources) != len(docs):
                raise InvalidEvent(
                    f"update event {self.seq}: {len(self.sources)} sources for {len(docs)} documents"
                )
        object.__setattr__(self, "sources", tuple(self.sources))

    @property
    def text(self) -> str:
        if self.op is not Op.APPEND:
            raise InvalidEvent("only append events carry text")
        return str(self.payload)

    @property
    def docs(self) -> tuple[str, ...]:
        if self.op is not Op.UPDATE:
            raise InvalidEvent("only update events carry documents")
        return tuple(self.payload)


def _coerce_op(op: Op | str) -> Op:
    try:
        return Op(op)
    except ValueError:
        raise InvalidEvent(f"unknown op {op!r}; expected 'append' or 'update'") from None
