"""How the HTTP server behaves (the engine has its own config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    """How the HTTP server behaves; the engine has its own config."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # require ``Authorization: Bearer <token>`` (except on /health)
    max_body_bytes: int = 4 << 20
    max_sessions: int = 256  # sessions opened over HTTP and still running; more get 429
    model_name: str | None = None  # listed by /v1/models; default: the engine's model name
    keep_results: int = 1024  # finished sessions remembered for GET /v1/sessions/{id}
