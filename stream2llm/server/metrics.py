"""Prometheus metrics of one app, in its own registry, and the engine's state read at scrape time;
beside them vLLM's own (``vllm:...``), which its stat loggers keep in prometheus_client's global
registry when the engine runs with ``vllm_stats``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from stream2llm.engine.engine import SessionResult
    from stream2llm.server.registry import SessionRegistry

TRACE_OUTCOMES = ("ended", "exported", "failed")  # engine.tracing.Tracing.counts()
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Request and session counters and TTFT histograms of one app."""

    def __init__(self, server: SessionRegistry) -> None:
        self._server = server
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "stream2llm_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.sessions = Counter(
            "stream2llm_sessions_ended",
            "Sessions ended, by API and outcome.",
            ["api", "outcome"],
            registry=self.registry,
        )
        self.generated = Counter(
            "stream2llm_generation_tokens", "Tokens generated for HTTP sessions.", registry=self.registry
        )
        self.ttft_final = Histogram(
            "stream2llm_ttft_final_seconds",
            "Time from the final context chunk to the first generated token.",
            ["api"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.ttft_open = Histogram(
            "stream2llm_ttft_open_seconds",
            "Time from opening a session to its first generated token.",
            ["api"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.context_events = Counter(
            "stream2llm_context_events",
            "Context events sessions received over HTTP, by operation.",
            ["op"],
            registry=self.registry,
        )
        self.speculative = Counter(
            "stream2llm_speculative_tokens",
            "Prompt tokens handed to the engine before the final context event (streamed ahead).",
            registry=self.registry,
        )
        self.discarded = Counter(
            "stream2llm_prompt_tokens_discarded",
            "Prefilled prompt tokens whose KV updates threw away (past the longest common prefix).",
            registry=self.registry,
        )
        self.registry.register(EngineCollector(server))

    def exposition(self) -> bytes:
        """The scrape: this app's metrics, then vLLM's where the engine exports them."""
        ours = generate_latest(self.registry)
        if not self._server.engine.config.vllm_stats:
            return ours
        return ours + generate_latest(REGISTRY)

    def record_end(self, api: str, outcome: str, result: SessionResult | None) -> None:
        """One session ended: its outcome, and its tokens and TTFTs when it has a result."""
        self.sessions.labels(api, outcome).inc()
        if result is not None:
            self.generated.inc(len(result.token_ids))
            self.speculative.inc(sum(chunk.tokens for chunk in result.chunks[:-1]))
            self.discarded.inc(result.tokens_discarded)
            if result.token_ids:
                self.ttft_final.labels(api).observe(result.ttft_final_s)
                self.ttft_open.labels(api).observe(result.ttft_open_s)


class EngineCollector:
    """Engine state read at scrape time (the scheduler's live stats board)."""

    def __init__(self, server: SessionRegistry) -> None:
        self._server = server

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        engine = self._server.engine
        stats = engine.stats()
        gauges = {
            "stream2llm_open_sessions": ("Sessions open on the engine.", len(engine.open_sessions())),
            "stream2llm_http_open_sessions": ("Sessions opened over HTTP, running.", self._server.running()),
            "stream2llm_kv_usage_ratio": ("Fraction of KV cache blocks in use (0..1).", stats.kv_usage),
            "stream2llm_requests_running": ("Requests the scheduler is running.", stats.running),
            "stream2llm_requests_waiting": ("Requests waiting for prefill or decode.", stats.waiting),
            "stream2llm_requests_parked": ("Sessions waiting for their next chunk.", stats.parked),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "stream2llm_prompt_tokens_prefilled": ("Prompt tokens computed.", stats.tokens_prefilled),
            "stream2llm_prompt_tokens_recomputed": ("Recomputed after updates.", stats.tokens_recomputed),
            "stream2llm_preemptions": ("Requests preempted or evicted.", stats.preemptions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        yield from _kv_families(stats)
        spans = CounterMetricFamily(
            "stream2llm_trace_spans", "Trace spans ended, exported, failed to export.", labels=["outcome"]
        )
        counts = engine.tracing.counts() if engine.tracing is not None else dict.fromkeys(TRACE_OUTCOMES, 0)
        for outcome, value in counts.items():
            spans.add_metric([outcome], value)
        yield spans
        dropped = engine.tracing.traces_dropped if engine.tracing is not None else 0
        yield CounterMetricFamily(
            "stream2llm_traces_dropped",
            "Sessions whose trace was dropped (its builder behind).",
            value=dropped,
        )


def _kv_families(stats: Any) -> Iterator[Any]:
    """Evictions by how the victim gave its KV back, and the KV moved by the engine's KV tier."""
    evictions = CounterMetricFamily(
        "stream2llm_evictions", "Sessions evicted under memory pressure, by kind.", labels=["kind"]
    )
    evictions.add_metric(["offload"], stats.offloads)
    evictions.add_metric(["recompute"], stats.preemptions - stats.offloads)
    yield evictions
    moved = CounterMetricFamily(
        "stream2llm_kv_tier_bytes", "KV bytes the host KV tier saved and loaded back.", labels=["direction"]
    )
    moved.add_metric(["saved"], stats.tier_bytes_saved)
    moved.add_metric(["loaded"], stats.tier_bytes_loaded)
    yield moved
    yield CounterMetricFamily(
        "stream2llm_kv_tier_load_failures",
        "Blocks missing or damaged in the KV tier.",
        value=stats.tier_load_failures,
    )
