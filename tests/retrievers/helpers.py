"""A small real index shared by the retriever tests: built once, then kept in the stream2llm cache
directory under a key of its parameters, the embedder and the code that builds it (so a change to
that code builds it again). Embedding 600 articles takes ~15 s on an idle 2-core box
and minutes on a busy one; ``test_build_*`` still builds small indexes from scratch every run."""

from __future__ import annotations

import functools
import hashlib
import inspect
from pathlib import Path

import faiss

from stream2llm.retrievers import ann_index, corpus
from stream2llm.retrievers.ann_index import AnnIndex, AnnIndexError, build_wiki_index, default_index_dir

ARTICLES = 600  # spread over the 10,033 articles
NLIST = 12  # ~50 vectors a list, so nprobe 8 in 4 stages (1, 2, 4, 8 lists) really refines
NPROBE = 8


def _cache_key() -> str:
    embedder = corpus.default_embedder()
    h = hashlib.sha256(f"{ARTICLES}:{NLIST}:{embedder.fingerprint}:{faiss.__version__}".encode())
    h.update(Path(corpus.__file__).read_bytes())
    for builder in (ann_index.AnnIndex.build, ann_index.build_wiki_index, ann_index._make_index):
        h.update(inspect.getsource(builder).encode())
    return h.hexdigest()[:16]


@functools.cache
def small_index() -> AnnIndex:
    path = default_index_dir(f"test-wiki-{ARTICLES}-{_cache_key()}")
    try:
        return AnnIndex.load(path)
    except AnnIndexError:
        index = build_wiki_index(ARTICLES, kind="ivf", nlist=NLIST, name="test-wiki")
        index.save(path)
        return index
