"""Benchmark metrics: percentiles, per-run summaries and the ``stream2llm.bench/1`` result schema."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

BENCH_SCHEMA = "stream2llm.bench/1"
PERCENTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99, "p999": 0.999}
# TTFT on three clocks: from the session's final event (its hand-off to the engine), from when the
# trace says that event was due (the replay may be late), and from the query's arrival
TTFT_METRICS = ("ttft_final_s", "ttft_due_s", "ttft_query_s")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    out = {name: percentile(values, q) for name, q in PERCENTILES.items()}
    out["mean"] = statistics.fmean(values) if values else math.nan
    return out


@dataclass
class RequestRecord:
    """One replayed request."""

    id: str
    arrival_s: float  # from the run's start
    ttft_final_s: float | None = None  # first token - the session's final event (its hand-off)
    ttft_due_s: float | None = None  # first token - when the trace says the final event was due
    ttft_query_s: float | None = None  # first token - the session's open (the query's arrival)
    done_s: float | None = None  # completion, from the run's start
    prompt_tokens: int = 0
    final_chunk_tokens: int = 0
    tokens_prefilled: int = 0
    tokens_recomputed: int = 0
    tokens_discarded: int = 0  # computed KV that updates threw away
    tokens_loaded: int = 0  # brought back from the KV tier instead of recomputed
    lower_bound_s: float | None = None
    error: str | None = None
    # engine request id, then monotonic times of the final event, its hand-off, the first token
    timeline: tuple[str, float, float, float] | None = None
    kv_transfer: dict[str, int] | None = None  # disaggregated deployments: what the KV connector moved
    second_token_s: float | None = None  # first token to the second (over HTTP: text deltas)
    tpot_s: float | None = None  # time per output token after the first


@dataclass
class RunResult:
    policy: str
    qps: float
    repeat: int
    records: list[RequestRecord] = field(default_factory=list)
    completion_s: float = 0.0
    preemption: str | None = None  # how the run's victims gave KV back (engine runs)
    preemptions: dict[str, int] = field(default_factory=dict)  # evictions by how KV was given back
    kv_tier: dict[str, int] = field(default_factory=dict)  # what the KV tier moved in the run
    position: int = 0  # where the run came in its repeat (policies rotate from repeat to repeat)

    def to_json(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.error is None]
        ttfts = {m: [getattr(r, m) for r in ok if getattr(r, m) is not None] for m in TTFT_METRICS}
        return {
            "policy": self.policy,
            "qps": self.qps,
            "repeat": self.repeat,
            "position": self.position,
            "requests": len(self.records),
            **{metric: summary(values) for metric, values in ttfts.items()},
            "lower_bound_s": summary([r.lower_bound_s for r in ok if r.lower_bound_s is not None]),
            "completion_s": self.completion_s,
            "tokens_prefilled": sum(r.tokens_prefilled for r in ok),
            "tokens_invalidated": sum(r.tokens_discarded for r in ok),
            "tokens_recomputed": sum(r.tokens_recomputed for r in ok),
            "tokens_loaded": sum(r.tokens_loaded for r in ok),
            "preemption": self.preemption,
            "preemptions": dict(self.preemptions),
            "kv_tier": dict(self.kv_tier),
            **_decode_summaries(ok),
            "errors": len(self.records) - len(ok),
            "error_examples": sorted({r.error for r in self.records if r.error})[:3],
            "samples": {
                "ttft_final_s": [round(v, 5) for v in ttfts["ttft_final_s"]],
                "ttft_due_s": [round(v, 5) for v in ttfts["ttft_due_s"]],
                "final_chunk_tokens": [r.final_chunk_tokens for r in ok],
                "prompt_tokens": [r.prompt_tokens for r in ok],
                "timeline": [r.timeline for r in ok],  # to join with the step log
                **({"kv_transfer": [r.kv_transfer for r in ok]} if any(r.kv_transfer for r in ok) else {}),
                **_decode_samples(ok),
            },
        }


def _decode_summaries(ok: Sequence[RequestRecord]) -> dict[str, Any]:
    """Second-token latency and time per output token, where the transport measured them."""
    out = {}
    for metric in ("second_token_s", "tpot_s"):
        values = [getattr(r, metric) for r in ok if getattr(r, metric) is not None]
        if values:
            out[metric] = summary(values)
    return out


def _decode_samples(ok: Sequence[RequestRecord]) -> dict[str, Any]:
    """Each request's second-token latency, where the transport measured it (to join deployments'
    runs request by request)."""
    if all(r.second_token_s is None for r in ok):
        return {}
    return {"second_token_s": [None if r.second_token_s is None else round(r.second_token_s, 5) for r in ok]}


def ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of a 95% confidence interval (t-distribution, small n)."""
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(
        len(values), 2.0
    )
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(len(values))


def summarize_repeats(runs: Sequence[dict]) -> list[dict]:
    """Per (policy, qps): each percentile's mean over repeats and its 95% confidence half-width
    (``ttft_due_s`` only where every repeat has it: results from before it was measured lack it)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["policy"], run["qps"]), []).append(run)
    out = []
    for (policy, qps), group in groups.items():
        entry: dict = {"policy": policy, "qps": qps, "repeats": len(group)}
        for metric in TTFT_METRICS:
            if not all(metric in r for r in group):
                continue
            entry[metric] = {}
            for pct in (*PERCENTILES, "mean"):
                mean, half = ci95([r[metric][pct] for r in group])
                entry[metric][pct] = {"mean": mean, "ci95": half}
        mean, half = ci95([r["completion_s"] for r in group])
        entry["completion_s"] = {"mean": mean, "ci95": half}
        out.append(entry)
    return out
