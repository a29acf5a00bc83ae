"""Who may talk to the server, and how much: the checks that run before any route.

A local server is reachable by every web page the user opens: a page can POST to it (a "simple"
cross-origin request needs no preflight) and, with DNS rebinding, even read its answers. So, as
OWASP advises and vLLM/Jupyter-style local servers do: a browser Origin not allowed gets 403, a Host
header that is not this server's gets 421 while bound to loopback, JSON bodies need their
Content-Type (``bodies.read_json``: 415), and binding beyond loopback without a token is refused
unless asked for. Against abusive clients (Envoy-style overload protection): a cap on open
connections (503 and close beyond it), header and body deadlines, header size limits.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from aiohttp import web
from yarl import URL

from stream2llm.server.errors import ApiError
from stream2llm.server.settings import LOOPBACK_NAMES, ServerSettings, is_loopback

log = logging.getLogger(__name__)

UNGUARDED = ("/health", "/metrics")  # probes and scrapes must work under a connection flood
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


class InsecureBind(ValueError):
    """Refused: a non-loopback address without a token would serve anyone who can reach it."""


def check_bind(settings: ServerSettings, host: str) -> None:
    """Refuse a non-loopback bind without a token, unless ``allow_insecure_bind`` (then warn loudly,
    on stderr and in the log)."""
    if settings.token or is_loopback(host):
        return
    message = (
        f"binding {host!r} without a token lets anyone who can reach this address run the model "
        "and read every session"
    )
    if not settings.allow_insecure_bind:
        raise InsecureBind(
            f"{message}; set a token (--token or STREAM2LLM_TOKEN) or pass --allow-insecure-bind"
        )
    log.warning("INSECURE: %s (--allow-insecure-bind)", message)
    print(f"WARNING: INSECURE: {message} (--allow-insecure-bind)", file=sys.stderr, flush=True)


@dataclass
class Guard:
    """The app's admission checks; ``start_site`` tells it the bound host and aiohttp's server
    (whose open connections it counts)."""

    settings: ServerSettings
    bind_host: str | None = None
    server: web.Server | None = None
    _hosts: frozenset[str] = field(default=frozenset())

    def bound(self, host: str, server: web.Server | None) -> None:
        self.bind_host, self.server, self._hosts = host, server, frozenset()

    def check(self, request: web.Request) -> web.Response | None:
        """Raise ApiError for a request refused before routing; return the answer to a CORS
        preflight from an allowed origin (None: go on)."""
        if request.path not in UNGUARDED:
            self._check_connections(request)
        self._check_host(request)
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        if not self.origin_allowed(origin):
            raise ApiError(
                403,
                f"origin {origin!r} is not allowed (ServerSettings.allowed_origins / --allowed-origin)",
                type="permission_error",
                code="origin_not_allowed",
            )
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers=self.cors_headers(origin) | PREFLIGHT_HEADERS)
        return None

    def origin_allowed(self, origin: str) -> bool:
        allowed = {o.rstrip("/").lower() for o in self.settings.allowed_origins}
        return "*" in allowed or origin.rstrip("/").lower() in allowed

    @staticmethod
    def cors_headers(origin: str) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    async def add_cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """An allowed origin may read the answer (on_response_prepare: streamed ones too)."""
        origin = request.headers.get("Origin")
        if origin is not None and self.origin_allowed(origin):
            response.headers.update(self.cors_headers(origin))

    def _check_connections(self, request: web.Request) -> None:
        """503 (and close) for a request on a connection beyond the first ``max_connections``."""
        if self.server is None:
            return
        connections = self.server.connections
        limit = self.settings.max_connections
        if len(connections) > limit and request.protocol not in connections[:limit]:
            raise ApiError(
                503,
                f"server has {len(connections)} open connections (max_connections={limit})",
                type="server_error",
                code="too_many_connections",
                close=True,
            )

    def _check_host(self, request: web.Request) -> None:
        """On a loopback bind (or with allowed_hosts), a Host naming another server is a DNS
        rebinding attempt: 421."""
        bind = self.bind_host or self.settings.host
        if not (is_loopback(bind) or self.settings.allowed_hosts):
            return
        given = request.headers.get("Host")
        if given is None:
            return  # HTTP/1.0 without Host: not a browser
        if not self._hosts:
            names = (*LOOPBACK_NAMES, bind, *self.settings.allowed_hosts)
            self._hosts = frozenset(n.strip("[]").lower() for n in names)
        try:
            name = (URL(f"http://{given}").host or "").strip("[]").lower()
        except ValueError:
            name = ""
        if name not in self._hosts:
            raise ApiError(
                421,
                f"host {given!r} is not this server's (ServerSettings.allowed_hosts / --allowed-host)",
                code="misdirected_request",
            )
