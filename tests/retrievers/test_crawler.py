"""CrawlRetriever over a real site: scrapy (reactorless) crawling the pygame Sphinx docs on loopback.

One loopback server serves the docs plus test routes: a start page linking to real pages, dead links
(404), a page slower than the download timeout, a non-HTML resource, a byte-identical copy of a page
and a robots.txt that forbids one page. Every test runs its own crawl: scrapy without a reactor must
run any number of crawls in one process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from stream2llm.context.events import Op
from stream2llm.retrievers.base import StreamingRetriever
from stream2llm.retrievers.crawl_download import AddressGuardMiddleware
from stream2llm.retrievers.crawl_guard import AddressGuard
from stream2llm.retrievers.crawler import (
    BlockedURL,
    CrawlConfig,
    CrawlRetriever,
    blocked_reason,
    check_url,
    extract_page,
    link_score,
    query_terms,
)
from stream2llm.retrievers.local_site import pygame_docs_dir, serve_site, site_pages

DOCS = pygame_docs_dir()
UNLINKED = {"c_api/cdrom.html", "ref/context.html"}  # pages of the wheel that no other page links to
START_LINKS = ["index.html", "ref/rect.html", "ref/draw.html", "tut/newbieguide.html", "ref/time.html"]
TIMEOUT_S = 2.0  # download timeout in the slow-page test
SLOW_S = 6.0  # the slow page answers after this long (never, as far as the crawl is concerned)


def _start_page() -> str:
    links = START_LINKS + ["dead1.html", "gone/dead2.html", "slow.html", "data", "private.html"]
    links += ["ref/rect-copy.html"]
    anchors = "".join(f'<li><a href="{href}">{href}</a></li>' for href in links)
    return (
        "<html><head><title>Start</title></head><body>"
        "<nav><a href='index.html'>Site navigation</a></nav>"
        f"<main><h1>Start here</h1><p>Links to pygame pages.</p><ul>{anchors}</ul></main>"
        "<footer>Footer boilerplate</footer></body></html>"
    )


class Site:
    """The loopback server's base URL and counters of what it was asked for."""

    def __init__(self) -> None:
        self.base = ""
        self.hits: dict[str, int] = {}
        self.log: list[tuple[float, str]] = []

    def total(self) -> int:
        return len(self.log)


