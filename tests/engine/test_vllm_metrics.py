"""vLLM's own metrics (``vllm:...``) beside stream2llm's on ``/metrics``, as ``vllm serve`` exports
them: an engine started with ``vllm_stats`` (what ``stream2llm serve`` does), real traffic, and
the scrape parsed by prometheus_client."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream2llm.server.app import ServerSettings, create_app, start_site
from tests.conftest import EXACT_DTYPE

QUESTION = "What does the documentation say about this?"
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_queries")
HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_queue_time_seconds",
)


@pytest.fixture(scope="module")
async def served(tiny_model):
    from stream2llm.engine.engine import EngineConfig, StreamingEngine

    config = EngineConfig(
        model="tiny", kv_cache_bytes=64 << 20, max_model_len=2048, dtype=EXACT_DTYPE, vllm_stats=True
    )
    engine = await StreamingEngine.start(config)
    runner, url = await start_site(create_app(engine, ServerSettings()), "127.0.0.1", 0)
    async with aiohttp.ClientSession(url) as http:
        yield http, engine
    await runner.cleanup()
    await engine.shutdown()


async def scrape(http) -> dict:
    async with http.get("/metrics") as r:
        assert r.status == 200
        return {family.name: family for family in text_string_to_metric_families(await r.text())}


def total(family, suffix: str = "_total", **labels) -> float:
    return sum(
        s.value for s in family.samples if s.name.endswith(suffix) and labels.items() <= s.labels.items()
    )


async def test_vllm_metrics_are_exported_beside_ours_and_count_the_traffic(served):
    http, engine = served
    before = await scrape(http)
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 5}
    async with http.post("/v1/completions", json=body) as r:
        assert r.status == 200
        completion = await r.json()
    async with http.post("/v1/sessions", json={"question": QUESTION, "max_tokens": 4}) as r:
        sid = (await r.json())["id"]
    context = {"text": "Some context. " * 20, "final": True}
    async with http.post(f"/v1/sessions/{sid}/append", json=context) as r:
        assert r.status == 200
    async with http.get(f"/v1/sessions/{sid}/stream") as r:
        events = [line async for line in r.content if line.startswith(b"data:")]
    assert b'"type": "result"' in events[-2] and events[-1].strip() == b"data: [DONE]"
    after = await scrape(http)

    assert "stream2llm_kv_usage_ratio" in after  # ours, from our registry
    for name in GAUGES:
        assert after[name].type == "gauge", name
        assert {s.labels["model_name"] for s in after[name].samples} == {str(engine.model.path)}
    for name in COUNTERS:
        assert after[name].type == "counter", name
    for name in HISTOGRAMS:
        assert after[name].type == "histogram", name
    prompt = completion["usage"]["prompt_tokens"]
    assert total(after["vllm:prompt_tokens"]) - total(before["vllm:prompt_tokens"]) >= prompt
    assert total(after["vllm:generation_tokens"]) - total(before["vllm:generation_tokens"]) >= 5
    ttft = total(after["vllm:time_to_first_token_seconds"], "_count")
    assert ttft - total(before["vllm:time_to_first_token_seconds"], "_count") >= 1


DASHBOARD = Path(__file__).parents[2] / "ops" / "grafana-dashboard.json"
SUFFIX_TYPES = {"_bucket": "histogram", "_total": "counter", "_sum": "histogram", "_count": "histogram"}


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries read (``vllm:...`` and ``stream2llm_...``)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert len(exprs) > 20
    return {name for expr in exprs for name in re.findall(r"\b(?:vllm:|stream2llm_)[A-Za-z0-9_:]+", expr)}


async def test_every_dashboard_expression_names_an_exported_metric_of_the_right_type(served):
    http, _ = served
    async with http.post("/v1/sessions", json={"question": QUESTION, "max_tokens": 2}) as r:
        sid = (await r.json())["id"]
    async with http.post(f"/v1/sessions/{sid}/append", json={"text": "Some context.", "final": True}) as r:
        assert r.status == 200
    families = await scrape(http)
    for name in sorted(dashboard_metrics()):
        suffix = next((s for s in SUFFIX_TYPES if name.endswith(s)), "")
        family = families.get(name.removesuffix(suffix) if suffix else name)
        assert family is not None, f"the dashboard reads {name}, which /metrics does not export"
        if suffix:
            assert family.type == SUFFIX_TYPES[suffix], f"{name}: {family.type}"
        else:
            assert family.type == "gauge", f"{name} is a {family.type}: a query needs its suffix"
