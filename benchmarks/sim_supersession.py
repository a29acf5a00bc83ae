"""Chunks taken over in place against the held engine, in the simulator, on ANN-like traces.

The validated ``xeon-anns-s055`` profile (512-token steps), the assembler's stable layout, 120
requests (fewer at low load: ``--limit``), seeds 42-44: p50 and p95 of nonstream,
nonstream-ranked and stream2llm, and stream2llm's ratios, with our sessions' chunks taken over in
place (the engine now) and held in the front end (the engine before, ``hold_in_flight``).

    stream2llm synth --workload anns --n 300 --seed 2027 --churn fitted --out anns-fitted.jsonl
    PYTHONPATH=. .venv/bin/python benchmarks/sim_supersession.py anns-fitted.jsonl [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from stream2llm.workloads.metrics import summary
from stream2llm.workloads.simulate.cost_model import CostProfile
from stream2llm.workloads.simulate.simulator import Simulator
from stream2llm.workloads.trace import read_trace, with_stable_layout

PROFILE = "benchmarks/results/profile-cpu-tiny-steps-xeon-anns-s055.json"
POLICIES = ("nonstream", "nonstream-ranked", "stream2llm")
LOADS = ((0.25, 24), (1.0, 60), (2.0, 120))  # queries/s and requests, as the engine runs


def percentiles(sim: Simulator, trace: list, policy: str, qps: float, limit: int) -> tuple[float, float]:
    """p50 and p95 of TTFT after the final event, means over seeds 42-44."""
    runs = [
        summary(sim.run(trace[:limit], policy, qps, scale=0.55, seed=seed, max_model_len=32768).ttft_final)
        for seed in (42, 43, 44)
    ]
    return statistics.mean(r["p50"] for r in runs), statistics.mean(r["p95"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    trace = with_stable_layout(read_trace(args.trace))
    profile = dataclasses.replace(CostProfile.load(PROFILE), max_num_batched_tokens=512)
    rows = []
    for qps, limit in LOADS:
        for held in (False, True):
            sim = Simulator(profile, block_size=128, hold_in_flight=held)
            got = {p: percentiles(sim, trace, p, qps, limit) for p in POLICIES}
            ours = got["stream2llm"]
            row = {"qps": qps, "requests": limit, "engine": "held" if held else "in place", **got}
            row["vs_nonstream"] = [round(got["nonstream"][i] / ours[i], 2) for i in (0, 1)]
            row["vs_nonstream_ranked"] = [round(got["nonstream-ranked"][i] / ours[i], 2) for i in (0, 1)]
            rows.append(row)
            cells = " ".join(f"{p} {got[p][0]:.3f}/{got[p][1]:.3f}" for p in POLICIES)
            print(
                f"qps {qps} {row['engine']:>8}: p50/p95 {cells}; x nonstream {row['vs_nonstream']},"
                f" x ranked {row['vs_nonstream_ranked']}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
