"""Record real retrieval as traces: every event's time (from the query's arrival) and payload.

The published system replayed traces but never shipped what collected them; ``capture`` runs our
retrievers on a list of queries and writes ``stream2llm.trace/1`` lines that ``bench`` replays.
Queries run one at a time by default so that the recorded gaps are the retriever's own, not
contention between captures.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from stream2llm.context.events import ContextEvent, Op
from stream2llm.retrievers.base import StreamingRetriever
from stream2llm.workloads.trace import TraceError, TraceEvent, TraceRequest, write_trace


def read_queries(path: str | Path) -> list[str]:
    """Queries from a text file (one a line) or JSON Lines (``{"query": ...}`` or ``{"question": ...}``)."""
    queries = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            line = obj.get("query") or obj.get("question")
            if not isinstance(line, str) or not line.strip():
                raise TraceError(f"{path}:{lineno}: needs a non-empty 'query' or 'question' field")
        queries.append(line)
    if not queries:
        raise TraceError(f"{path}: no queries")
    return queries


def _trace_event(event: ContextEvent, t: float) -> TraceEvent:
    if event.op is Op.APPEND:
        return TraceEvent(t, "append", text=event.text)
    return TraceEvent(t, "update", docs=event.docs)


async def capture_one(
    retriever: StreamingRetriever, query: str, request_id: str, workload: str
) -> TraceRequest:
    """Run one query and record its events, timed from when the query was handed over."""
    t0 = time.monotonic()
    events: list[TraceEvent] = []
    async for event in retriever.stream(query, request_id=request_id):
        t = max(event.t - t0, events[-1].t if events else 0.0)
        events.append(_trace_event(event, t))
    if not events:
        raise TraceError(f"retriever {retriever.name!r} emitted nothing for {query!r}")
    return TraceRequest(id=request_id, workload=workload, query=query, events=tuple(events))


async def capture(
    retriever: StreamingRetriever,
    queries: Sequence[str],
    out: str | Path,
    *,
    workload: str | None = None,
    concurrency: int = 1,
    on_done: Callable[[TraceRequest], None] | None = None,
) -> list[TraceRequest]:
    """Capture every query (``concurrency`` at a time) and write the trace file in query order."""
    workload = workload or retriever.name
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, query: str) -> TraceRequest:
        async with gate:
            request = await capture_one(retriever, query, f"{workload}-{i:05d}", workload)
        if on_done:
            on_done(request)
        return request

    requests = list(await asyncio.gather(*(one(i, q) for i, q in enumerate(queries))))
    write_trace(out, requests)
    return requests
