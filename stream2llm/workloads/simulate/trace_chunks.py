"""What the simulator replays of a trace request: the chunks its session hands the engine, when
each becomes schedulable, the prompt's length after it and how much computed KV it keeps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from stream2llm.workloads.synth import FILLER_PREFIX
from stream2llm.workloads.trace import TraceRequest

TEMPLATE_TOKENS = 40  # instructions, question and answer cue around the context


class Chunk(NamedTuple):
    at: float  # when the engine can schedule it
    target: int  # the prompt's length after it
    keep: int  # tokens of computed KV it keeps (an update: up to the first changed document)
    replaces: bool  # an update: it replaces the context
    final: bool = False  # the last event's: the stream is complete once it is seen


def _token_length(event_docs: Sequence[str] | None, n_tokens: int | None, text: str | None) -> int:
    if n_tokens is not None:
        return n_tokens
    if event_docs is not None:
        total = 0
        for doc in event_docs:
            total += int(doc.rsplit(":", 1)[1]) if doc.startswith(FILLER_PREFIX) else max(1, len(doc) // 4)
        return total
    return max(1, len(text or "") // 4)


def trace_chunks(
    request: TraceRequest,
    arrival: float,
    scale: float,
    delay: float,
    cap: int,
    handoff: Callable[[int], float],
) -> list[Chunk]:
    """(time the engine can schedule it, prompt length after it, tokens kept) for the session's
    opening (the template, sent at open, as the engine's sessions do) and per event: appends
    keep everything; an update keeps the documents before the first one that changed (the longest
    common prefix). ``handoff`` is the front end's delay for the tokens it tokenizes: an append's
    own, an update's and the final event's whole prompt (re-tokenized, as one-shot would be)."""
    opening = Chunk(arrival + handoff(TEMPLATE_TOKENS), TEMPLATE_TOKENS, cap, False)
    out, total, previous = [opening], TEMPLATE_TOKENS, ()
    last = len(request.events) - 1
    for i, event in enumerate(request.events):
        t = arrival + event.t * delay
        if event.op == "append":
            added = max(1, round(_token_length(None, event.n_tokens, event.text) * scale))
            total += added
            at = t + handoff(total if i == last else added)  # the final event re-tokenizes everything
            out.append(Chunk(at, min(total, cap), cap, False, i == last))
            continue
        docs = tuple(event.docs or ())
        sizes = [max(1, round(_token_length((d,), None, None) * scale)) for d in docs]
        keep = TEMPLATE_TOKENS // 2
        for old, new, size in zip(previous, docs, sizes):
            if old != new:
                break
            keep += size
        total = TEMPLATE_TOKENS + sum(sizes)
        out.append(Chunk(t + handoff(total), min(total, cap), min(keep, cap), True, i == last))
        previous = docs
    return out
