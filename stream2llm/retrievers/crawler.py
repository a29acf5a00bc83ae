"""A focused web crawler (scrapy, reactorless inside asyncio) that emits each page as it is parsed.

``CrawlRetriever.stream(query)`` starts a scrapy crawl from seed URLs (given, or from a search hook),
follows the links whose text and URL share the most words with the query first (request priority),
and yields one APPEND event per page the moment scrapy scrapes it: the page title, then its main text
(Sphinx's main body; generically the body without nav/header/footer/script/style). An empty final
append marks the end of the crawl. Pages come once (scrapy's request fingerprints, plus a hash of the
text); limits bound pages, depth, bytes per page and in total, and time.

Safety: robots.txt is obeyed by default, and hosts that resolve to private, loopback, link-local or
otherwise non-global addresses are refused unless ``allow_private=True`` (seeds get a clear error; every
request and redirect is checked by a downloader middleware, and every response's peer address again).

Scrapy runs without a Twisted reactor (``TWISTED_REACTOR_ENABLED=False``), so any number of crawls can
run one after another, or at once, in one asyncio process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urldefrag, urlsplit

from stream2llm.context.events import ContextEvent, Op
from stream2llm.errors import StreamError
from stream2llm.retrievers.base import EventNumberer

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

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
_CRAWL_DONE, _TIME_UP = object(), object()  # queue sentinels: the crawl task ended; crawl_timeout passed
_BACKGROUND: set[asyncio.Task[Any]] = set()  # stops still finishing after their stream was closed


class BlockedURL(StreamError):
    """A URL's host resolves to an address the crawler may not contact (SSRF guard)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(
            f"refusing to crawl {url}: {reason} (pass allow_private=True to crawl local or private hosts)"
        )


