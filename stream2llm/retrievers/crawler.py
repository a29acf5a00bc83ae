"""A focused web crawler (scrapy, reactorless inside asyncio) that emits each page as it is parsed.

``CrawlRetriever.stream(query)`` starts a scrapy crawl from seed URLs (given, or from a search hook),
follows the links whose text and URL share the most words with the query first (request priority),
and yields one APPEND event per page the moment scrapy scrapes it: the page title, then its main text
(Sphinx's main body; generically the body without nav/header/footer/script/style). An empty final
append marks the end of the crawl. Pages come once (scrapy's request fingerprints, plus a hash of the
text); limits bound pages, depth, bytes per page and in total, and time.

Safety (``crawl_guard``, ``crawl_download``): only http(s) URLs are fetched (scrapy's file, data, s3
and ftp handlers are off); each host is resolved once per crawl and the downloader connects only to
the addresses checked then; private, loopback, link-local and other non-global addresses are refused
unless ``allow_private=True`` or the exact ``(host, port)`` is in ``allowed_private_hosts``; every hop
(redirects, meta refreshes, robots.txt) is checked before it is sent; proxy environment variables
are ignored. Links per page, requests, bytes per page and bytes per crawl are capped.

Scrapy runs without a Twisted reactor (``TWISTED_REACTOR_ENABLED=False``), so any number of crawls can
run one after another, or at once, in one asyncio process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import heapq
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urldefrag, urlsplit

from stream2llm.context.events import ContextEvent, Op
from stream2llm.retrievers.base import EventNumberer
from stream2llm.retrievers.crawl_guard import (
    SCHEMES,
    AddressGuard,
    BlockedURL,
    HostKey,
    Resolve,
    blocked_reason,
    check_url,
)

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

__all__ = [  # the guard's names stay importable from here
    "BlockedURL",
    "CrawlConfig",
    "CrawlRetriever",
    "Page",
    "blocked_reason",
    "check_url",
    "extract_page",
    "link_score",
    "query_terms",
]

SearchHook = Callable[[str], Awaitable[Sequence[str]]]
"""A search provider: query -> seed URLs (e.g. a web search API); awaited once per ``stream``."""

_SCRAPY_LOGGERS = ("scrapy", "stream2llm-crawl", "protego")
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it of on or the to what when where which "  # noqa: SIM905
    "who why with you your".split()
)
# Chrome and layout that is never page content, dropped before reading the text.
_DROP_TAGS = ("script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form")
_DROP_XPATH = (  # relative to the main element
    ".//*[@role='navigation' or @role='banner' or @role='contentinfo' or @role='search'"
    " or contains(concat(' ', normalize-space(@class), ' '), ' headerlink ')"
    " or contains(concat(' ', normalize-space(@class), ' '), ' sphinxsidebar ')]"
)
# Where the main text lives, best first (Sphinx: div[role=main] / div.body).
_MAIN_XPATHS = ("//main", "//*[@role='main']", "//article", "//div[contains(@class,'body')]", "//body")
_BLOCK_TAGS = frozenset(
    "address article blockquote br dd div dl dt figcaption figure h1 h2 h3 h4 h5 h6 hr li main ol p pre "  # noqa: SIM905
    "section table tr ul".split()
)
# queue sentinels: the crawl task ended; crawl_timeout passed; max_total_bytes received
_CRAWL_DONE, _TIME_UP, _BUDGET_SPENT = object(), object(), object()
_BACKGROUND: set[asyncio.Task[Any]] = set()  # stops still finishing after their stream was closed


@dataclass(frozen=True)
class CrawlConfig:
    """Limits and manners of one crawl. Defaults suit a query-time crawl of a few pages."""

    max_pages: int = 20  # pages emitted, at most
    max_depth: int = 3  # link hops from a seed (0: the seeds only)
    max_page_bytes: int = 2 << 20  # a larger response is cancelled (scrapy DOWNLOAD_MAXSIZE)
    max_total_bytes: int = 32 << 20  # the crawl ends once all its response bodies add up to this
    max_links_per_page: int = 200  # links followed from one page (the best-scored ones)
    max_requests: int = 1000  # requests the crawl sends (redirects and robots.txt included)
    download_timeout: float = 10.0  # per request, seconds
    crawl_timeout: float | None = 60.0  # the whole crawl, seconds; None: no limit
    download_delay: float = 0.0  # politeness: seconds between requests to one domain
    autothrottle: bool = False  # adapt the delay to the server's latency (scrapy AutoThrottle)
    concurrency: int = 16  # requests in flight, all domains
    concurrency_per_domain: int = 8
    retries: int = 0  # a retry would multiply the wait on a slow page; off by default
    obey_robots: bool = True
    allow_private: bool = False  # allow private/loopback/link-local addresses (never other schemes)
    allowed_private_hosts: frozenset[HostKey] = frozenset()  # (host, port) allowed to be private
    same_domain: bool = True  # follow links only within the seeds' domains
    stop_grace: float = 1.0  # seconds a closed stream waits for in-flight requests before leaving them
    search_timeout: float = 10.0  # seconds the search hook may take
    user_agent: str = "stream2llm-crawler/0.1"
    log_level: int | str = logging.ERROR  # scrapy's loggers; raise to INFO/DEBUG to watch it work
    resolve: Resolve | None = None  # host, port -> addresses; the system resolver when None
    settings: Mapping[str, Any] = field(default_factory=dict)  # extra scrapy settings, applied last

    def __post_init__(self) -> None:
        for name in (
            "max_pages",
            "max_page_bytes",
            "max_total_bytes",
            "max_links_per_page",
            "max_requests",
            "concurrency",
            "concurrency_per_domain",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"CrawlConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_depth", "retries", "download_delay", "stop_grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"CrawlConfig.{name} must not be negative, got {getattr(self, name)}")
        if (
            self.download_timeout <= 0
            or self.search_timeout <= 0
            or (self.crawl_timeout is not None and self.crawl_timeout <= 0)
        ):
            raise ValueError("CrawlConfig timeouts must be positive")
        hosts = frozenset((str(h).lower(), int(p)) for h, p in self.allowed_private_hosts)
        object.__setattr__(self, "allowed_private_hosts", hosts)

    def guard(self) -> AddressGuard:
        """A fresh address guard for one crawl (its DNS answers are pinned for that crawl only)."""
        return AddressGuard(
            allow_private=self.allow_private,
            allowed_private_hosts=self.allowed_private_hosts,
            resolve=self.resolve,
        )

    def scrapy_settings(self, guard: AddressGuard | None = None) -> dict[str, Any]:
        """The scrapy settings that implement this config (reactorless, quiet, guarded)."""
        handler = "stream2llm.retrievers.crawl_download.GuardedDownloadHandler"
        return {
            "TWISTED_REACTOR_ENABLED": False,
            "ROBOTSTXT_OBEY": self.obey_robots,
            "USER_AGENT": self.user_agent,
            "DOWNLOAD_TIMEOUT": self.download_timeout,
            "DOWNLOAD_MAXSIZE": self.max_page_bytes,
            "DOWNLOAD_WARNSIZE": self.max_page_bytes // 2,
            "DOWNLOAD_DELAY": self.download_delay,
            "AUTOTHROTTLE_ENABLED": self.autothrottle,
            "AUTOTHROTTLE_START_DELAY": max(self.download_delay, 0.5),  # scrapy's default is 5 s
            "AUTOTHROTTLE_MAX_DELAY": max(self.download_timeout, self.download_delay),
            "CONCURRENT_REQUESTS": self.concurrency,
            "CONCURRENT_REQUESTS_PER_DOMAIN": self.concurrency_per_domain,
            "RETRY_ENABLED": self.retries > 0,
            "RETRY_TIMES": self.retries,
            "REDIRECT_MAX_TIMES": 5,
            "COOKIES_ENABLED": False,
            "HTTPPROXY_ENABLED": False,  # http(s)_proxy variables would bypass the address checks
            "REMOTE_CONTROL_ENABLED": False,  # scrapy 2.19 otherwise opens a code-executing HTTP endpoint
            "TELNETCONSOLE_ENABLED": False,
            "DEPTH_LIMIT": self.max_depth + 1,  # belt and braces; the spider stops following at max_depth
            "LOG_LEVEL": self.log_level,
            "DOWNLOAD_HANDLERS": {"http": handler, "https": handler, "file": None, "data": None}
            | {"s3": None, "ftp": None},
            # last before the download, first after it: sees every request and every 3xx response
            "DOWNLOADER_MIDDLEWARES": {"stream2llm.retrievers.crawl_download.AddressGuardMiddleware": 950},
            "STREAM2LLM_GUARD": guard or self.guard(),
            "STREAM2LLM_MAX_REQUESTS": self.max_requests,
            **dict(self.settings),
        }


class CrawlRetriever:
    """StreamingRetriever over a focused scrapy crawl: one APPEND event per page, as it is parsed.

    ``seeds`` are start URLs; ``search`` (async query -> URLs) adds seeds per query. At least one of
    the two must yield a URL. Each event's ``sources`` is the page URL.
    """

    name = "crawl"
    mode = Op.APPEND

    def __init__(
        self,
        seeds: Iterable[str] = (),
        *,
        search: SearchHook | None = None,
        config: CrawlConfig | None = None,
    ) -> None:
        self.seeds = tuple(seeds)
        self.search = search
        self.config = config or CrawlConfig()

    async def stream(self, query: str, *, request_id: str = "") -> AsyncIterator[ContextEvent]:
        events = EventNumberer(request_id)
        seeds = await self._seed_urls(query)
        crawl = _Crawl(self.config, seeds, query_terms(query))
        await crawl.start()
        try:
            async with contextlib.aclosing(crawl.pages()) as pages:
                async for page in pages:
                    yield events.append(page.text, source=page.url)
            yield events.end()  # before the stop: in-flight requests must not delay the final event
        finally:
            await crawl.stop()

    async def _seed_urls(self, query: str) -> list[str]:
        seeds = list(self.seeds)
        if self.search is not None:
            try:
                seeds += list(await asyncio.wait_for(self.search(query), self.config.search_timeout))
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"the search hook gave no seeds within {self.config.search_timeout} s"
                ) from None
        seeds = list(dict.fromkeys(urldefrag(s.strip())[0] for s in seeds if s and s.strip()))
        if not seeds:
            raise ValueError("the crawl has no seed URL: give seeds or a search hook that returns some")
        return seeds


@dataclass(frozen=True)
class Page:
    url: str
    title: str
    text: str  # title line, blank line, main text, blank line (ready to append)
    n_bytes: int


class _Crawl:
    """One running crawl: the scrapy crawler, its task, and the queue its scraped pages land in."""

    def __init__(self, config: CrawlConfig, seeds: list[str], terms: frozenset[str]) -> None:
        self.config, self.seeds, self.terms = config, seeds, terms
        self.guard = config.guard()
        self.total_bytes = 0
        self.queue: asyncio.Queue[Page | object] = asyncio.Queue()
        self.crawler: Crawler | None = None
        self.task: asyncio.Task[None] | None = None
        self.t_start = time.monotonic()

    async def start(self) -> None:
        """Check the seeds (a clear BlockedURL for a refused one; their addresses pinned), then crawl."""
        from scrapy import signals
        from scrapy.crawler import AsyncCrawlerRunner

        for url in self.seeds:
            await self.guard.check(url)
        _quiet_scrapy(self.config.log_level)
        runner = AsyncCrawlerRunner(self.config.scrapy_settings(self.guard))
        self.crawler = runner.create_crawler(spider_class())
        # Signal receivers are weak references: bound methods of self stay alive as long as self does.
        self.crawler.signals.connect(self._on_item, signal=signals.item_scraped)
        self.crawler.signals.connect(self._on_headers, signal=signals.headers_received)
        self.crawler.signals.connect(self._on_bytes, signal=signals.bytes_received)
        self.task = runner.crawl(self.crawler, seeds=self.seeds, terms=self.terms, config=self.config)
        self.task.add_done_callback(lambda _t: self.queue.put_nowait(_CRAWL_DONE))

    def _on_item(self, item: Page, **_: Any) -> None:
        self.queue.put_nowait(item)

    def _on_headers(self, headers: Any, request: Any, **_: Any) -> None:
        """Cancel non-HTML bodies (images, archives) once their headers show it: no bytes wasted."""
        from scrapy.exceptions import StopDownload

        if request.meta.get("dont_obey_robotstxt") or headers.get(b"Location"):
            return  # robots.txt is text/plain on purpose; a redirect's own body does not matter
        ctype = (headers.get(b"Content-Type") or b"").decode("latin-1").lower()
        if ctype and "html" not in ctype:
            raise StopDownload(fail=True)

    def _on_bytes(self, data: bytes, **_: Any) -> None:
        """Count every body byte (any type, redirects and robots.txt too); past the budget, cancel
        this download and end the stream."""
        from scrapy.exceptions import StopDownload

        over = self.total_bytes > self.config.max_total_bytes
        self.total_bytes += len(data)
        if self.total_bytes > self.config.max_total_bytes:
            if not over:
                self.queue.put_nowait(_BUDGET_SPENT)
            raise StopDownload(fail=True)

    async def pages(self) -> AsyncIterator[Page]:
        """Distinct pages as they are scraped, until the crawl ends or a limit is reached.

        A plain ``queue.get()`` (no ``wait_for`` task per page): while scrapy keeps the loop busy
        parsing, every extra loop turn per page would delay the hand-off by a parse.
        """
        seen_text: set[str] = set()
        emitted = 0
        timer = None
        if self.config.crawl_timeout is not None:
            deadline = self.t_start + self.config.crawl_timeout
            timer = asyncio.get_running_loop().call_at(deadline, self.queue.put_nowait, _TIME_UP)
        try:
            while emitted < self.config.max_pages:
                page = await self.queue.get()
                if page is _CRAWL_DONE:
                    self._raise_if_failed()
                    return
                if not isinstance(page, Page):  # _TIME_UP or _BUDGET_SPENT
                    return
                digest = hashlib.sha1(page.text.encode()).hexdigest()
                if digest not in seen_text:
                    seen_text.add(digest)
                    emitted += 1
                    yield page
        finally:
            if timer is not None:
                timer.cancel()

    def _raise_if_failed(self) -> None:
        if self.task is not None and not self.task.cancelled() and self.task.exception() is not None:
            raise RuntimeError(f"the crawl from {self.seeds[0]} failed") from self.task.exception()

    async def stop(self) -> None:
        """Stop the engine (no new requests); wait ``stop_grace`` for in-flight ones, then let them
        finish in the background (each ends within ``download_timeout``)."""
        if self.task is None or self.task.done() or self.crawler is None:
            return
        stopping = asyncio.ensure_future(self.crawler.stop_async())
        _BACKGROUND.add(stopping)
        stopping.add_done_callback(_BACKGROUND.discard)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(stopping), self.config.stop_grace)


@functools.cache
def spider_class() -> type:
    """Build the spider class lazily: scrapy is imported only when a crawl starts."""
    import scrapy
    from scrapy.http import HtmlResponse
    from scrapy.linkextractors import LinkExtractor

    class _FocusedSpider(scrapy.Spider):
        name = "stream2llm-crawl"

        def __init__(self, seeds: list[str], terms: frozenset[str], config: CrawlConfig, **kw: Any):
            super().__init__(**kw)
            self.seeds, self.terms, self.config = seeds, terms, config
            # scrapy matches allowed domains against the netloc, port included
            domains = [urlsplit(s).netloc.rsplit("@", 1)[-1] for s in seeds] if config.same_domain else []
            self.links = LinkExtractor(allow_domains=domains, unique=True)
            self.requested: set[str] = set(seeds)  # at most max_requests URLs
            self.n_pages = 0

        async def start(self) -> AsyncIterator[Any]:
            for url in self.seeds:
                yield scrapy.Request(url, callback=self.parse, errback=self.failed, priority=1_000_000)

        def parse(self, response: Any) -> Iterable[Any]:
            if not isinstance(response, HtmlResponse):
                return  # its bytes were counted as they came (_Crawl._on_bytes)
            page = extract_page(response)
            if page.text.strip():
                self.n_pages += 1
                yield page
            depth = response.meta.get("depth", 0)
            if depth < self.config.max_depth and self.n_pages < self.config.max_pages:
                yield from self.follow(response, depth)

        def follow(self, response: Any, depth: int) -> Iterable[Any]:
            """The page's best-scored new http(s) links, at most ``max_links_per_page``, while the
            crawl has requests left (``max_requests``)."""
            scores: dict[str, int] = {}
            for link in self.links.extract_links(response):
                url = urldefrag(link.url)[0]
                if urlsplit(url).scheme in SCHEMES and url not in self.requested and url not in scores:
                    scores[url] = link_score(self.terms, link.text, url)
            room = min(self.config.max_links_per_page, self.config.max_requests - len(self.requested))
            for url, score in heapq.nlargest(max(room, 0), scores.items(), key=lambda kv: kv[1]):
                self.requested.add(url)
                yield scrapy.Request(
                    url, callback=self.parse, errback=self.failed, priority=score * 100 - depth
                )

        def failed(self, failure: Any) -> None:
            """A dead link, timeout or refused host: counted by scrapy's stats, never fatal."""
            request = getattr(failure, "request", None)
            self.logger.info("skipped %s: %s", getattr(request, "url", "?"), failure.value)

    return _FocusedSpider


