"""FAISS ANN search as streaming retrievers (the index itself: ``ann_index``).

``ProgressiveAnnRetriever`` turns one IVF search into a stream of refinements (update mode): the
coarse quantizer runs once for ``nprobe`` lists, then growing slices of that probe list are scanned
with ``search_preassigned`` and merged in a ``faiss.ResultHeap``; each slice emits the current top-k.
The final top-k equals a one-shot search at the same ``nprobe``. ``ShardedAnnRetriever`` searches
shards one after the other and appends each shard's new documents (append mode).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from stream2llm.context.events import ContextEvent, Op
from stream2llm.context.layout import UpdateLayout, layout_named
from stream2llm.context.prompt import DOC_SEPARATOR
from stream2llm.retrievers.ann_index import AnnIndex, AnnIndexError, EmbedderMismatch, Hit, check_k
from stream2llm.retrievers.base import EventNumberer
from stream2llm.tokens import ceil_div

if TYPE_CHECKING:
    import numpy as np


class ProgressiveSearch:
    """One query's IVF search, done a probe-list slice at a time (every method runs in a worker
    thread: FAISS releases the GIL). Owns its heap, so concurrent queries never share state."""

    def __init__(self, index: AnnIndex, q: np.ndarray, k: int, nprobe: int) -> None:
        import faiss

        self.index, self.q, self.k = index, q, k
        if index.kind == "ivf":
            self.nprobe = max(1, min(nprobe, index.meta.nlist))
            self.Dq, self.Iq = faiss.extract_index_ivf(index.index).quantizer.search(q, self.nprobe)
        else:
            self.nprobe = 1
        self.heap = faiss.ResultHeap(1, k, keep_max=True)

    def probe(self, start: int, stop: int) -> list[Hit]:
        """Scan probe lists [start, stop) and return the merged top-k so far."""
        if self.index.kind == "ivf":
            scores, ids = self._search_preassigned(start, stop)
        else:
            scores, ids = self.index.index.search(self.q, self.k)
        self.heap.add_result(scores, ids)
        return self.index.hits(self.heap.D[0].copy(), self.heap.I[0].copy())

    def _search_preassigned(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss
        import numpy as np

        ivf = faiss.extract_index_ivf(self.index.index)
        Iq = np.ascontiguousarray(self.Iq[:, start:stop])
        Dq = np.ascontiguousarray(self.Dq[:, start:stop])
        if self.index.index is not self.index.cpu_index:  # pragma: no cover - GPU index (faiss-gpu)
            with self.index._gpu_lock:
                ivf.nprobe = stop - start
                return ivf.search_preassigned(self.q, self.k, Iq, Dq)
        # The Python wrapper of search_preassigned reads index.nprobe (shared by every thread);
        # the C++ call takes it in per-call parameters instead.
        scores = np.empty((1, self.k), dtype=np.float32)
        ids = np.empty((1, self.k), dtype=np.int64)
        params = faiss.SearchParametersIVF(nprobe=stop - start)
        ivf.search_preassigned_c(
            1, faiss.swig_ptr(self.q), self.k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq),
            faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params,
        )  # fmt: skip
        return scores, ids


def stage_bounds(nprobe: int, stages: int) -> list[int]:
    """Ends of the probe-list slices: doubling up to ``nprobe`` (32, 4 stages: 4, 8, 16, 32)."""
    if stages < 1:
        raise ValueError(f"stages must be at least 1, got {stages}")
    bounds = {max(1, ceil_div(nprobe, 2 ** (stages - 1 - i))) for i in range(stages)}
    return sorted(bounds)


class StagePacer:
    """Holds each search stage to at least ``min_stage_s`` from the end of the one before (a
    slower, remote index simulated); 0 paces nothing."""

    def __init__(self, min_stage_s: float) -> None:
        self.min_stage_s = min_stage_s
        self._stage_started = time.monotonic()

    async def stage_done(self) -> None:
        if self.min_stage_s:
            await asyncio.sleep(max(0.0, self._stage_started + self.min_stage_s - time.monotonic()))
        self._stage_started = time.monotonic()


async def _start_stream(
    index: AnnIndex, query: str, k: int, request_id: str, min_stage_s: float
) -> tuple[EventNumberer, StagePacer, np.ndarray]:
    """How both retrievers' streams begin: ``k`` refused before any work, and the stage clock
    started before the query is embedded (embedding is part of the first stage's time)."""
    check_k(k)
    numberer = EventNumberer(request_id)
    pacer = StagePacer(min_stage_s)
    return numberer, pacer, await asyncio.to_thread(index.embed_query, query)


class ProgressiveAnnRetriever:
    """Update-mode retriever: each probe slice refines the top-k; the last event is the answer a
    one-shot search at ``nprobe`` gives. A flat index has a single (final) stage.

    ``layout``: ``"stable"`` keeps surviving documents in place across updates (longer KV prefix
    reuse), ``"score"`` sends each top-k best first. ``min_stage_s`` paces stages for demos.
    """

    mode = Op.UPDATE

    def __init__(
        self,
        index: AnnIndex,
        *,
        k: int = 8,
        nprobe: int = 32,
        stages: int = 4,
        min_stage_s: float = 0.0,
        layout: str = "stable",
        name: str = "faiss-ann",
    ) -> None:
        check_k(k)
        layout_named(layout)  # validates
        if min_stage_s < 0:
            raise ValueError(f"min_stage_s must be >= 0, got {min_stage_s}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        self.index, self.k, self.nprobe, self.stages = index, k, nprobe, stages
        self.min_stage_s, self.layout, self.name = min_stage_s, layout, name
        stage_bounds(nprobe, stages)  # validates

    def bounds(self) -> list[int]:
        if self.index.kind != "ivf":
            return [1]
        return stage_bounds(min(self.nprobe, self.index.meta.nlist), self.stages)

    def search(self, query: str, *, k: int | None = None) -> list[Hit]:
        """One-shot search with the same parameters (what the stream's last event holds)."""
        return self.index.search(query, k or self.k, self.nprobe)

    async def stream(
        self, query: str, *, request_id: str = "", k: int | None = None
    ) -> AsyncIterator[ContextEvent]:
        k = k or self.k
        numberer, pacer, q = await _start_stream(self.index, query, k, request_id, self.min_stage_s)
        layout = UpdateLayout(self.layout)
        search = await asyncio.to_thread(ProgressiveSearch, self.index, q, k, self.nprobe)
        bounds = self.bounds()
        start = 0
        for i, stop in enumerate(bounds):
            hits = await asyncio.to_thread(search.probe, start, stop)
            start = stop
            final = i == len(bounds) - 1
            await pacer.stage_done()
            if not hits:
                if final:
                    raise AnnIndexError(f"the index {self.index.meta.name!r} returned no documents")
                continue
            hits = layout.arrange_by(hits, key=lambda h: h.doc.id)
            yield numberer.update(
                [h.doc.render() for h in hits], final=final, sources=tuple(h.doc.id for h in hits)
            )


class ShardedAnnRetriever:
    """Append-mode retriever over shards searched one after the other (as remote shards would
    answer): after each shard, the documents of that shard that entered the merged top-k are
    appended. Documents never leave the context once sent."""

    mode = Op.APPEND

    def __init__(
        self,
        shards: Sequence[AnnIndex],
        *,
        k: int = 8,
        nprobe: int = 32,
        min_stage_s: float = 0.0,
        name: str = "faiss-shards",
    ) -> None:
        check_k(k)
        if not shards:
            raise ValueError("ShardedAnnRetriever needs at least one shard")
        prints = {s.embedder.fingerprint for s in shards}
        if len(prints) != 1:
            raise EmbedderMismatch(f"shards were built with different embedders: {sorted(prints)}")
        self.shards, self.k, self.nprobe = list(shards), k, nprobe
        self.min_stage_s, self.name = min_stage_s, name

    @classmethod
    def from_index(cls, index: AnnIndex, n_shards: int, **kwargs: Any) -> ShardedAnnRetriever:
        return cls(index.split(n_shards), **kwargs)

    async def stream(
        self, query: str, *, request_id: str = "", k: int | None = None
    ) -> AsyncIterator[ContextEvent]:
        import faiss
        import numpy as np

        k = k or self.k
        numberer, pacer, q = await _start_stream(self.shards[0], query, k, request_id, self.min_stage_s)
        heap = faiss.ResultHeap(1, k, keep_max=True)
        offsets = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        sent: set[int] = set()
        for i, shard in enumerate(self.shards):
            hits = await asyncio.to_thread(shard.search_vector, q, k, self.nprobe)
            rows = [h.row + offsets[i] for h in hits]
            heap.add_result(
                np.array([[h.score for h in hits]], dtype=np.float32), np.array([rows], dtype=np.int64)
            )
            top = set(heap.I[0].tolist())
            new = [h for h, row in zip(hits, rows) if row in top and row not in sent]
            final = i == len(self.shards) - 1
            await pacer.stage_done()
            if not new and not final:
                continue
            text = DOC_SEPARATOR.join(h.doc.render() for h in new)
            if text and sent:
                text = DOC_SEPARATOR + text  # pages are concatenated: separate them from what was sent
            sent.update(row for h, row in zip(hits, rows) if h in new)
            yield numberer.append(text, final=final, sources=tuple(h.doc.id for h in new))
