"""Scrapy's side of the crawler's SSRF guard: a downloader middleware and a pinned download handler.

Imported by scrapy (by name, from the crawl's settings) once a crawl starts; the crawl's
``AddressGuard`` travels in the setting ``STREAM2LLM_GUARD``.

- ``AddressGuardMiddleware`` runs last before the download and first after it: every request (seed,
  link, redirect, meta refresh, robots.txt) is checked before it is sent, every response (3xx
  included, before the redirect middlewares see it) must come from a checked address, and the crawl
  sends at most ``STREAM2LLM_MAX_REQUESTS`` requests.
- ``GuardedDownloadHandler`` is scrapy's reactorless aiohttp handler whose connector resolves host
  names through the guard (``PinnedResolver``): it connects only to the addresses that were checked,
  keeping the URL's host for the Host header and TLS SNI, and ignores proxy environment variables.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from scrapy.core.downloader.handlers._aiohttp import AiohttpDownloadHandler, _ClientResponse
from scrapy.exceptions import IgnoreRequest

from stream2llm.retrievers.crawl_guard import AddressGuard, BlockedURL

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

GUARD_SETTING = "STREAM2LLM_GUARD"
MAX_REQUESTS_SETTING = "STREAM2LLM_MAX_REQUESTS"


def guard_of(crawler: Crawler) -> AddressGuard:
    """The crawl's guard; a crawl started without one gets the strictest (public hosts only)."""
    guard = crawler.settings.get(GUARD_SETTING)
    return guard if isinstance(guard, AddressGuard) else AddressGuard()


class AddressGuardMiddleware:
    """Downloader middleware: refuse a request before it is sent, and a response from an unchecked peer."""

    def __init__(self, guard: AddressGuard, max_requests: int = 0) -> None:
        self.guard, self.max_requests = guard, max_requests
        self.sent = 0

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> AddressGuardMiddleware:
        return cls(guard_of(crawler), crawler.settings.getint(MAX_REQUESTS_SETTING))

    async def process_request(self, request: Any) -> None:
        if request.meta.get("proxy"):  # behind a proxy no address could be checked or pinned
            raise IgnoreRequest(f"refusing to crawl {request.url} through a proxy")
        if why := await self.guard.refusal(request.url):
            raise IgnoreRequest(f"refusing to crawl {request.url}: {why}")
        self.sent += 1
        if self.max_requests and self.sent > self.max_requests:
            raise IgnoreRequest(f"refusing {request.url}: the crawl sent its {self.max_requests} requests")

    def process_response(self, request: Any, response: Any) -> Any:
        if why := self.guard.peer_refusal(request.url, getattr(response, "ip_address", None)):
            raise IgnoreRequest(f"{request.url} refused: {why}")
        return response


class PinnedResolver(AbstractResolver):
    """aiohttp resolver answering with the guard's checked, pinned addresses (refused: OSError)."""

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = await self.guard.addresses(host, port)
        except (BlockedURL, ValueError) as e:
            raise OSError(f"{host}:{port} refused: {getattr(e, 'reason', e)}") from None
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class GuardedDownloadHandler(AiohttpDownloadHandler):
    """Scrapy's aiohttp download handler connecting only through the crawl's ``PinnedResolver``."""

    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        unpinned, self._session = self._session, self._pinned_session(guard_of(crawler))
        unpinned.detach()  # never used: its connector holds no connection

    def _pinned_session(self, guard: AddressGuard) -> aiohttp.ClientSession:
        """The session scrapy 2.19 builds, with the pinned resolver and without proxy variables."""
        connector = aiohttp.TCPConnector(
            local_addr=self._bind_address,
            limit=self._pool_size_total,
            limit_per_host=self._pool_size_per_host,
            resolver=PinnedResolver(guard),
            use_dns_cache=False,  # the guard pins the answers for the whole crawl
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            response_class=_ClientResponse,
            skip_auto_headers=("Accept", "Accept-Encoding", "Content-Type", "User-Agent"),
            trust_env=False,
        )
