"""The crawler against a hostile site (real scrapy, real loopback servers, a real injected resolver).

Only the test server's own ``127.0.0.1:port`` is allowed to be private (``allowed_private_hosts``);
everything else a hostile page points at must be refused before any byte is sent: local files (file:
links, a FIFO, /dev/zero), a 302 and a meta refresh to the metadata address or to an internal name,
a name that rebinds to loopback, a robots.txt that redirects inward. Link bombs and bodies without a
Content-Type must stay within the request and byte limits.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time

import pytest
from aiohttp import web

from stream2llm.retrievers.crawl_download import AddressGuardMiddleware
from stream2llm.retrievers.crawl_guard import AddressGuard
from stream2llm.retrievers.crawler import CrawlConfig, CrawlRetriever
from tests.retrievers.hostile_site import (
    METADATA_URL,
    NOCTYPE_BYTES,
    PUBLIC_IP,
    SECRET,
    HostileSite,
    Resolver,
    serve_hostile,
    serve_raw,
)

GUARD_LOG = "stream2llm.retrievers.crawl_guard"


@pytest.fixture
def local_files(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text(f"root:x:0:0:{SECRET}\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return str(secret), str(fifo)


@pytest.fixture
async def hostile(local_files):
    site = HostileSite(local_file=local_files[0], fifo=local_files[1])
    async with serve_hostile(site):
        yield site


def _only_own(port: int, resolver: Resolver | None = None, **kw) -> CrawlConfig:
    """The test server's own (host, port) allowed, every other private address refused."""
    return CrawlConfig(
        allowed_private_hosts={("127.0.0.1", port)},
        resolve=resolver,
        same_domain=False,
        **{
            "max_pages": 50,
            "max_depth": 2,
            "download_timeout": 2.0,
            "stop_grace": 3.0,
            "crawl_timeout": 20.0,
            **kw,
        },
    )


async def _texts(retriever: CrawlRetriever) -> list[str]:
    return [e.text for e in [e async for e in retriever.stream("secret")]]


def _refused(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == GUARD_LOG]


def _fifo_has_reader(path: str) -> bool:
    """Opening a FIFO's write end without blocking fails with ENXIO when no one reads it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        assert e.errno == errno.ENXIO
        return False
    os.close(fd)  # a blocked reader gets end-of-file and lets go
    return True


async def test_hostile_links_and_redirects_are_refused_before_sending(hostile, caplog):
    caplog.set_level(logging.INFO, logger=GUARD_LOG)
    resolver = Resolver()
    texts = await _texts(
        CrawlRetriever([hostile.base + "start.html"], config=_only_own(hostile.port, resolver))
    )
    joined = "".join(texts)
    assert "Hostile start" in joined and "An ordinary page." in joined  # the crawl itself worked
    assert SECRET not in joined
    assert "/secret" not in hostile.paths(), hostile.hits  # under no name, by no route
    assert not _fifo_has_reader(hostile.fifo)
    refused = "\n".join(_refused(caplog))
    assert f"refused {METADATA_URL}: 169.254.169.254 resolves to 169.254.169.254, a link-local" in refused
    internal = f"http://internal.test:{hostile.port}/secret"
    assert f"refused {internal}?via=302: internal.test resolves to 127.0.0.1, a loopback" in refused
    assert f"refused {internal}?via=refresh: internal.test resolves to 127.0.0.1" in refused
    # the redirecting pages themselves were fetched: their redirects were seen and refused
    assert {"/to-internal", "/refresh", "/to-metadata"} <= set(hostile.paths())


async def test_dns_rebinding_cannot_reach_loopback(hostile):
    """rebind.test is public when checked and loopback when asked again: the crawl asks once and
    connects to the checked (public, unreachable here) address, never to the loopback server."""
    resolver = Resolver()
    config = _only_own(hostile.port, resolver, max_depth=1)
    texts = await _texts(CrawlRetriever([hostile.base + "start.html"], config=config))
    assert SECRET not in "".join(texts)
    assert [h for h, _ in hostile.hits if h == "rebind.test"] == []
    assert resolver.calls.count(("rebind.test", hostile.port)) == 1
    assert PUBLIC_IP not in "".join(texts)


async def test_file_urls_are_refused_even_for_an_allowed_host(hostile, local_files):
    guard = AddressGuard(allowed_private_hosts={("127.0.0.1", hostile.port)})
    assert await guard.refusal(hostile.base + "ok.html") is None  # the host's http verdict is cached ...
    for url in (f"file://127.0.0.1:{hostile.port}{local_files[0]}", f"file://{local_files[1]}", "ftp://x/"):
        assert "not an http(s) URL" in await guard.refusal(url)  # ... and changes nothing here
    assert "not an http(s) URL" in await AddressGuard(allow_private=True).refusal("file:///dev/zero")
    from scrapy import Request
    from scrapy.exceptions import IgnoreRequest

    with pytest.raises(IgnoreRequest, match="not an http"):
        await AddressGuardMiddleware(AddressGuard(allow_private=True)).process_request(
            Request(f"file://{local_files[0]}")
        )
    handlers = CrawlConfig().scrapy_settings()["DOWNLOAD_HANDLERS"]
    assert all(handlers[s] is None for s in ("file", "data", "s3", "ftp"))
    assert CrawlConfig().scrapy_settings()["HTTPPROXY_ENABLED"] is False


async def test_proxy_variables_are_ignored(hostile, monkeypatch):
    """A proxy in the environment would take the request past every address check."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://10.9.9.9:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    texts = await _texts(
        CrawlRetriever([hostile.base + "ok.html"], config=_only_own(hostile.port, max_depth=0))
    )
    assert "An ordinary page." in "".join(texts)  # fetched directly, not through the (dead) proxy