@dataclass(frozen=True)
class CrawlConfig:
    """Limits and manners of one crawl. Defaults suit a query-time crawl of a few pages."""

    max_pages: int = 20  # pages emitted, at most
    max_depth: int = 3  # link hops from a seed (0: the seeds only)
    max_page_bytes: int = 2 << 20  # a larger response is cancelled (scrapy DOWNLOAD_MAXSIZE)
    max_total_bytes: int = 32 << 20  # the crawl closes once its responses add up to this
    download_timeout: float = 10.0  # per request, seconds
    crawl_timeout: float | None = 60.0  # the whole crawl, seconds; None: no limit
    download_delay: float = 0.0  # politeness: seconds between requests to one domain
    autothrottle: bool = False  # adapt the delay to the server's latency (scrapy AutoThrottle)
    concurrency: int = 16  # requests in flight, all domains
    concurrency_per_domain: int = 8
    retries: int = 0  # a retry would multiply the wait on a slow page; off by default
    obey_robots: bool = True
    allow_private: bool = False  # allow private/loopback/link-local hosts (local sites, tests)
    same_domain: bool = True  # follow links only within the seeds' domains
    stop_grace: float = 1.0  # seconds a closed stream waits for in-flight requests before leaving them
    search_timeout: float = 10.0  # seconds the search hook may take
    user_agent: str = "stream2llm-crawler/0.1"
    log_level: int | str = logging.ERROR  # scrapy's loggers; raise to INFO/DEBUG to watch it work
    settings: Mapping[str, Any] = field(default_factory=dict)  # extra scrapy settings, applied last

    def __post_init__(self) -> None:
        for name in (
            "max_pages",
            "max_page_bytes",
            "max_total_bytes",
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

    def scrapy_settings(self) -> dict[str, Any]:
        """The scrapy settings that implement this config (reactorless, quiet, guarded)."""
        return {
            "TWISTED_REACTOR_ENABLED": False,
            "ROBOTSTXT_OBEY": self.obey_robots,
            "USER_AGENT": self.user_agent,
            "DOWNLOAD_TIMEOUT": self.download_timeout,
            "DOWNLOAD_MAXSIZE": self.max_page_bytes,
            "DOWNLOAD_WARNSIZE": 0,
            "DOWNLOAD_DELAY": self.download_delay,
            "AUTOTHROTTLE_ENABLED": self.autothrottle,
            "AUTOTHROTTLE_START_DELAY": max(self.download_delay, 0.5),  # scrapy's default is 5 s
            "AUTOTHROTTLE_MAX_DELAY": max(self.download_timeout, self.download_delay),
            "CONCURRENT_REQUESTS": self.concurrency,
            "CONCURRENT_REQUESTS_PER_DOMAIN": self.concurrency_per_domain,
            "RETRY_ENABLED": self.retries > 0,
            "RETRY_TIMES": self.retries,
            "COOKIES_ENABLED": False,
            "REMOTE_CONTROL_ENABLED": False,  # scrapy 2.19 otherwise opens a code-executing HTTP endpoint
            "TELNETCONSOLE_ENABLED": False,
            "DEPTH_LIMIT": self.max_depth + 1,  # belt and braces; the spider stops following at max_depth
            "LOG_LEVEL": self.log_level,
            "DOWNLOADER_MIDDLEWARES": {f"{__name__}.AddressGuardMiddleware": 10},
            "STREAM2LLM_ALLOW_PRIVATE": self.allow_private,
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
        for url in seeds:
            await check_url(url, allow_private=self.config.allow_private)
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
        self.queue: asyncio.Queue[Page | object] = asyncio.Queue()
        self.crawler: Crawler | None = None
        self.task: asyncio.Task[None] | None = None
        self.t_start = time.monotonic()

    async def start(self) -> None:
        from scrapy import signals
        from scrapy.crawler import AsyncCrawlerRunner

        _quiet_scrapy(self.config.log_level)
        runner = AsyncCrawlerRunner(self.config.scrapy_settings())
        self.crawler = runner.create_crawler(spider_class())
        # Signal receivers are weak references: bound methods of self stay alive as long as self does.
        self.crawler.signals.connect(self._on_item, signal=signals.item_scraped)
        self.crawler.signals.connect(self._on_headers, signal=signals.headers_received)
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
                if page is _TIME_UP or not isinstance(page, Page):
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
    from scrapy.exceptions import CloseSpider
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
            self.total_bytes = 0
            self.n_pages = 0

        async def start(self) -> AsyncIterator[Any]:
            for url in self.seeds:
                yield scrapy.Request(url, callback=self.parse, errback=self.failed, priority=1_000_000)

        def parse(self, response: Any) -> Iterable[Any]:
            if not isinstance(response, HtmlResponse):
                return
            self.total_bytes += len(response.body)
            if self.total_bytes > self.config.max_total_bytes:
                raise CloseSpider("max_total_bytes")
            page = extract_page(response)
            if page.text.strip():
                self.n_pages += 1
                yield page
            depth = response.meta.get("depth", 0)
            if depth < self.config.max_depth and self.n_pages < self.config.max_pages:
                yield from self.follow(response, depth)

        def follow(self, response: Any, depth: int) -> Iterable[Any]:
            for link in self.links.extract_links(response):
                url = urldefrag(link.url)[0]
                score = link_score(self.terms, link.text, url)
                yield scrapy.Request(
                    url, callback=self.parse, errback=self.failed, priority=score * 100 - depth
                )

        def failed(self, failure: Any) -> None:
            """A dead link, timeout or refused host: counted by scrapy's stats, never fatal."""
            request = getattr(failure, "request", None)
            self.logger.info("skipped %s: %s", getattr(request, "url", "?"), failure.value)

    return _FocusedSpider


class AddressGuardMiddleware:
    """Downloader middleware: refuse requests (seeds, links, redirects, robots.txt) to non-global hosts.

    Checks the host's resolved addresses before the request and the peer address of the response, so a
    name that re-resolves to a private address between the two is still caught.
    """

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._verdicts: dict[str, str | None] = {}

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> AddressGuardMiddleware:
        return cls(crawler.settings.getbool("STREAM2LLM_ALLOW_PRIVATE"))

    async def process_request(self, request: Any) -> None:
        if not self.allow_private and (why := await self.host_refusal(request.url)):
            from scrapy.exceptions import IgnoreRequest

            raise IgnoreRequest(f"refusing to crawl {request.url}: {why}")

    def process_response(self, request: Any, response: Any) -> Any:
        if self.allow_private or request.meta.get("proxy"):  # behind a proxy the peer is the proxy
            return response
        ip = getattr(response, "ip_address", None)
        if ip is not None and (reason := self.peer_refusal(ip)):
            from scrapy.exceptions import IgnoreRequest

            raise IgnoreRequest(f"{request.url} was served from {ip}, a {reason} address")
        return response

    async def host_refusal(self, url: str) -> str | None:
        """Why ``url``'s host may not be contacted, or None; resolved once per host and crawl."""
        host = urlsplit(url).hostname or ""
        if host not in self._verdicts:
            try:
                await check_url(url, allow_private=False)
                self._verdicts[host] = None
            except BlockedURL as e:
                self._verdicts[host] = e.reason
            except ValueError as e:
                self._verdicts[host] = str(e)
        return self._verdicts[host]

    def peer_refusal(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        return blocked_reason(ip)


def blocked_reason(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the crawler must not contact ``address`` (e.g. "loopback"), or None for a public address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for reason in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{reason}"):
            return reason.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    return None


async def check_url(url: str, *, allow_private: bool = False) -> list[str]:
    """Resolve ``url``'s host; raise BlockedURL naming URL and address if any address is not public.

    Returns the resolved addresses. Raises ValueError for a URL that is not http(s) or has no host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve the host of {url!r}: {e}") from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not allow_private:
        for address in addresses:
            if reason := blocked_reason(address):
                raise BlockedURL(url, f"{parts.hostname} resolves to {address}, a {reason} address")
    return addresses


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
