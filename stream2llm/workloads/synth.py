"""Synthetic retrieval traces whose distributions match the published workload statistics.

Fitted from the published summary (``data/published_stats.json``): gaps and tokens per query are
log-normal with the published median and mean (sigma = sqrt(2 ln(mean / median))); chunks per
query are Poisson around the published mean (1 + Poisson for ANN, whose median is 4 at mean 4.42).

Text comes as ``n_tokens`` filler (append) or filler documents (update): deterministic text the
replayer generates from an id, so traces stay small and every replay sends the same tokens.
ANN-like updates change the top-k as real progressive search does (``churn.py``: fitted to a
capture; most updates change nothing), or, as the ``uniform`` stress variant, replace 1-3 of 10
documents at random slots every update.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from dataclasses import dataclass
from importlib import resources

from stream2llm.workloads.churn import ChurnModel, churned, packaged_churn
from stream2llm.workloads.trace import TraceEvent, TraceRequest

CHURNS = ("fitted", "uniform")
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


def filler_tokens(doc: str) -> int:
    """The token count a filler document asks for."""
    return int(doc.rsplit(":", 1)[1])


def _crawler_request(rng: random.Random, shape: WorkloadShape, rid: str, total: int, n: int) -> TraceRequest:
    t, events = shape.first_wait(rng), []
    for size in _split(rng, total, n):
        t += rng.lognormvariate(math.log(shape.gap_median_s), shape.gap_sigma)
        events.append(TraceEvent(t, "append", n_tokens=size))
    return TraceRequest(rid, "crawler", f"synthetic crawler query {rid}", tuple(events))


def _ann_request(
    rng: random.Random, shape: WorkloadShape, rid: str, total: int, n: int, churn: ChurnModel | None
) -> TraceRequest:
    """A top-k that refines: k documents, each update changing them by the churn model (``None``:
    the uniform stress variant, 1-3 documents replaced in place at random slots every update)."""
    k = churn.k if churn else 10
    sizes = _split(rng, total, k)
    docs = [filler_doc(f"{rid}-d{i}", sizes[i]) for i in range(k)]
    t, events, ids = shape.first_wait(rng), [], itertools.count(k)

    def fresh(old: str) -> str:  # a newcomer as long as the document it replaces
        return filler_doc(f"{rid}-d{next(ids)}", filler_tokens(old))

    for step in range(n):
        if step and churn:
            docs = churned(rng, churn, docs, step, n - 1, fresh)
        elif step:
            for slot in rng.sample(range(k), rng.randint(1, 3)):
                docs[slot] = filler_doc(f"{rid}-d{next(ids)}", sizes[slot])
        t += rng.lognormvariate(math.log(shape.gap_median_s), shape.gap_sigma)
        events.append(TraceEvent(t, "update", docs=tuple(docs)))
    return TraceRequest(rid, "anns", f"synthetic ANN query {rid}", tuple(events))


def churn_model(churn: str | ChurnModel) -> ChurnModel | None:
    """The ANN churn by name: ``fitted`` (the packaged fit to real progressive search),
    ``uniform`` (``None``: 1-3 of 10 documents replaced at random every update), or a model."""
    if isinstance(churn, ChurnModel):
        return churn
    if churn not in CHURNS:
        raise ValueError(f"unknown churn {churn!r}; expected one of {', '.join(CHURNS)}")
    return packaged_churn() if churn == "fitted" else None


def synthesize(
    workload: str, n: int, seed: int = 42, scale: float = 1.0, churn: str | ChurnModel = "fitted"
) -> list[TraceRequest]:
    """``n`` requests of the named workload (``crawler`` or ``anns``); ``scale`` multiplies tokens;
    ``churn`` (anns only) is how each update changes the top-k (``churn_model``)."""
    table = shapes()
    if workload not in table:
        raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(table)}")
    shape = table[workload]
    model = churn_model(churn) if shape.op == "update" else None
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tokens = rng.lognormvariate(math.log(shape.tokens_median), shape.tokens_sigma)
        total, rid, chunks = max(16, round(tokens * scale)), f"{workload}-{i:05d}", _chunks(rng, shape)
        if shape.op == "append":
            out.append(_crawler_request(rng, shape, rid, total, chunks))
        else:
            out.append(_ann_request(rng, shape, rid, total, chunks, model))
    return out


def request_tokens(request: TraceRequest) -> int:
    """Context tokens of a synthetic request (the final context for updates)."""
    last = request.events[-1]
    if last.docs is not None:
        return sum(filler_tokens(d) for d in last.docs if d.startswith(FILLER_PREFIX))
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
