"""Where the cost model's choice between offloading a victim's KV and recomputing it flips.

For each cost profile (the packaged ones, this machine's calibrated tier, and that tier slowed by a
fixed cost per transfer, as a network store or a congested link would be), the round trip (save
now, load on return) against the recompute of a context of n tokens, and the smallest context the
policy offloads (``Policy.mode`` with the session expected back). Run:

    PYTHONPATH=. .venv/bin/python benchmarks/tier_crossover.py [--slow-s 0.05] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from stream2llm.core.cost_profile import CostProfile, packaged_profiles
from stream2llm.core.policies import OFFLOAD, Costs, RequestView, make_policy

SIZES = [128 * 2**k for k in range(9)]  # 128 .. 32,768 tokens


def crossover_tokens(profile: CostProfile, block_tokens: int = 128, limit: int = 1 << 17) -> int | None:
    """The smallest whole-block context the cost model offloads (None: it never does up to ``limit``)."""
    policy = make_policy("stream2llm", Costs.from_profile(profile))
    for tokens in range(block_tokens, limit + 1, block_tokens):
        view = RequestView("victim", 0.0, 0.0, False, True, tokens, 0, tokens // block_tokens, 1.0)
        if policy.mode(view, now=0.0) == OFFLOAD:
            return tokens
    return None


def rows(profile: CostProfile) -> dict:
    return {
        "profile": profile.name,
        "crossover_tokens": crossover_tokens(profile),
        "by_tokens": {
            n: {"roundtrip_s": profile.offload_roundtrip_s(n), "recompute_s": profile.chunk_s(n, 0)}
            for n in SIZES
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-s", type=float, default=0.05, help="fixed seconds added to each transfer")
    parser.add_argument("--json", type=Path, help="write the table as JSON here")
    args = parser.parse_args()
    profiles = [CostProfile.load(name) for name in packaged_profiles()]
    cpu = CostProfile.load("cpu-tiny")
    slowed = dataclasses.replace(
        cpu,
        name=f"cpu-tiny, tier slowed by {args.slow_s * 1000:g} ms a transfer",
        kv_save=(cpu.kv_save[0] + args.slow_s, cpu.kv_save[1]),
        kv_load=(cpu.kv_load[0] + args.slow_s, cpu.kv_load[1]),
    )
    table = [rows(p) for p in [*profiles, slowed] if p.offload]
    for row in table:
        print(f"{row['profile']}: offloads from {row['crossover_tokens']} tokens")
        for n, c in row["by_tokens"].items():
            trip, again = c["roundtrip_s"] * 1000, c["recompute_s"] * 1000
            print(f"  {n:>6} tokens: round trip {trip:9.3f} ms, recompute {again:9.3f} ms")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
