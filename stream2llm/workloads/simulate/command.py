"""``stream2llm simulate``: run the simulator for every (policy, qps) and print it beside the
published results where they exist (H200 profile, crawler or anns workloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stream2llm.workloads.simulate.cost_model import CostProfile
from stream2llm.workloads.simulate.simulator import Simulator
from stream2llm.workloads.synth import published_stats, synthesize
from stream2llm.workloads.trace import read_trace


def simulate_command(
    traces: Path | None,
    *,
    workload: str,
    n: int,
    profile: str,
    qps: list[float],
    policies: list[str],
    delay_multiplier: float,
    scale: float,
    block_size: int,
    console: Console,
) -> dict[str, Any]:
    """Run the model for every (policy, qps); print it beside the published results where they exist."""
    requests = read_trace(traces) if traces else synthesize(workload, n, seed=42)
    if requests and traces:
        workload = requests[0].workload
    cost = CostProfile.load(profile)
    sim = Simulator(cost, block_size=block_size)
    runs = [
        sim.run(requests, p, q, scale=scale, delay_multiplier=delay_multiplier).to_json()
        for q in qps
        for p in policies
    ]
    published = published_stats()["results_h200"].get(f"{workload}_ttft_s", {})
    console.print(
        results_table(runs, published, f"simulated ttft_final (s): {workload}, profile {cost.name}")
    )
    return {
        "profile": cost.name,
        "workload": workload,
        "requests": len(requests),
        "runs": runs,
        "published": published,
    }


def results_table(runs: list[dict[str, Any]], published: dict[str, Any], title: str) -> Table:
    """Percentiles per (qps, policy), the published ones and the speedups over nonstream (vLLM's
    FIFO) and, when simulated, over nonstream-ranked (our ranking: the gain of streaming alone)."""
    by_key = {(r["qps"], r["policy"]): r for r in runs}
    ranked = any(p == "nonstream-ranked" for _, p in by_key)
    table = Table(
        "qps",
        "policy",
        "p50",
        "p95",
        "p99",
        "published p50/p95/p99",
        "speedup p50/p95/p99 vs nonstream",
        *(("speedup vs nonstream-ranked",) if ranked else ()),
        "published fcfs speedup",
        title=title,
    )
    for (q, p), run in by_key.items():
        row = _row(q, p, run, by_key.get((q, "nonstream")), published)
        if ranked:
            row.insert(-1, _speedup(by_key.get((q, "nonstream-ranked")), run))
        table.add_row(*row)
    return table


def _speedup(base: dict[str, Any] | None, run: dict[str, Any]) -> str:
    s = run["ttft_final_s"]
    return "/".join(f"{base['ttft_final_s'][k] / s[k]:.2f}" for k in ("p50", "p95", "p99")) if base else "-"


def _row(
    q: float, p: str, run: dict[str, Any], base: dict[str, Any] | None, published: dict[str, Any]
) -> list[str]:
    s = run["ttft_final_s"]
    key = f"{q:g}"
    pub = {"nonstream": published.get("nonstream", {}), "vllm": published.get("vllm_stream", {})}.get(p, {})
    pub_speed = published.get("fcfs_speedup_vs_nonstream", {}).get(key) if p == "fcfs" else None
    return [
        key,
        p,
        f"{s['p50']:.3f}",
        f"{s['p95']:.3f}",
        f"{s['p99']:.3f}",
        "/".join(f"{v:.3f}" for v in pub[key]) if key in pub else "",
        _speedup(base, run),
        "/".join(f"{v:.2f}" for v in pub_speed) if pub_speed else "",
    ]
