"""Query arrival times: a Poisson process with a fixed seed, the same for every rate and policy (as
published), shared by the replay and the simulator so that both see the same arrivals."""

from __future__ import annotations

import random


def poisson_arrivals(n: int, qps: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(qps)
    return out
