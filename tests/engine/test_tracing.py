"""OpenTelemetry traces from retrieval to first token: a real OTLP/HTTP receiver on loopback decodes
what the real exporter sends (protobuf, as a collector would) and finds, for one streamed session,
the span tree with the caller's trace id; a receiver that stops answering stalls nothing."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from benchmarks.clients.otlp_receiver import OtlpReceiver
from stream2llm.pipelines.pipeline import RagPipeline
from stream2llm.server.app import ServerSettings, create_app, start_site
from tests.conftest import corpus_text
from tests.engine.helpers import GREEDY
from tests.engine.test_pipeline import Pages, Refining

pytestmark = pytest.mark.engine

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
async def traced(tiny_model):
    from stream2llm.engine.engine import EngineConfig, StreamingEngine

    receiver = await OtlpReceiver().start()
    saved = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
    os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    config = EngineConfig(
        model="tiny", kv_cache_bytes=64 << 20, max_model_len=2048, otlp_traces_endpoint=receiver.url
    )
    engine = await StreamingEngine.start(config)
    yield engine, receiver
    await engine.shutdown()
    await receiver.stop()
    if saved is None:
        os.environ.pop("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", None)
    else:
        os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = saved


async def spans_of(engine, receiver: OtlpReceiver, trace_id: str, root: str = "stream2llm.session") -> dict:
    """The spans of ``trace_id`` once its root arrived, by name (lists)."""
    for _ in range(100):
        await asyncio.to_thread(engine.tracing.flush)
        spans = receiver.trace(trace_id)
        if any(s.name == root for s in spans):
            break
        await asyncio.sleep(0.1)
    by_name: dict[str, list] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    return by_name


def events(span) -> list[tuple[str, dict]]:
    return [(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in span.events]


def _value(v):
    return getattr(v, v.WhichOneof("value"))


async def test_a_streamed_http_session_continues_the_callers_trace_with_chunk_and_answer_spans(traced):
    engine, receiver = traced
    runner, url = await start_site(create_app(engine, ServerSettings()), "127.0.0.1", 0)
    headers = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
    pieces = [corpus_text(900, seed=s) for s in (1, 2, 3)]
    try:
        async with aiohttp.ClientSession(url) as http:
            body = {"question": "What is this about?", "max_tokens": 6, "temperature": 0}
            async with http.post("/v1/sessions", json=body, headers=headers) as r:
                assert r.status == 201
                sid = (await r.json())["id"]
            for i, text in enumerate(pieces):
                await asyncio.sleep(0.2)
                final = i == len(pieces) - 1
                async with http.post(f"/v1/sessions/{sid}/append", json={"text": text, "final": final}) as r:
                    assert r.status == 200
            for _ in range(200):
                async with http.get(f"/v1/sessions/{sid}") as r:
                    if "result" in (state := await r.json()):
                        break
                await asyncio.sleep(0.05)
            result = state["result"]
    finally:
        await runner.cleanup()
    spans = await spans_of(engine, receiver, TRACE_ID)
    (root,) = spans["stream2llm.session"]
    assert root.parent_span_id.hex() == CALLER_SPAN  # the caller's trace, under the caller's span
    root_id = root.span_id
    (client,) = spans["retrieve client"]
    assert client.parent_span_id == root_id
    arrivals = [attrs for name, attrs in events(client) if name == "context"]
    assert [a["chars"] for a in arrivals] == [len(p) for p in pieces] and arrivals[-1]["final"]
    chunks = spans["chunk"]
    assert len(chunks) >= 4 and all(c.parent_span_id == root_id for c in chunks)  # question + 3 appends
    chunk_ids = {c.span_id for c in chunks}
    prefills = spans["prefill"]
    assert {p.parent_span_id for p in spans["queue"]} == chunk_ids
    assert prefills and {p.parent_span_id for p in prefills} <= chunk_ids
    for chunk in chunks:
        inside = [s for s in spans["queue"] + prefills if s.parent_span_id == chunk.span_id]
        assert all(
            chunk.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano for s in inside
        )
        assert all(s.end_time_unix_nano <= chunk.end_time_unix_nano for s in inside)
    (answer,) = spans["answer"]
    first = [e for e in root.events if e.name == "first token"]
    assert len(first) == 1 and first[0].time_unix_nano == answer.start_time_unix_nano
    assert answer.start_time_unix_nano >= max(c.start_time_unix_nano for c in chunks)
    attrs = {a.key: _value(a.value) for a in root.attributes}
    assert attrs["gen_ai.usage.completion_tokens"] == len(result["token_ids"]) == 6
    assert attrs["gen_ai.request.id"] == sid


async def test_a_pipeline_session_gets_a_span_per_retriever_with_an_event_per_arrival(traced):
    from opentelemetry.sdk.trace import TracerProvider

    engine, receiver = traced
    app_tracer = TracerProvider().get_tracer("app")  # the calling application's own tracing
    pages = [corpus_text(600, seed=40 + i) for i in range(3)]
    stages = [[corpus_text(400, seed=50)], [corpus_text(400, seed=50), corpus_text(400, seed=51)]]
    pipeline = RagPipeline(engine, [Pages(pages), Refining(stages)], sampling=GREEDY)
    with app_tracer.start_as_current_span("app request") as outer:
        await pipeline.answer("Which one matters?")
    trace_id = format(outer.get_span_context().trace_id, "032x")
    spans = await spans_of(engine, receiver, trace_id)
    (root,) = spans["stream2llm.session"]
    assert root.parent_span_id.hex() == format(outer.get_span_context().span_id, "016x")
    (page_span,), (ann_span,) = spans["retrieve pages"], spans["retrieve ann"]
    assert page_span.parent_span_id == ann_span.parent_span_id == root.span_id
    page_events = [a for n, a in events(page_span) if n == "context"]
    assert [a["chars"] for a in page_events][:3] == [len(p) for p in pages] and page_events[-1]["final"]
    assert [a["seq"] for n, a in events(ann_span) if n == "context"] == [0, 1]
    assert page_span.end_time_unix_nano <= spans["answer"][0].start_time_unix_nano


async def test_a_collector_that_stops_answering_never_stalls_a_session(traced):
    engine, receiver = traced
    receiver.up = False
    try:
        before = engine.tracing.counts()
        results = await asyncio.wait_for(
            asyncio.gather(*(one_session(engine, seed) for seed in range(4))), timeout=60
        )
        assert all(len(r.token_ids) == GREEDY.max_tokens for r in results)
        await asyncio.to_thread(engine.tracing.flush, 10.0)
        after = engine.tracing.counts()
        assert after["ended"] > before["ended"] and after["failed"] > before["failed"]
        assert after["exported"] == before["exported"] and receiver.requests > 0
    finally:
        receiver.up = True


async def one_session(engine, seed: int):
    session = await engine.open("What is this about?", GREEDY)
    for k in range(3):
        await asyncio.sleep(0.05)
        await session.append(corpus_text(500, seed=seed * 10 + k), final=k == 2)
    return await session.result()
