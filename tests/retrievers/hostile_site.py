"""A hostile web site on loopback for the crawler's safety tests (real aiohttp and asyncio servers).

``HostileSite`` serves pages that link to local files (``file://host:port/...``, ``file:///...``, a
FIFO), redirect (302 and meta refresh) to the cloud metadata address and to an internal name, link to
a name whose DNS answer changes (rebinding), carry 20k links (a link bomb), and serve bodies without
a Content-Type. ``/secret`` holds ``SECRET`` and must never be fetched. ``Resolver`` is the DNS the
crawl is given (``CrawlConfig.resolve``): ``internal.test`` is loopback, ``rebind.test`` public once
and loopback afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from stream2llm.retrievers.crawl_guard import system_resolve
from stream2llm.retrievers.local_site import serve_site

SECRET = "TOP-SECRET-MARKER-7d1f"
METADATA_URL = "http://169.254.169.254/latest/meta-data/"
PUBLIC_IP = "93.184.215.14"  # a public address (nothing answers it here: no network)
BOMB_LINKS = 20_000


class Resolver:
    """A real name service for the crawl: test names mapped, others from the system; calls recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host == "internal.test":
            return ["127.0.0.1"]
        if host == "rebind.test":  # public for the check, loopback for anyone who asks again
            return [PUBLIC_IP] if len([c for c in self.calls if c[0] == host]) == 1 else ["127.0.0.1"]
        return await system_resolve(host, port)


@dataclass
class HostileSite:
    base: str = ""
    port: int = 0
    local_file: str = ""  # a file with SECRET in it
    fifo: str = ""  # a FIFO no one writes to
    hits: list[tuple[str, str]] = field(default_factory=list)  # (Host header, path)
    raw_hits: list[str] = field(default_factory=list)  # paths asked of the raw server
    raw_base: str = ""

    def paths(self, prefix: str = "") -> list[str]:
        return [p for _, p in self.hits if p.startswith(prefix)]


def _page(title: str, body: str, head: str = "") -> web.Response:
    html = f"<html><head><title>{title}</title>{head}</head><body><main>{body}</main></body></html>"
    return web.Response(text=html, content_type="text/html")


def _links(hrefs: list[str]) -> str:
    return "".join(f'<p><a href="{h}">link {i}</a></p>' for i, h in enumerate(hrefs))


def routes(site: HostileSite) -> dict[str, object]:
    """The hostile pages, by path."""

    def internal(request: web.Request) -> str:
        return f"http://internal.test:{request.url.port}"

    async def start(request: web.Request) -> web.Response:
        hrefs = [
            f"file://127.0.0.1:{request.url.port}{site.local_file}",
            f"file://{site.local_file}",
            f"file://{site.fifo}",
            "file:///dev/zero",
            "/to-metadata",
            "/to-internal",
            "/refresh",
            f"http://rebind.test:{request.url.port}/secret?via=rebind",
            "/ok.html",
        ]
        return _page("Start", "<h1>Hostile start</h1>" + _links(hrefs))

    async def ok(request: web.Request) -> web.Response:
        return _page("Fine", "<p>An ordinary page.</p>")

    async def secret(request: web.Request) -> web.Response:
        return _page("Secret", f"<p>{SECRET}</p>")

    async def to_metadata(request: web.Request) -> web.Response:
        raise web.HTTPFound(METADATA_URL)

    async def to_internal(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{internal(request)}/secret?via=302")

    async def refresh(request: web.Request) -> web.Response:
        meta = f'<meta http-equiv="refresh" content="0; url={internal(request)}/secret?via=refresh">'
        return _page("Moved", "<p>moved</p>", head=meta)

    async def bomb(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hrefs = [f"/bomb/{name}-{i}" for i in range(BOMB_LINKS)]
        return _page(f"Bomb {name}", "".join(f'<a href="{h}">b</a>' for h in hrefs))

    return {
        "/start.html": start,
        "/ok.html": ok,
        "/secret": secret,
        "/to-metadata": to_metadata,
        "/to-internal": to_internal,
        "/refresh": refresh,
        "/bomb/{name}": bomb,
    }


@contextlib.asynccontextmanager
async def serve_hostile(
    site: HostileSite, extra: dict[str, object] | None = None
) -> AsyncIterator[HostileSite]:
    """Serve the hostile pages (plus ``extra`` routes, e.g. a robots.txt) on a free loopback port."""

    @web.middleware
    async def record(request: web.Request, handler):
        site.hits.append((request.host.rsplit(":", 1)[0], request.path))
        return await handler(request)

    async with serve_site(routes={**routes(site), **(extra or {})}, middlewares=[record]) as base:
        site.base, site.port = base, int(base.rsplit(":", 1)[1].strip("/"))
        yield site


@dataclass
class RawSite:
    """A plain asyncio HTTP/1.0 server: bodies without a Content-Type, which aiohttp always adds."""

    base: str = ""
    hits: list[str] = field(default_factory=list)
    huge_written: int = 0  # bytes of /huge the client took before it hung up


NOCTYPE_PAGES, NOCTYPE_BYTES, HUGE_BYTES, CHUNK = 5, 60_000, 64 << 20, 64 << 10


async def _answer(raw: RawSite, path: str, writer: asyncio.StreamWriter) -> None:
    if path == "/index.html":
        links = _links([f"/noctype/{i}" for i in range(NOCTYPE_PAGES)] + ["/huge"])
        body = f"<html><head><title>Raw</title></head><body><main>{links}</main></body></html>".encode()
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
    elif path.startswith("/noctype/"):
        body = b"<html><body><p>" + b"x" * NOCTYPE_BYTES + b"</p></body></html>"
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    elif path == "/huge":  # no length, no type: read until the server closes
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
        while raw.huge_written < HUGE_BYTES:
            writer.write(b"y" * CHUNK)
            await writer.drain()
            raw.huge_written += CHUNK
    else:
        writer.write(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")


@contextlib.asynccontextmanager
async def serve_raw() -> AsyncIterator[RawSite]:
    raw = RawSite()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            request_line = (await reader.readline()).decode("latin-1").split()
            while (await reader.readline()).strip():
                pass
            path = request_line[1] if len(request_line) > 1 else "/"
            raw.hits.append(path)
            await _answer(raw, path, writer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    raw.base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        yield raw
    finally:
        server.close()
