"""The packaged retrievers, ready to use: what ``run``, ``capture`` and ``demo`` stream from.

``ann`` is progressive FAISS search over the packaged Wikipedia index (built on first use);
``crawl`` is a focused scrapy crawl, of the seed URLs given or, without any, of the pygame docs
served on loopback (the only site reachable offline).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from stream2llm.retrievers.base import StreamingRetriever

RETRIEVERS = ("ann", "crawl")


@dataclass(frozen=True)
class SourceOptions:
    """How to set up the packaged retrievers (CLI options map onto these)."""

    seed_urls: tuple[str, ...] = ()
    allow_private: bool = (
        False  # crawl private/loopback hosts (the packaged local site's host:port always may)
    )
    max_pages: int = 12
    crawl_timeout_s: float = 30.0
    crawl_delay_s: float = 0.0  # politeness: seconds between requests to one site
    index: str | None = None  # an index directory; default: the packaged Wikipedia index
    index_docs: int | None = None  # build the default index from this many articles (small, fast)
    k: int = 6
    nprobe: int = 32
    stages: int = 4
    min_stage_s: float = 0.0  # pace the ANN stages (a slow pipeline, for demos)


def parse_retrievers(spec: str | Sequence[str]) -> list[str]:
    """``"ann,crawl"`` or a list -> validated retriever names, in order, without repeats."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in RETRIEVERS]
    if unknown or not names:
        raise ValueError(f"unknown retriever {unknown or spec!r}; expected any of {', '.join(RETRIEVERS)}")
    return list(dict.fromkeys(names))


def index_name(options: SourceOptions) -> str:
    from stream2llm.retrievers.ann_index import DEFAULT_INDEX

    return DEFAULT_INDEX if options.index_docs is None else f"{DEFAULT_INDEX}-{options.index_docs}"


def load_index(options: SourceOptions, *, progress: bool = True):
    """The index named by the options; the packaged one is built (and cached) on first use."""
    from stream2llm.retrievers import ann_index

    if options.index:
        return ann_index.AnnIndex.load(options.index)
    name = index_name(options)
    path = ann_index.default_index_dir(name)
    if (path / "meta.json").is_file():
        return ann_index.AnnIndex.load(path)
    # IVF even when small: its probe lists are what the progressive search streams over
    index = ann_index.build_wiki_index(options.index_docs, kind="ivf", name=name, progress=progress)
    index.save(path)
    return index


def ann_retriever(options: SourceOptions, *, progress: bool = True) -> StreamingRetriever:
    from stream2llm.retrievers.faiss_ann import ProgressiveAnnRetriever

    return ProgressiveAnnRetriever(
        load_index(options, progress=progress),
        k=options.k,
        nprobe=options.nprobe,
        stages=options.stages,
        min_stage_s=options.min_stage_s,
        name="ann",
    )


@contextlib.asynccontextmanager
async def open_retrievers(
    names: Sequence[str], options: SourceOptions | None = None, *, progress: bool = True
) -> AsyncIterator[list[StreamingRetriever]]:
    """The named retrievers, with whatever they need running (the local site) for the block's length."""
    options = options or SourceOptions()
    async with contextlib.AsyncExitStack() as stack:
        retrievers: list[StreamingRetriever] = []
        for name in parse_retrievers(names):
            if name == "ann":
                retrievers.append(await asyncio.to_thread(ann_retriever, options, progress=progress))
            else:
                retrievers.append(await _crawl_retriever(options, stack))
        yield retrievers


async def _crawl_retriever(options: SourceOptions, stack: contextlib.AsyncExitStack) -> StreamingRetriever:
    from stream2llm.retrievers.crawler import CrawlConfig, CrawlRetriever

    seeds, own_site = options.seed_urls, frozenset()
    if not seeds:
        from urllib.parse import urlsplit

        from stream2llm.retrievers.local_site import serve_site

        base = await stack.enter_async_context(serve_site())
        seeds, address = (base + "index.html",), urlsplit(base)
        own_site = frozenset({(address.hostname, address.port)})  # our own loopback site, nothing else
    config = CrawlConfig(
        max_pages=options.max_pages,
        crawl_timeout=options.crawl_timeout_s,
        download_delay=options.crawl_delay_s,
        allow_private=options.allow_private,
        allowed_private_hosts=own_site,
    )
    return CrawlRetriever(seeds, config=config)
