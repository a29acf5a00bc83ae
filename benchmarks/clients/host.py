"""An engine and its HTTP server in this process, started through the public API (``stream2llm``'s
engine, ``stream2llm.server``'s ``create_app`` and ``start_site``): the drivers that measure the
server's own event loop, or drive its engine's Python API beside HTTP, embed it this way."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from stream2llm import EngineConfig, StreamingEngine
from stream2llm.server import ServerSettings, create_app, start_site

from .probe import ServerProbe


@dataclass
class Hosted:
    """A running engine and server: its URL, port and a probe on this process."""

    engine: StreamingEngine
    runner: Any
    url: str
    max_body: int  # the body limit the server derived from its settings

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def probe(self, with_port: bool = False) -> ServerProbe:
        return ServerProbe(self.url, os.getpid(), self.port if with_port else None)

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.engine.shutdown()


async def host(config: EngineConfig, settings: ServerSettings | None = None) -> Hosted:
    """Start the engine, then its server on 127.0.0.1 (any free port)."""
    settings = settings or ServerSettings()
    engine = await StreamingEngine.start(config)
    try:
        runner, url = await start_site(create_app(engine, settings), "127.0.0.1", 0)
    except BaseException:
        await engine.shutdown()
        raise
    return Hosted(engine, runner, url, settings.body_limit(config.max_model_len))
