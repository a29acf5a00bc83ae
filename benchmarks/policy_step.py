"""Cost of one policy decision with N queued requests (target: < 200 us at 500).

.venv/bin/python benchmarks/policy_step.py --n 100 500 --out benchmarks/results/policy-step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from stream2llm.core.policies import POLICIES, RequestView, make_policy


def views(n: int, seed: int = 0) -> list[RequestView]:
    rng = random.Random(seed)
    return [
        RequestView(
            f"r{i}",
            rng.random(),
            rng.random() * 5,
            rng.random() < 0.5,
            rng.random() < 0.3,
            rng.randrange(5000),
            rng.randrange(1, 100),
            rng.randrange(1, 40),
            rng.random() * 10,
        )
        for i in range(n)
    ]


def measure(name: str, n: int, repeat: int = 200) -> float:
    vs, policy = views(n), make_policy(name)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        policy.decide(vs, blocks_needed=64, now=1.0)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {
        "benchmark": "policy_step",
        "machine": f"{platform.machine()} {platform.processor()}, Python {platform.python_version()}",
        "median_us": {name: {str(n): round(measure(name, n), 1) for n in args.n} for name in POLICIES},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
