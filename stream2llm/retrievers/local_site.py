"""A real HTML site on loopback: the Sphinx docs shipped inside the ``pygame`` wheel.

The crawler needs a site to crawl in tests, the demo and offline runs (no network here). The pygame
wheel carries 78 generated Sphinx pages with a real link graph; this serves them with aiohttp's static
file handler on 127.0.0.1 (a free port), plus any extra routes a caller adds (a slow page, a
robots.txt, dead links).

    async with serve_site() as base_url:          # "http://127.0.0.1:PORT/"
        ... crawl base_url + "index.html" ...
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]  # an @web.middleware

PYGAME_DOCS_SUBDIR = Path("docs") / "generated"
START_PAGE = "index.html"  # the docs' front page: the seed when no URL is given (base_url + START_PAGE)


def pygame_docs_dir() -> Path:
    """The generated Sphinx docs of the installed pygame wheel, found without importing pygame.

    Importing pygame would initialise SDL and print a banner; the files are all we need.
    """
    spec = importlib.util.find_spec("pygame")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        docs = Path(location) / PYGAME_DOCS_SUBDIR
        if (docs / "index.html").is_file():
            return docs
    raise FileNotFoundError(
        "the pygame wheel's Sphinx docs (pygame/docs/generated/index.html) were not found; "
        "install the project's dependencies (pygame==2.6.1)"
    )


def site_pages(root: Path | None = None) -> list[str]:
    """Relative paths of the site's HTML pages (what a full crawl can reach at most)."""
    root = root or pygame_docs_dir()
    pages = (p.relative_to(root) for p in root.rglob("*.html"))
    return sorted(p.as_posix() for p in pages if not p.parts[0].startswith("_"))


def build_app(
    root: Path | None = None,
    routes: Mapping[str, Handler] | None = None,
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """An aiohttp app serving ``root`` as static files; ``routes`` (path -> GET handler) win over files;
    ``middlewares`` see every request (tests count them)."""
    app = web.Application(middlewares=list(middlewares))
    for path, handler in (routes or {}).items():
        app.router.add_get(path, handler)
    app.router.add_get("/", _redirect_to_index)
    app.router.add_static("/", root or pygame_docs_dir(), show_index=False, follow_symlinks=False)
    return app


@asynccontextmanager
async def serve_site(
    root: Path | None = None,
    *,
    routes: Mapping[str, Handler] | None = None,
    middlewares: Sequence[Middleware] = (),
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[str]:
    """Serve the site on ``host`` (loopback by default) and yield its base URL, ending in ``/``.

    ``port=0`` takes a free port. Requests still running at exit (a deliberately slow page) are
    cancelled rather than waited for, so leaving the block is quick.
    """
    runner = web.AppRunner(
        build_app(root, routes, middlewares),
        handler_cancellation=True,
        shutdown_timeout=0.5,
        access_log=None,  # a crawl makes one line per page; the crawler's own stats say enough
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        yield f"http://{f'[{host}]' if ':' in host else host}:{bound_port}/"
    finally:
        await runner.cleanup()


async def _redirect_to_index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/index.html")
