"""The HTTP server (aiohttp) over a StreamingEngine: session API, OpenAI-compatible endpoints,
health and metrics. ``serve`` runs it; ``create_app`` + ``start_site`` embed it in a loop."""

from stream2llm.server.app import create_app, serve, start_site
from stream2llm.server.errors import ApiError
from stream2llm.server.settings import ServerSettings

__all__ = ["ApiError", "ServerSettings", "create_app", "serve", "start_site"]