async def test_robots_txt_redirecting_inward_is_refused(local_files, caplog):
    caplog.set_level(logging.INFO, logger=GUARD_LOG)

    async def robots(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://internal.test:{request.url.port}/secret?via=robots")

    site = HostileSite(local_file=local_files[0], fifo=local_files[1])
    async with serve_hostile(site, {"/robots.txt": robots}):
        t0 = time.monotonic()
        config = _only_own(site.port, Resolver(), max_depth=0, crawl_timeout=5.0)
        texts = await _texts(CrawlRetriever([site.base + "ok.html"], config=config))
        assert time.monotonic() - t0 < 5.0
    assert "/robots.txt" in site.paths() and "/secret" not in site.paths()
    assert any("secret?via=robots: internal.test resolves to 127.0.0.1" in m for m in _refused(caplog))
    assert "An ordinary page." in "".join(texts)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_link_bomb_stays_within_the_request_cap_and_bounded_memory(hostile):
    """Pages of 20k links each: the uncapped crawl grew by ~500 MiB of queued requests in 15 s."""
    config = _only_own(
        hostile.port,
        max_links_per_page=3,
        max_requests=7,
        max_depth=5,
        max_pages=10_000,
        download_timeout=20.0,  # server and crawler share this loop: a 20k-link page takes a while
        crawl_timeout=60.0,
    )
    base, peak = _rss(), 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, _rss())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    texts = await _texts(CrawlRetriever([hostile.base + "bomb/root"], config=config))
    elapsed = time.monotonic() - t0
    sampler.cancel()
    bombs = hostile.paths("/bomb/")
    assert len(bombs) <= 7 and len(texts) - 1 == len(bombs)  # the cap, robots.txt included (8 - 1)
    assert len([p for p in bombs if p.count("-") == 1]) == 3  # three links followed per page ...
    assert [p for p in bombs if p.count("-") == 2]  # ... two levels deep
    growth = peak - base
    assert growth < 160 << 20, f"RSS grew {growth / 2**20:.0f} MiB"
    print(f"\nlink bomb: {len(bombs)} pages in {elapsed:.1f} s, RSS growth {growth / 2**20:.1f} MiB")


async def test_bodies_without_content_type_count_in_the_byte_budget():
    async with serve_raw() as raw:
        config = CrawlConfig(
            allow_private=True,
            max_total_bytes=2 * NOCTYPE_BYTES + 1_000,
            concurrency=1,
            obey_robots=False,
            max_depth=1,
            crawl_timeout=20.0,
        )
        t0 = time.monotonic()
        texts = await _texts(CrawlRetriever([raw.base + "index.html"], config=config))
        assert time.monotonic() - t0 < 10.0
    noctype = [p for p in raw.hits if p.startswith("/noctype/")]
    assert len(noctype) <= 3, raw.hits  # two fit the budget, the third spends it
    assert texts[-1] == "" and raw.huge_written < 32 << 20


async def test_a_huge_body_without_length_is_cut_at_the_page_limit():
    async with serve_raw() as raw:
        config = CrawlConfig(allow_private=True, max_page_bytes=256 << 10, obey_robots=False, max_depth=0)
        texts = await _texts(CrawlRetriever([raw.base + "huge"], config=config))
        await asyncio.sleep(0.2)
    assert texts == [""] and raw.hits == ["/huge"]
    assert raw.huge_written < 16 << 20, raw.huge_written  # 64 MiB offered; the socket buffers hold a few


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("2002:a00:1::", "private"),  # 6to4 around 10.0.0.1
        ("2002:7f00:1::1", "loopback"),  # 6to4 around 127.0.0.1
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 around the metadata address
        ("2002:808:808::1", None),  # 6to4 around 8.8.8.8
        ("fec0::1", "site-local"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", None),  # NAT64 of a public address is public
        ("64:ff9b:1::1", "reserved"),  # local-use NAT64 prefix
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"),  # Teredo: client 192.0.2.45 (TEST-NET)
        ("2001:0:808:808:0:f7f7:f7f7:f7f7", None),  # Teredo: server and client 8.8.8.8
        ("2001:0:808:808:0:f5ff:ffff:fffe", "private"),  # Teredo: client 10.0.0.1
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:8.8.8.8", None),
        ("::a00:1", "reserved"),  # IPv4-compatible (deprecated)
        ("fe80::1%eth0", "link-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),  # documentation
        ("100::1", "private"),  # discard-only
        ("198.18.0.1", "private"),  # benchmarking
        ("192.0.0.8", "non-global"),  # IETF protocol assignments,
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        ("192.0.0.9", None),  # its two global exceptions
        ("1.1.1.1", None),
        ("2a00:1450:4001:81b::200e", None),
    ],
)
def test_address_classes(address, reason):
    from stream2llm.retrievers.crawl_guard import blocked_reason

    assert blocked_reason(address) == reason
