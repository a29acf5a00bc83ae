"""Synthetic retrieval traces whose distributions match the published workload statistics.

Fitted from the published summary (``data/published_stats.json``): gaps and tokens per query are
log-normal with the published median and mean (sigma = sqrt(2 ln(mean / median))); chunks per
query are Poisson around the published mean (1 + Poisson for ANN, whose median is 4 at mean 4.42).

Text comes as ``n_tokens`` filler (append) or filler documents (update): deterministic text the
replayer generates from an id, so traces stay small and every replay sends the same tokens.
ANN-like updates keep most documents and replace a few, as a refining top-k does.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass
from importlib import resources

from stream2llm.workloads.trace import TraceEvent, TraceRequest

FILLER_PREFIX = "@filler:"  # a document "@filler:<id>:<n_tokens>" is deterministic filler text


def published_stats() -> dict:
    return json.loads(
        resources.files("stream2llm.workloads").joinpath("data/published_stats.json").read_text()
    )


@dataclass(frozen=True)
class WorkloadShape:
    op: str
    chunks_mean: float
    chunks_max: int
    chunks_offset: int  # chunks = offset + Poisson(mean - offset)
    gap_median_s: float
    gap_mean_s: float
    tokens_median: float
    tokens_mean: float
    first_median_s: float = 0.0  # extra wait before the first chunk (an initial search), 0 if none
    first_mean_s: float = 0.0

    @property
    def gap_sigma(self) -> float:
        return math.sqrt(2 * math.log(self.gap_mean_s / self.gap_median_s))

    @property
    def first_sigma(self) -> float:
        return (
            math.sqrt(2 * math.log(self.first_mean_s / self.first_median_s)) if self.first_median_s else 0.0
        )

    def first_wait(self, rng: random.Random) -> float:
        if not self.first_median_s:
            return 0.0
        return rng.lognormvariate(math.log(self.first_median_s), self.first_sigma)

    @property
    def tokens_sigma(self) -> float:
        return math.sqrt(2 * math.log(self.tokens_mean / self.tokens_median))


def _first_wait(w: dict) -> tuple[float, float]:
    """The collection time the gaps do not explain: where it is consistent (mean above median),
    the wait before the first chunk (the ANN pipeline's initial search)."""
    chunks, gaps, coll = w["chunks_per_query"], w["inter_chunk_gap_ms"], w["collection_s"]
    median = coll["p50"] - (chunks["median"] - 1) * gaps["median"] / 1000
    mean = coll["mean"] - (chunks["mean"] - 1) * gaps["mean"] / 1000
    return (median, mean) if mean > median > 0 else (0.0, 0.0)


def shapes() -> dict[str, WorkloadShape]:
    w = published_stats()["workloads"]
    return {
        "crawler": _shape(w["crawler"], "append", 0),
        "anns": _shape(w["anns"], "update", 1, *_first_wait(w["anns"])),
    }


def _shape(w: dict, op: str, chunks_offset: int, *first_wait: float) -> WorkloadShape:
    """One workload's shape from its published statistics (both workloads read the same ones)."""
    chunks, gaps, tokens = w["chunks_per_query"], w["inter_chunk_gap_ms"], w["tokens_per_query"]
    return WorkloadShape(
        op,
        chunks["mean"],
        chunks["max"],
        chunks_offset,
        gaps["median"] / 1000,
        gaps["mean"] / 1000,
        tokens["p50"],
        tokens["mean"],
        *first_wait,
    )


def _poisson(rng: random.Random, lam: float) -> int:
    threshold, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= threshold:
            return k
        k += 1


def _chunks(rng: random.Random, shape: WorkloadShape) -> int:
    n = shape.chunks_offset + _poisson(rng, shape.chunks_mean - shape.chunks_offset)
    return max(1, min(n, shape.chunks_max))


def _split(rng: random.Random, total: int, n: int) -> list[int]:
    weights = [rng.expovariate(1.0) for _ in range(n)]
    s = sum(weights)
    parts = [max(1, round(total * w / s)) for w in weights]
    return parts


def filler_doc(doc_id: str, n_tokens: int) -> str:
    return f"{FILLER_PREFIX}{doc_id}:{n_tokens}"


def _crawler_request(rng: random.Random, shape: WorkloadShape, rid: str, total: int, n: int) -> TraceRequest:
    t, events = shape.first_wait(rng), []
    for size in _split(rng, total, n):
        t += rng.lognormvariate(math.log(shape.gap_median_s), shape.gap_sigma)
        events.append(TraceEvent(t, "append", n_tokens=size))
    return TraceRequest(rid, "crawler", f"synthetic crawler query {rid}", tuple(events))


def _ann_request(rng: random.Random, shape: WorkloadShape, rid: str, total: int, n: int) -> TraceRequest:
    """A top-k that refines: k documents; each update replaces a few of them (new ids)."""
    k = 10
    sizes = _split(rng, total, k)
    docs = [filler_doc(f"{rid}-d{i}", sizes[i]) for i in range(k)]
    t, events, next_id = shape.first_wait(rng), [], k
    for step in range(n):
        if step:
            for slot in rng.sample(range(k), rng.randint(1, 3)):
                docs[slot] = filler_doc(f"{rid}-d{next_id}", sizes[slot])
                next_id += 1
        t += rng.lognormvariate(math.log(shape.gap_median_s), shape.gap_sigma)
        events.append(TraceEvent(t, "update", docs=tuple(docs)))
    return TraceRequest(rid, "anns", f"synthetic ANN query {rid}", tuple(events))


def synthesize(workload: str, n: int, seed: int = 42, scale: float = 1.0) -> list[TraceRequest]:
    """``n`` requests of the named workload (``crawler`` or ``anns``); ``scale`` multiplies tokens."""
    table = shapes()
    if workload not in table:
        raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(table)}")
    shape = table[workload]
    rng = random.Random(seed)
    build = _crawler_request if shape.op == "append" else _ann_request
    out = []
    for i in range(n):
        tokens = rng.lognormvariate(math.log(shape.tokens_median), shape.tokens_sigma)
        total = max(16, round(tokens * scale))
        out.append(build(rng, shape, f"{workload}-{i:05d}", total, _chunks(rng, shape)))
    return out


def request_tokens(request: TraceRequest) -> int:
    """Context tokens of a synthetic request (the final context for updates)."""
    last = request.events[-1]
    if last.docs is not None:
        return sum(int(d.rsplit(":", 1)[1]) for d in last.docs if d.startswith(FILLER_PREFIX))
    return sum(e.n_tokens or 0 for e in request.events)


def achieved_stats(requests: list[TraceRequest]) -> dict[str, dict[str, float]]:
    """The statistics the published summary reports, measured on a trace."""

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    tokens = [request_tokens(r) for r in requests]
    chunks = [len(r.events) for r in requests]
    gaps = [(b.t - a.t) * 1000 for r in requests for a, b in zip(r.events, r.events[1:])]
    durations = [r.duration_s for r in requests]
    return {
        "tokens_per_query": {
            "mean": statistics.fmean(tokens),
            "p50": pct(tokens, 0.5),
            "p95": pct(tokens, 0.95),
        },
        "chunks_per_query": {
            "mean": statistics.fmean(chunks),
            "median": statistics.median(chunks),
            "max": max(chunks),
        },
        "inter_chunk_gap_ms": {
            "mean": statistics.fmean(gaps),
            "median": statistics.median(gaps),
            "p95": pct(gaps, 0.95),
        },
        "collection_s": {
            "mean": statistics.fmean(durations),
            "p50": pct(durations, 0.5),
            "p95": pct(durations, 0.95),
        },
    }
