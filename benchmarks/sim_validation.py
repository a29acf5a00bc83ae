"""Does the simulator, with the measured CPU profile, predict a measured bench run?

    .venv/bin/python benchmarks/sim_validation.py \
        benchmarks/results/bench-crawler-tiny-qps4/results.json TRACE --limit 120 \
        --out benchmarks/results/sim-validation-cpu.json
The trace is the one the bench replayed (`stream2llm synth --workload crawler --n 300 --seed 42`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from stream2llm.core.step_log import read_step_log
from stream2llm.workloads.arrivals import poisson_arrivals
from stream2llm.workloads.simulate.cost_model import CostProfile, step_cycles
from stream2llm.workloads.simulate.simulator import TEMPLATE_TOKENS, Simulator
from stream2llm.workloads.synth import FILLER_PREFIX, request_tokens
from stream2llm.workloads.trace import TraceEvent, TraceRequest, read_trace, with_stable_layout


def compare(measured: float, predicted: float) -> dict:
    error = round(predicted / measured - 1, 3)
    return {"measured": round(measured, 4), "predicted": round(predicted, 4), "error": error}


def with_measured_lengths(requests: list[TraceRequest], prompt_tokens: list[int], scale: float) -> list:
    """Each request's synthetic token counts stretched to the prompt length the bench measured:
    runs made before the filler text had exact token counts replayed ~2.5% more than the trace."""
    out = []
    for request, measured in zip(requests, prompt_tokens):
        factor = max(measured - TEMPLATE_TOKENS, 1) / max(request_tokens(request) * scale, 1)
        events = tuple(_stretched(e, factor) for e in request.events)
        out.append(dataclasses.replace(request, events=events))
    return out


def _stretched(event: TraceEvent, factor: float) -> TraceEvent:
    if event.n_tokens is not None:
        return dataclasses.replace(event, n_tokens=max(1, round(event.n_tokens * factor)))
    if event.docs is None:
        return event
    docs = []
    for doc in event.docs:
        if doc.startswith(FILLER_PREFIX):
            name, n = doc.rsplit(":", 1)
            doc = f"{name}:{max(1, round(int(n) * factor))}"
        docs.append(doc)
    return dataclasses.replace(event, docs=tuple(docs))


def machine_speed(
    steps_path: Path, measured: dict, requests: list[TraceRequest], profile: CostProfile, window_s: float
) -> dict[str, Callable[[float], float]]:
    """Per run (its cache salt, the tail of every request id): the machine's slowness over the
    run's time, in windows of ``window_s``: logged busy time over what the profile charges for the
    same steps (windows with under a second of work take the run's whole ratio). These CPUs drift
    by 10-20% for stretches of a run; the profile, fitted to the whole bench, is their average."""
    steps = read_step_log(steps_path)
    costs = profile.step_costs()
    busy: dict[str, dict[int, list[float]]] = {}
    starts = {_salt(run): _run_start(run, requests, measured["options"]) for run in measured["runs"]}
    for step, features, seconds in step_cycles(steps):
        salts = {item[3].rsplit("@", 1)[-1] for item in step["prefill"]}
        salt = salts.pop() if len(salts) == 1 else None
        if salt in starts:
            window = busy.setdefault(salt, {}).setdefault(
                int((step["t0"] - starts[salt]) // window_s), [0, 0]
            )
            window[0] += seconds
            window[1] += costs.predict(features)
    return {salt: _speed_curve(windows, window_s) for salt, windows in busy.items()}


def _speed_curve(windows: dict[int, list[float]], window_s: float) -> Callable[[float], float]:
    whole = sum(w[0] for w in windows.values()) / sum(w[1] for w in windows.values())
    ratios = {i: logged / model for i, (logged, model) in windows.items() if model > 1.0}
    return lambda t: ratios.get(int(t // window_s), whole)


def _run_start(run: dict, requests: list[TraceRequest], options: dict) -> float:
    """The run's time zero on the step log's clock, from its first request's final event."""
    request_id, final_at, *_ = run["samples"]["timeline"][0]
    index = next(i for i, r in enumerate(requests) if r.id == request_id.rsplit("@", 1)[0])
    arrival = poisson_arrivals(len(requests), run["qps"], options["seed"] + run.get("repeat", 0))[index]
    return final_at - arrival - requests[index].events[-1].t * options["delay_multiplier"]


def _salt(run: dict) -> str:
    return run["samples"]["timeline"][0][0].rsplit("@", 1)[-1]


def mean_over_repeats(rows: list[dict]) -> list[dict]:
    """Per (policy, qps): measured and predicted percentiles averaged over the repeats (seeds), as
    the bench reports them."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["policy"], row["qps"]), []).append(row)
    out = []
    for (policy, qps), group in groups.items():
        mean = {"policy": policy, "qps": qps, "repeats": len(group)}
        for pct in ("p50", "p95"):
            m = statistics.fmean(r[pct]["measured"] for r in group)
            mean[pct] = compare(m, statistics.fmean(r[pct]["predicted"] for r in group))
        out.append(mean)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("measured", type=Path)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--profile", default="cpu-tiny")
    parser.add_argument("--no-hold", action="store_true", help="model every chunk as applied on arrival")
    parser.add_argument(
        "--measured-lengths",
        action="store_true",
        help="stretch each request to the prompt length the bench measured (runs before exact filler)",
    )
    parser.add_argument(
        "--speed-window",
        type=float,
        default=None,
        help="seconds: feed the model each run's logged machine speed over time, in windows this long "
        "(needs steps.jsonl[.gz] beside the results)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    measured = json.loads(args.measured.read_text())
    requests = read_trace(args.trace)[: args.limit]
    if measured["options"].get("layout") == "stable":  # replay what the bench replayed
        requests = with_stable_layout(requests)
    if args.measured_lengths:
        lengths = measured["runs"][0]["samples"]["prompt_tokens"]
        requests = with_measured_lengths(requests, lengths, measured["options"]["scale"])
    # the engine's step budget is a bench option (--max-batched-tokens); the model must use the same
    profile = dataclasses.replace(
        CostProfile.load(args.profile), max_num_batched_tokens=measured["engine"]["max_num_batched_tokens"]
    )
    speed = {}
    if args.speed_window:
        logs = [args.measured.with_name(name) for name in ("steps.jsonl.gz", "steps.jsonl")]
        log = next(p for p in logs if p.exists())
        speed = machine_speed(log, measured, requests, profile, args.speed_window)
    rows = []
    for run in measured["runs"]:
        sim = Simulator(profile, block_size=128, hold_in_flight=not args.no_hold, speed=speed.get(_salt(run)))
        predicted = sim.run(
            requests,
            run["policy"],
            run["qps"],
            scale=measured["options"]["scale"],
            delay_multiplier=measured["options"]["delay_multiplier"],
            seed=measured["options"]["seed"] + run.get("repeat", 0),  # the run's own arrivals
            max_model_len=measured["engine"]["max_model_len"],
        ).to_json()["ttft_final_s"]
        row = {"policy": run["policy"], "qps": run["qps"], "repeat": run.get("repeat", 0)}
        for pct in ("p50", "p95"):
            row[pct] = compare(run["ttft_final_s"][pct], predicted[pct])
        rows.append(row)
        print(row)
    means = mean_over_repeats(rows)
    for row in means:
        print(row)
    hits = sum(abs(row[pct]["error"]) <= 0.2 for row in means for pct in ("p50", "p95"))
    print(f"mean over repeats within 20%: {hits} of {2 * len(means)}")
    if args.out:
        report = {"profile": args.profile, "speed_window_s": args.speed_window, "rows": rows}
        report["mean_over_repeats"] = means
        args.out.write_text(json.dumps(report, indent=2) + "\n")
