"""A real OTLP/HTTP trace receiver on loopback (what a collector does with ``POST /v1/traces``):
it decodes the protobuf the exporter sends and keeps the spans; ``up = False`` makes it a collector
in trouble, answering 503 after a long wait."""

from __future__ import annotations

import asyncio

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

TROUBLE_DELAY_S = 2.0


class OtlpReceiver:
    """Every span it was sent; ``url`` once started."""

    def __init__(self) -> None:
        self.spans: list = []
        self.up = True
        self.requests = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if not self.up:
            await asyncio.sleep(TROUBLE_DELAY_S)
            return web.Response(status=503)
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource in message.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1/traces"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def trace(self, trace_id: str) -> list:
        """The spans of one trace (its id in hex)."""
        return [s for s in self.spans if s.trace_id.hex() == trace_id]
