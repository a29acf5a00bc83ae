"""The memory-pressure table: each run of ``stream2llm bench`` results, per KV budget, as markdown.

Per run name (``nonstream``, ``stream2llm@recompute``, ``stream2llm@cost``...): ttft_final p50, p95
and p99 of each repeat (seed) and of the repeats pooled, the mean tokens prefilled, recomputed and
loaded from the KV tier, evictions by kind, the tier's peak bytes against its bound, and errors
(stalls past the deadline). Run:

    PYTHONPATH=. .venv/bin/python benchmarks/pressure_table.py RESULTS_DIR [RESULTS_DIR ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _mean(runs: list[dict], key: str) -> float:
    return statistics.mean(r.get(key, 0) for r in runs)


def table(results: Path) -> str:
    doc = json.loads((results / "results.json").read_text())
    budget = doc["engine"]["kv_cache_bytes"] >> 20
    runs: dict[str, list[dict]] = defaultdict(list)
    for run in doc["runs"]:
        runs[run["policy"]].append(run)
    lines = [
        f"**{budget} MiB of KV** (`{results}`)",
        "",
        "| run | p50 | p95 | p99 | pooled p50 / p95 / p99 | prefilled | recomputed | loaded | evictions"
        " (recompute / offload) | tier peak / bound (MiB) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, repeats in runs.items():
        repeats.sort(key=lambda r: r["repeat"])
        per = {q: " / ".join(f"{r['ttft_final_s'][q]:.3f}" for r in repeats) for q in ("p50", "p95", "p99")}
        pooled = [v for r in repeats for v in r["samples"]["ttft_final_s"]]
        pooled_s = " / ".join(f"{_pct(pooled, q):.3f}" for q in (50, 95, 99))
        prefilled, recomputed, loaded = (
            _mean(repeats, k) for k in ("tokens_prefilled", "tokens_recomputed", "tokens_loaded")
        )
        evictions = " / ".join(
            f"{sum(r['preemptions'].get(k, 0) for r in repeats)}" for k in ("recompute", "offload")
        )
        tier = [r.get("kv_tier") or {} for r in repeats]
        peak = max((t.get("peak_bytes", 0) for t in tier), default=0) >> 20
        bound = max((t.get("bound_bytes") or 0 for t in tier), default=0) >> 20
        lines.append(
            f"| {name} | {per['p50']} | {per['p95']} | {per['p99']} | {pooled_s} | {prefilled:,.0f}"
            f" | {recomputed:,.0f} | {loaded:,.0f} | {evictions}"
            f" | {peak} / {bound} | {sum(r['errors'] for r in repeats)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(Path(path)) + "\n")