def query_terms(query: str) -> frozenset[str]:
    """The words a link should share with the query to be followed early."""
    return frozenset(w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 1 and w not in _STOPWORDS)


def link_score(terms: frozenset[str], text: str, url: str) -> int:
    """How many query terms a link's anchor text and URL path mention (the crawl's focus)."""
    if not terms:
        return 0
    words = set(re.findall(r"[a-z0-9]+", f"{text} {urlsplit(url).path}".lower()))
    return len(terms & words)


def extract_page(response: Any) -> Page:
    """Title and main text of an HTML response, without navigation, scripts or styles.

    Reads scrapy's parsed tree in place (no copy): dropped elements are skipped, not removed, so the
    spider's link extraction sees the whole page.
    """
    root = response.selector.root
    title = " ".join("".join(root.xpath("//title//text()")).split()) or urlsplit(response.url).path
    main = next((found[0] for xp in _MAIN_XPATHS if (found := root.xpath(xp))), root)
    skip = set(main.xpath(_DROP_XPATH + "|" + "|".join(f".//{t}" for t in _DROP_TAGS)))
    body = _block_text(main, skip)
    return Page(url=response.url, title=title, text=f"{title}\n\n{body}\n\n", n_bytes=len(response.body))


def _block_text(el: Any, skip: set[Any]) -> str:
    """Text with a line break around block elements, spaces collapsed (except in <pre>), blank runs
    squeezed; elements in ``skip`` contribute nothing (their tails still do)."""
    parts: list[str] = []
    preformatted: list[str] = []

    def walk(node: Any) -> None:
        tag = node.tag if isinstance(node.tag, str) else ""
        if tag == "pre":
            preformatted.append(node.text_content().strip("\n"))
            parts.append(f"\n\x00{len(preformatted) - 1}\x00\n")
            return
        block = tag in _BLOCK_TAGS
        if block:
            parts.append("\n")
        if node.text and tag:
            parts.append(node.text)
        for child in node:
            if child not in skip:
                walk(child)
            if child.tail:
                parts.append(child.tail)
        if block:
            parts.append("\n")

    walk(el)
    lines = (" ".join(line.split()) for line in "".join(parts).splitlines())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return re.sub("\x00(\\d+)\x00", lambda m: preformatted[int(m.group(1))], text)


def _quiet_scrapy(level: int | str) -> None:
    """Scrapy logs through the stdlib root; keep its chatter (and the 'experimental' handler notice)
    below ``level`` unless the application configured those loggers itself."""
    for name in _SCRAPY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or getattr(logger, "_stream2llm_quiet", False):
            logger.setLevel(level)
            logger._stream2llm_quiet = True  # type: ignore[attr-defined]
