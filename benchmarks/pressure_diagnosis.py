"""Where the slowest finals of a bench run waited, from its results.json and step log.

For each of the slowest finals (ttft after the hand-off): how many engine steps ran while it
waited, how many tokens they prefilled, when its own prefill began, and what gave KV back
meanwhile (the broker's evictions, vLLM's preemptions, tokens computed again). A final that waits
through many empty steps with nothing evicted is blocked on blocks, not on compute.

    PYTHONPATH=. .venv/bin/python benchmarks/pressure_diagnosis.py OUT [--policy stream2llm] [--top 8]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

from stream2llm.core.step_log import read_step_log


def step_log_of(out: Path) -> list[dict[str, Any]]:
    plain = out / "steps.jsonl"
    return read_step_log(plain if plain.exists() else out / "steps.jsonl.gz")


def totals(steps: list[dict[str, Any]]) -> str:
    evicted = [e for s in steps for e in s.get("evicted", ())]
    preempted = sum(len(s.get("preempted", ())) for s in steps)
    again = sum(n for s in steps for _, n in s.get("recomputed", ()))
    tokens = sum(e[1] for e in evicted)
    return f"evictions {len(evicted)} ({tokens} tokens), vLLM preemptions {preempted}, recomputed {again}"


def one_final(steps: list[dict[str, Any]], timeline: list[Any]) -> str:
    """What happened while one final waited for its first token."""
    rid, _event, handoff, first = timeline
    waited = [s for s in steps if handoff <= s["t0"] <= first]
    own = [(s["t0"] - handoff, item[0]) for s in waited for item in s["prefill"] if item[3] == rid]
    empty = sum(1 for s in waited if not s["prefill"] and not s["decodes"])
    evictions = collections.Counter(e[0] for s in steps for e in s.get("evicted", ()))
    started = f"{own[0][0]:.3f} s" if own else "never"
    return (
        f"{rid}: ttft {first - handoff:.2f} s; {len(waited)} steps ({empty} empty) prefilled "
        f"{sum(item[0] for s in waited for item in s['prefill'])} tokens, its own {sum(n for _, n in own)} "
        f"from {started}; evicted {evictions[rid]}x in all, "
        f"{sum(len(s.get('evicted', ())) for s in waited)} evictions while it waited"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a bench --step-log output folder")
    parser.add_argument("--policy", default="stream2llm")
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    results = json.loads((args.out / "results.json").read_text())
    steps = step_log_of(args.out)
    run = next(r for r in results["runs"] if r["policy"] == args.policy)
    print(f"{args.policy}: {totals(steps)}")
    slowest = sorted(run["samples"]["timeline"], key=lambda t: t[3] - t[2], reverse=True)
    for timeline in slowest[: args.top]:
        print(one_final(steps, timeline))


if __name__ == "__main__":
    main()
