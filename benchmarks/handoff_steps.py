"""What each final did between its hand-off and its own prefill, from a bench run's step log.

Per run (policy, repeat): how many finals paid a sampled step of the chunk before them first (the
first step after the hand-off prefills one token of the request and another step of it follows
before its first token: the one-token step an update queued behind a chunk used to cost), and the
median and p90 time and steps from the hand-off to the start of the final's own prefill; the
median again counting a step of its own in flight at the hand-off whose tokens the final kept as
its prefill begun (a speculated chunk taken over in place), and the median once the step in flight
at the hand-off has ended (what the engine adds beyond that step).

    PYTHONPATH=. .venv/bin/python benchmarks/handoff_steps.py OUT [OUT ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
from pathlib import Path
from typing import Any

from stream2llm.core.step_log import read_step_log


def step_log_of(out: Path) -> Steps:
    plain = out / "steps.jsonl"
    steps = read_step_log(plain if plain.exists() else out / "steps.jsonl.gz")
    return sorted(steps, key=lambda s: s["t0"])


Steps = list[dict[str, Any]]
OwnSteps = list[tuple[float, int, int]]


def own_steps(steps: Steps, starts: list[float], timeline: list[Any]) -> OwnSteps:
    """(start, tokens, context) of each step that prefilled this request between its hand-off and
    first token."""
    rid, _event, handoff, first = timeline
    out = []
    for step in steps[bisect.bisect_left(starts, handoff) :]:
        if step["t0"] > first:
            break
        out += [(step["t0"], item[0], item[1]) for item in step["prefill"] if item[3] == rid]
    return out


def step_in_flight(steps: Steps, starts: list[float], at: float) -> dict[str, Any] | None:
    """The step running at time ``at``, if any."""
    i = bisect.bisect_right(starts, at) - 1
    return steps[i] if i >= 0 and steps[i]["t2"] > at else None


def kept_in_flight(step: dict[str, Any] | None, rid: str, own: OwnSteps) -> bool:
    """Whether ``step`` (in flight at the hand-off) was prefilling this request's tokens that the final
    kept: its prompt's prefill had then begun before its hand-off (a speculated chunk's, which the
    final took over up to the LCP), so the final waited for nothing but its own work."""
    mine = [item for item in (step or {}).get("prefill", ()) if item[3] == rid]
    if not mine:
        return False
    computed_by_then = mine[0][1] + mine[0][0]
    return own[0][2] >= computed_by_then


def one_final(steps: Steps, starts: list[float], timeline: list[Any]) -> dict[str, Any] | None:
    """The final's sampled step before its own prefill (if any) and its wait for that prefill:
    ``wait_s`` to the first step that starts after the hand-off, ``own_wait_s`` counting a kept step
    of its own in flight at the hand-off as its prefill already under way, ``after_step_s`` the wait
    less the rest of the step in flight."""
    own = own_steps(steps, starts, timeline)
    if not own:
        return None  # nothing left to prefill: the whole prompt was in the KV already
    sampled_first = len(own) > 1 and own[0][1] == 1
    start = own[1][0] if sampled_first else own[0][0]
    handoff = timeline[2]
    waited = sum(1 for s in steps[bisect.bisect_left(starts, handoff) :] if s["t0"] < start)
    running = step_in_flight(steps, starts, handoff)
    kept = kept_in_flight(running, timeline[0], own)
    rest_of_step = running["t2"] - handoff if running else 0.0
    return {
        "sampled_first": sampled_first,
        "wait_s": start - handoff,
        "own_wait_s": 0.0 if kept else start - handoff,
        "after_step_s": max(0.0, start - handoff - rest_of_step),
        "kept_in_flight": kept,
        "steps": waited,
    }


def median_ms(values: list[float]) -> float | None:
    return round(1e3 * statistics.median(values), 1) if values else None


def run_rows(out: Path) -> list[dict[str, Any]]:
    results = json.loads((out / "results.json").read_text())
    steps = step_log_of(out)
    starts = [s["t0"] for s in steps]
    rows = []
    for run in results["runs"]:
        finals = [f for t in run["samples"]["timeline"] if (f := one_final(steps, starts, t)) is not None]
        waits = sorted(f["wait_s"] for f in finals)
        p90 = waits[int(0.9 * (len(waits) - 1))] if waits else None
        rows.append(
            {
                "run": out.name,
                "policy": run["policy"],
                "qps": run["qps"],
                "repeat": run.get("repeat", 0),
                "finals": len(run["samples"]["timeline"]),
                "with_prefill": len(finals),
                "sampled_step_first": sum(f["sampled_first"] for f in finals),
                "handoff_to_prefill_p50_ms": median_ms(waits),
                "handoff_to_prefill_p90_ms": None if p90 is None else round(1e3 * p90, 1),
                "kept_in_flight": sum(f["kept_in_flight"] for f in finals),
                "own_prefill_p50_ms": median_ms([f["own_wait_s"] for f in finals]),
                "after_step_in_flight_p50_ms": median_ms([f["after_step_s"] for f in finals]),
                "steps_waited_p50": statistics.median(f["steps"] for f in finals) if finals else None,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", type=Path, nargs="+", help="bench --step-log output folders")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    rows = [row for out in args.outs for row in run_rows(out)]
    for row in rows:
        print(
            f"{row['run']} {row['policy']:>16} qps {row['qps']} r{row['repeat']}: "
            f"{row['sampled_step_first']}/{row['with_prefill']} finals sampled first; hand-off to prefill "
            f"p50 {row['handoff_to_prefill_p50_ms']} ms (p90 {row['handoff_to_prefill_p90_ms']}), "
            f"{row['steps_waited_p50']} steps; {row['kept_in_flight']} with a kept step of their own in "
            f"flight, counting it p50 {row['own_prefill_p50_ms']} ms; after the step in flight p50 "
            f"{row['after_step_in_flight_p50_ms']} ms"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
