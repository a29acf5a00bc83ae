"""Cost of the policy step with N requests: the ranking alone, and the broker's whole step.

The whole step is what the engine core does before each vLLM step (``Broker.apply``: the
policy's view of each request, the ranking, the blocks short, deferrals, the queues reordered),
timed inside real steps of vLLM's scheduler as ``tests/unit/synthetic.py`` builds it (no model):
mostly parked sessions, some complete requests decoding and some partial streams prefilling or
waiting for the token budget, with KV to spare (nothing is short, nobody is evicted).

.venv/bin/python benchmarks/policy_step.py --n 100 500 1000 --out benchmarks/results/policy-step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

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
    """Median microseconds of one ``Policy.decide`` on N synthetic views (30% parked)."""
    vs, policy = views(n), make_policy(name)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        policy.decide(vs, blocks_needed=64, now=1.0)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def mix(n: int) -> tuple[int, int, int]:
    """(parked, decoding, prefilling) of N requests: 92% parked sessions."""
    active = max(n // 25, 2)
    return n - 2 * active, active, active


def loaded_scheduler(model_dir: str, n: int, steps: int = 300, policy: str = "stream2llm") -> Any:
    """vLLM's scheduler (ours) holding N requests as ``mix`` says, KV to spare for ``steps``
    more steps (each fills at most a token budget's blocks)."""
    from tests.unit.synthetic import make_request, make_scheduler, run_until_idle, step

    parked, decoding, prefilling = mix(n)
    budget = max(512, n + 16)  # vLLM wants at least a token per batch slot
    scheduler = make_scheduler(
        model_dir,
        num_blocks=8 * n + 1024 + steps * budget // 16,
        policy=policy,
        max_num_batched_tokens=budget,
        max_num_seqs=n + 16,
    )
    for i in range(parked):
        scheduler.add_request(make_request(scheduler, f"p{i}", [i % 1000 + 1, *range(2000, 2039)]))
    run_until_idle(scheduler, max_steps=10 * n)
    for i in range(decoding):
        ids = [i % 1000 + 1, *range(3000, 3039)]
        scheduler.add_request(
            make_request(scheduler, f"d{i}", ids, max_tokens=3000, final=True, resumable=False)
        )
    for _ in range(3):
        step(scheduler)
    for i in range(prefilling):
        add_prefill(scheduler, f"w{i}")
    step(scheduler)
    return scheduler


def add_prefill(scheduler: Any, request_id: str) -> Any:
    """A new partial stream whose 2,000-token opening chunk takes several steps."""
    from tests.unit.synthetic import make_request

    request = make_request(scheduler, request_id, [hash(request_id) % 1000 + 1, *range(4000, 5999)])
    scheduler.add_request(request)
    return request


def measure_apply(model_dir: str, n: int, steps: int = 300) -> dict[str, float]:
    """``Broker.apply`` over real steps with N requests, in microseconds: the median wall time,
    its 90th percentile, and the median CPU time of the thread (what the step costs when other
    work shares the CPU). A partial stream that parks is replaced by a new one (the mix stays,
    the parked sessions grow slowly)."""
    from stream2llm.core import vllm_compat as compat
    from tests.unit.synthetic import step

    scheduler = loaded_scheduler(model_dir, n, steps)
    broker, wall, cpu = scheduler.broker, [], []
    apply = broker.apply

    def timed() -> None:
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        apply()
        wall.append(time.perf_counter_ns() - t0)
        cpu.append(time.thread_time_ns() - c0)
        assert broker.short_last == 0, "the scenario must have KV to spare"

    broker.apply = timed
    prefills = [scheduler.requests[f"w{i}"] for i in range(mix(n)[2])]
    for k in range(steps):
        step(scheduler)
        for i, request in enumerate(prefills):
            if compat.is_parked(request):
                prefills[i] = add_prefill(scheduler, f"w{i}-{k}")
    return {
        "median": round(statistics.median(wall) / 1e3, 1),
        "p90": round(statistics.quantiles(wall, n=10)[-1] / 1e3, 1),
        "cpu_median": round(statistics.median(cpu) / 1e3, 1),
    }


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    return f"{cpu or platform.processor()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from stream2llm.engine import models

    model_dir = str(models.prepare("tiny").path)
    result = {
        "benchmark": "policy_step",
        "machine": machine(),
        "mix": {str(n): dict(zip(("parked", "decoding", "prefilling"), mix(n))) for n in args.n},
        "apply_us": {str(n): measure_apply(model_dir, n, args.steps) for n in args.n},
        "decide_median_us": {name: {str(n): round(measure(name, n), 1) for n in args.n} for name in POLICIES},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
