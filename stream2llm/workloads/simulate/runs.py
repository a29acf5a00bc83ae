"""The simulator over a sweep: every (policy, qps) of one workload under one cost profile, beside
the published results where they exist (H200 profile, crawler or anns workloads). The ``simulate``
command that prints it is ``cli.simulate_runner``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stream2llm.workloads.simulate.cost_model import CostProfile
from stream2llm.workloads.simulate.simulator import Simulator
from stream2llm.workloads.synth import published_stats, synthesize
from stream2llm.workloads.trace import read_trace


def simulate_runs(
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
    preemption: str = "cost",
) -> dict[str, Any]:
    """Run the model for every (policy, qps) of the trace (or ``n`` synthetic ``workload``
    requests); the report holds the runs and the published results they compare with."""
    requests = read_trace(traces) if traces else synthesize(workload, n, seed=42)
    if requests and traces:
        workload = requests[0].workload
    cost = CostProfile.load(profile)
    sim = Simulator(cost, block_size=block_size, preemption=preemption)
    runs = [
        sim.run(requests, p, q, scale=scale, delay_multiplier=delay_multiplier).to_json()
        for q in qps
        for p in policies
    ]
    published = published_stats()["results_h200"].get(f"{workload}_ttft_s", {})
    return {
        "profile": cost.name,
        "preemption": preemption,
        "workload": workload,
        "requests": len(requests),
        "runs": runs,
        "published": published,
    }