@pytest.fixture(scope="module")
async def site():
    state = Site()

    async def html(text: str) -> web.Response:
        return web.Response(text=text, content_type="text/html")

    async def start(request: web.Request) -> web.Response:
        return await html(_start_page())

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(SLOW_S)
        return await html("<html><head><title>Slow</title></head><body><p>too late</p></body></html>")

    async def data(request: web.Request) -> web.Response:
        return web.json_response({"not": "html"})

    async def robots(request: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nDisallow: /private.html\n")

    async def private(request: web.Request) -> web.Response:
        return await html("<html><head><title>Private</title></head><body><p>secret</p></body></html>")

    async def to_localhost(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{request.url.port}/index.html")

    async def rect_copy(request: web.Request) -> web.Response:
        return web.Response(body=(DOCS / "ref" / "rect.html").read_bytes(), content_type="text/html")

    @web.middleware
    async def count(request: web.Request, handler):
        state.hits[request.path] = state.hits.get(request.path, 0) + 1
        state.log.append((time.monotonic(), request.path))
        return await handler(request)

    routes = {
        "/start.html": start,
        "/slow.html": slow,
        "/data": data,
        "/robots.txt": robots,
        "/private.html": private,
        "/ref/rect-copy.html": rect_copy,
        "/to-localhost": to_localhost,
    }
    async with serve_site(routes=routes, middlewares=[count]) as base:
        state.base = base
        yield state


def _config(**kw) -> CrawlConfig:
    return CrawlConfig(**{"allow_private": True, "max_pages": 200, "max_depth": 10, **kw})


async def _collect(retriever: CrawlRetriever, query: str = "pygame", request_id: str = "r"):
    """Events with their arrival times (seconds from the call) and the time the stream ended."""
    t0 = time.monotonic()
    out = []
    async for event in retriever.stream(query, request_id=request_id):
        out.append((time.monotonic() - t0, event))
    return out, time.monotonic() - t0


def _path(site: Site, event) -> str:
    (url,) = event.sources
    assert url.startswith(site.base)
    return url[len(site.base) :]


@pytest.fixture(scope="module")
async def full_crawl(site):
    """One full crawl of the docs from the front page, focused on a question about drawing rects."""
    retriever = CrawlRetriever([site.base + "index.html"], config=_config())
    return await _collect(retriever, "how do I draw a rect on a surface", request_id="full")


# ---------------------------------------------------------------------------------------------------
# full crawl


async def test_full_crawl_streams_every_reachable_page_once(site, full_crawl):
    timed, t_end = full_crawl
    events = [e for _, e in timed]
    assert [e.seq for e in events] == list(range(len(events)))
    assert all(e.op is Op.APPEND and e.request_id == "full" for e in events)
    assert events[-1].final and events[-1].text == "" and not any(e.final for e in events[:-1])
    pages = events[:-1]
    paths = [_path(site, e) for e in pages]
    assert len(paths) == len(set(paths)), "a page came twice"
    assert len({e.text for e in pages}) == len(pages), "a text came twice"
    assert set(paths) == set(site_pages()) - UNLINKED
    print(
        f"\nfull crawl: {len(pages)} pages, {sum(len(e.text) for e in pages)} chars, "
        f"first event {timed[0][0]:.3f} s, end {t_end:.3f} s"
    )


async def test_first_page_arrives_long_before_the_crawl_ends(full_crawl):
    timed, t_end = full_crawl
    t_first = timed[0][0]
    t_last_page = timed[-2][0]
    assert t_first < 0.3 * t_end, (t_first, t_end)
    # pages are spread over the crawl, not released in one batch at its end
    assert timed[len(timed) // 2][0] < 0.9 * t_last_page


async def test_crawl_is_focused_on_the_query(site):
    # one request at a time, so pages come in the order the crawl ranks the links (with requests in
    # parallel, the order of responses is the server's)
    config = _config(max_pages=5, max_depth=1, concurrency=1, concurrency_per_domain=1)
    retriever = CrawlRetriever([site.base + "index.html"], config=config)
    timed, _ = await _collect(retriever, "how do I draw a rect on a surface", request_id="focus")
    first = [_path(site, e) for _, e in timed[1:5]]  # after the seed
    relevant = {"ref/draw.html", "ref/rect.html", "ref/surface.html"}
    assert len(relevant & set(first)) >= 2, first


async def test_main_text_without_navigation(site, full_crawl):
    timed, _ = full_crawl
    rect = next(e for _, e in timed if e.sources and _path(site, e) == "ref/rect.html")
    assert rect.text.startswith("pygame.Rect — pygame v2.6.1 documentation\n\n")
    assert "pygame object for storing rectangular coordinates" in rect.text
    for boilerplate in ("Most useful stuff", "Reference Index", "Navigation", "Copyright 2000", "¶"):
        assert boilerplate not in rect.text
    # code keeps its indentation
    index = next(e for _, e in timed if _path(site, e) == "index.html")
    assert "\n    # poll for events\n" in index.text


# ---------------------------------------------------------------------------------------------------
# failures, limits, politeness


async def test_slow_page_and_dead_links_stall_nothing(site):
    hits_before = dict(site.hits)
    retriever = CrawlRetriever(
        [site.base + "start.html"], config=_config(max_depth=1, download_timeout=TIMEOUT_S)
    )
    timed, t_end = await _collect(retriever)
    paths = [_path(site, e) for _, e in timed[:-1]]
    assert "start.html" in paths and set(START_LINKS) - {"ref/rect.html"} <= set(paths)
    start = next(e for _, e in timed if _path(site, e) == "start.html")
    assert "Start here" in start.text and "Site navigation" not in start.text and "Footer" not in start.text
    # every good page arrived before the slow one timed out; the crawl ended at that timeout
    # times from the start page's event: its links, the slow one included, were requested right after
    t_start = timed[0][0]
    assert all(t - t_start < TIMEOUT_S for t, _ in timed[:-1]), [round(t - t_start, 2) for t, _ in timed]
    assert TIMEOUT_S - 0.1 < t_end - t_start < TIMEOUT_S + 1.5, (t_start, t_end)
    # dead links, the slow page, non-HTML and the robots-forbidden page bring no event
    assert not {"dead1.html", "gone/dead2.html", "slow.html", "data", "private.html"} & set(paths)
    assert site.hits.get("/gone/dead2.html", 0) > hits_before.get("/gone/dead2.html", 0)  # tried
    assert site.hits.get("/slow.html", 0) == hits_before.get("/slow.html", 0) + 1  # no retry
    assert site.hits.get("/private.html", 0) == hits_before.get("/private.html", 0)  # robots.txt obeyed
    # a byte-identical copy of a page under another URL comes once (content hash)
    assert ("ref/rect.html" in paths) != ("ref/rect-copy.html" in paths)


async def test_limits_end_the_stream_without_waiting_for_a_slow_page(site):
    """The slow page is in flight when the page limit or the crawl timeout is reached: the final event
    comes at once, and closing waits at most ``stop_grace`` for the in-flight request."""
    config = _config(max_depth=1, max_pages=3, download_timeout=4.0, stop_grace=0.3)
    timed, t_closed = await _collect(CrawlRetriever([site.base + "start.html"], config=config))
    assert len(timed) == 4 and timed[-1][1].final
    t_final = timed[-1][0] - timed[0][0]
    assert t_final < 1.0 and t_closed < timed[-1][0] + 0.3 + 0.5, (timed[0][0], timed[-1][0], t_closed)

    config = _config(max_depth=1, download_timeout=4.0, crawl_timeout=1.0, stop_grace=0.3)
    timed, t_closed = await _collect(CrawlRetriever([site.base + "start.html"], config=config))
    assert len(timed) > 3 and timed[-1][1].final
    assert 1.0 <= timed[-1][0] < 2.0 and t_closed < 2.5, (timed[-1][0], t_closed)


async def test_robots_can_be_ignored_on_request(site):
    retriever = CrawlRetriever(
        [site.base + "start.html"], config=_config(max_depth=1, obey_robots=False, download_timeout=1.0)
    )
    timed, _ = await _collect(retriever)
    assert "private.html" in [_path(site, e) for _, e in timed[:-1]]


async def test_page_and_depth_limits(site, caplog):
    caplog.set_level(logging.DEBUG)
    only_seed, _ = await _collect(CrawlRetriever([site.base], config=_config(max_depth=0)))
    assert [_path(site, e) for _, e in only_seed[:-1]] == ["index.html"]  # "/" redirects to it

    five, _ = await _collect(CrawlRetriever([site.base + "index.html"], config=_config(max_pages=5)))
    assert len(five) == 6 and five[-1][1].final and [e.seq for _, e in five] == list(range(6))

    one_hop, _ = await _collect(
        CrawlRetriever([site.base + "ref/rect.html"], config=_config(max_depth=1, max_pages=500))
    )
    rect_links = _links_of(DOCS / "ref" / "rect.html", "ref/")
    paths = {_path(site, e) for _, e in one_hop[:-1]}
    assert "ref/rect.html" in paths and paths - {"ref/rect.html"} <= rect_links
    assert len(paths) > 10
    # scrapy stays quiet by default (its 'experimental handler' warning included)
    assert not [r for r in caplog.records if r.name.startswith("scrapy")]


async def test_byte_limits(site):
    none, _ = await _collect(CrawlRetriever([site.base + "index.html"], config=_config(max_total_bytes=1)))
    assert len(none) == 1 and none[0][1].final  # the first page already exceeds the budget

    small, _ = await _collect(
        CrawlRetriever(
            [site.base + "start.html"],
            config=_config(max_depth=1, max_page_bytes=30_000, download_timeout=0.5),
        )
    )
    paths = [_path(site, e) for _, e in small[:-1]]
    # start.html (built here, 1 KB), index.html (24 KB) and ref/time.html (19 KB) fit; rect, draw and
    # the newbie guide (45-84 KB) are cancelled once their Content-Length shows it
    assert sorted(paths) == ["index.html", "ref/time.html", "start.html"]


async def test_cancelling_the_stream_stops_the_crawl(site):
    retriever = CrawlRetriever([site.base + "index.html"], config=_config(download_delay=0.05))
    stream = retriever.stream("pygame")
    first = await anext(stream)
    assert first.seq == 0
    t0 = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - t0 < CrawlConfig().stop_grace + 0.5
    await asyncio.sleep(CrawlConfig().stop_grace)  # requests already on the wire may still land
    n = site.total()
    await asyncio.sleep(0.5)
    assert site.total() == n, "requests went on after the stream was closed"


async def test_concurrent_crawls_in_one_process(site):
    a, b = await asyncio.gather(
        _collect(CrawlRetriever([site.base + "index.html"], config=_config(max_pages=4)), request_id="a"),
        _collect(CrawlRetriever([site.base + "ref/rect.html"], config=_config(max_pages=4)), request_id="b"),
    )
    for timed, rid in ((a[0], "a"), (b[0], "b")):
        assert len(timed) == 5 and {e.request_id for _, e in timed} == {rid}


async def test_search_hook_gives_the_seeds(site):
    asked: list[str] = []

    async def search(query: str) -> list[str]:
        asked.append(query)
        return [site.base + "ref/rect.html#pygame.Rect", site.base + "ref/draw.html"]

    retriever = CrawlRetriever(search=search, config=_config(max_depth=0))
    assert isinstance(retriever, StreamingRetriever) and retriever.mode is Op.APPEND
    timed, _ = await _collect(retriever, "rects")
    assert asked == ["rects"]
    assert sorted(_path(site, e) for _, e in timed[:-1]) == ["ref/draw.html", "ref/rect.html"]

    with pytest.raises(ValueError, match="no seed URL"):
        await anext(CrawlRetriever(config=_config()).stream("q"))

    async def stuck(query: str) -> list[str]:
        await asyncio.sleep(10)
        return []

    with pytest.raises(TimeoutError, match="search hook"):
        await anext(CrawlRetriever(search=stuck, config=_config(search_timeout=0.1)).stream("q"))


# ---------------------------------------------------------------------------------------------------
# SSRF guard


async def test_loopback_seed_is_refused_without_allow_private(site):
    url = site.base + "index.html"
    with pytest.raises(
        BlockedURL, match=r"refusing to crawl http://127\.0\.0\.1:\d+/index\.html: .*loopback"
    ):
        await anext(CrawlRetriever([url]).stream("q"))
    with pytest.raises(BlockedURL, match=r"localhost resolves to (127\.0\.0\.1|::1), a loopback address"):
        await anext(CrawlRetriever([url.replace("127.0.0.1", "localhost")]).stream("q"))
    with pytest.raises(ValueError, match="not an http"):
        await anext(CrawlRetriever(["file:///etc/passwd"]).stream("q"))
    # accepted with allow_private
    stream = CrawlRetriever([url], config=CrawlConfig(allow_private=True, max_pages=1)).stream("q")
    event = await anext(stream)
    await stream.aclose()
    assert event.sources == (url,)


async def test_redirect_to_a_refused_host_is_caught_in_a_live_crawl(site):
    # only the test site's own (host, port) may be loopback: 'localhost' on the same port may not
    port = urlsplit(site.base).port
    only_own = {"allowed_private_hosts": {("127.0.0.1", port)}, "allow_private": False}
    before = site.hits.get("/index.html", 0)
    timed, _ = await _collect(
        CrawlRetriever([site.base + "to-localhost"], config=_config(max_depth=0, **only_own))
    )
    assert site.hits.get("/to-localhost", 0) >= 1  # the seed was fetched ...
    assert len(timed) == 1 and timed[0][1].final  # ... and its redirect refused
    assert site.hits.get("/index.html", 0) == before
    # the same redirect is followed where private hosts are allowed
    timed, _ = await _collect(CrawlRetriever([site.base + "to-localhost"], config=_config(max_depth=0)))
    assert [e.sources for _, e in timed[:-1]] == [
        (site.base.replace("127.0.0.1", "localhost") + "index.html",)
    ]


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoint
        ("0.0.0.0", "private"),  # "this network": is_private in the stdlib
        ("100.64.0.1", "non-global"),  # carrier-grade NAT
        ("224.0.0.1", "multicast"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("8.8.8.8", None),
        ("93.184.215.14", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_blocked_reason(address, reason):
    assert blocked_reason(address) == reason


async def test_check_url_without_network():
    assert await check_url("http://8.8.8.8/x") == ["8.8.8.8"]
    with pytest.raises(BlockedURL, match=r"\[::1\]|::1"):
        await check_url("http://[::1]:8080/")
    assert await check_url("http://10.0.0.1/", allow_private=True) == ["10.0.0.1"]


async def test_guard_middleware_checks_requests_and_peers():
    from scrapy import Request
    from scrapy.exceptions import IgnoreRequest
    from scrapy.http import HtmlResponse

    guard = AddressGuardMiddleware(AddressGuard())
    with pytest.raises(IgnoreRequest, match=r"169\.254\.169\.254, a link-local"):
        await guard.process_request(Request("http://169.254.169.254/latest/meta-data/"))  # e.g. a redirect
    assert await guard.process_request(Request("http://8.8.8.8/")) is None
    served = HtmlResponse(
        "http://8.8.8.8/", body=b"<html></html>", ip_address=ipaddress.ip_address("10.0.0.5")
    )
    with pytest.raises(IgnoreRequest, match=r"served from 10\.0\.0\.5"):
        guard.process_response(Request("http://8.8.8.8/"), served)
    open_guard = AddressGuardMiddleware(AddressGuard(allow_private=True))
    assert open_guard.process_response(Request("http://x/"), served) is served


def test_generic_page_keeps_main_text_only():
    from scrapy.http import HtmlResponse

    html = (
        "<html><head><title> A  page </title><style>p {color: red}</style></head><body>"
        "<header>Site header</header><nav><a href='/'>Home</a></nav>"
        "<div><h2>Heading</h2><p>First <b>bold</b> paragraph.</p><script>var x = 1;</script>"
        "<pre>def f():\n    return 1</pre><p>Second paragraph.</p></div>"
        "<aside>Related links</aside><footer>Copyright</footer></body></html>"
    )
    page = extract_page(HtmlResponse("http://example.org/a", body=html.encode(), encoding="utf-8"))
    assert page.title == "A page"
    assert page.text == (
        "A page\n\nHeading\n\nFirst bold paragraph.\n\ndef f():\n    return 1\n\nSecond paragraph.\n\n"
    )


def test_query_terms_and_link_score():
    terms = query_terms("How do I draw a Rect on the surface?")
    assert terms == {"draw", "rect", "surface"}
    assert link_score(terms, "pygame.draw", "http://h/ref/draw.html") == 1
    assert link_score(terms, "Rect and Surface", "http://h/ref/x.html") == 2
    assert link_score(frozenset(), "anything", "http://h/") == 0


def _links_of(page: Path, prefix: str) -> set[str]:
    """Pages a doc page links to, as site paths (``prefix``: the page's folder)."""
    import posixpath
    from urllib.parse import urldefrag

    import lxml.html

    hrefs = lxml.html.fromstring(page.read_bytes()).xpath("//a/@href")
    out = set()
    for href in hrefs:
        href = urldefrag(href)[0]
        if href and "://" not in href:
            out.add(posixpath.normpath(posixpath.join(prefix, href)))
    return out | {prefix + Path(page).name}
