"""How the HTTP server behaves (the engine has its own config), and the limits it derives from it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

BYTES_PER_TOKEN = 16  # a token's text is a few bytes; JSON escaping (\uXXXX) at most triples it
BODY_SLACK_BYTES = 64 << 10  # field names, the question, chat turns' framing


@dataclass
class ServerSettings:
    """How the HTTP server behaves; the engine has its own config.

    Secure by default for a local server: no browser page may drive it (Origin refused unless
    listed, Host checked on a loopback bind against DNS rebinding, JSON only with its Content-Type),
    and a non-loopback bind without a token is refused unless ``allow_insecure_bind``."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # require ``Authorization: Bearer <token>`` (except on /health)
    max_body_bytes: int | None = None  # default: body_limit(max_model_len) (the window, in bytes)
    max_sessions: int = 256  # sessions opened over HTTP and still running; more get 429
    model_name: str | None = None  # listed by /v1/models; default: the engine's model name
    keep_results: int = 1024  # finished sessions remembered for GET /v1/sessions/{id}
    allowed_origins: tuple[str, ...] = ()  # browser Origins let in ("*": any); others get 403
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the loopback names and the bind host
    allow_insecure_bind: bool = False  # serve a non-loopback address without a token (warned)
    max_connections: int = 512  # open connections served at once; requests on more get 503
    header_timeout_s: float = 15.0  # to receive a request's headers (also the idle keep-alive)
    body_timeout_s: float = 30.0  # to receive a request's body once its headers arrived
    max_header_bytes: int = 8190  # one header line (request line, each field)
    max_headers: int = 64  # header fields per request

    def body_limit(self, max_model_len: int) -> int:
        """The largest body accepted: the one given, else what a full context window can need."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return max_model_len * BYTES_PER_TOKEN + BODY_SLACK_BYTES


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (a name other than localhost is
    not trusted to: it may resolve anywhere)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
