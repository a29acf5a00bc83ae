"""Does the simulator, with the measured CPU profile, predict a measured bench run?

    .venv/bin/python benchmarks/sim_validation.py \
        benchmarks/results/bench-crawler-tiny-qps4/results.json TRACE --limit 120 \
        --out benchmarks/results/sim-validation-cpu.json
The trace is the one the bench replayed (`stream2llm synth --workload crawler --n 300 --seed 42`).

Out of sample: `--profile-from RUN_DIR` fits the profile to another run's step log and results
(`stream2llm calibrate --from-steps` on it) and predicts MEASURED from its trace, arrivals and
options alone; the held-out run's speed and prompt lengths are refused (`simulate.holdout`).
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
from stream2llm.workloads.simulate import holdout
from stream2llm.workloads.simulate.calibrate import profile_from_steps
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


def fitted_profile(run_dir: Path, base: str, max_batched_tokens: int) -> CostProfile:
    """The profile ``stream2llm calibrate --from-steps`` fits to one run: its logged engine steps
    and, from its results, the front end."""
    logs = [run_dir / name for name in ("steps.jsonl.gz", "steps.jsonl")]
    log = next((p for p in logs if p.exists()), None)
    if log is None:
        raise ValueError(f"{run_dir} has no step log to fit a profile to (bench --step-log)")
    return profile_from_steps(log, CostProfile.load(base), max_batched_tokens, bench=run_dir / "results.json")


def predict_runs(
    measured: dict, requests: list[TraceRequest], profile: CostProfile, hold: bool, speed: dict
) -> list[dict]:
    """Per measured run: its percentiles beside the model's on the run's own arrivals."""
    rows = []
    for run in measured["runs"]:
        curve = speed.get(_salt(run), speed.get("*"))
        sim = Simulator(profile, block_size=128, hold_in_flight=hold, speed=curve)
        predicted = sim.run(
            requests,
            run["policy"],
            run["qps"],
            scale=measured["options"]["scale"],
            delay_multiplier=measured["options"]["delay_multiplier"],
            seed=holdout.run_seed(measured, run),  # the run's own arrivals
            max_model_len=measured["engine"]["max_model_len"],
        ).to_json()["ttft_final_s"]
        row = {"policy": run["policy"], "qps": run["qps"], "repeat": run.get("repeat", 0)}
        row["seed"] = holdout.run_seed(measured, run)
        for pct in ("p50", "p95"):
            row[pct] = compare(run["ttft_final_s"][pct], predicted[pct])
        rows.append(row)
        print(row)
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("measured", type=Path)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--profile", default="cpu-tiny", help="the profile (with --profile-from: its base)")
    parser.add_argument(
        "--profile-from",
        type=Path,
        default=None,
        help="out of sample: fit the profile to this other bench run (its steps.jsonl[.gz] and results.json)",
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="model the engine before chunks took over in place (one chunk in flight, the rest held)",
    )
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
    parser.add_argument(
        "--speed-factor",
        type=float,
        default=None,
        help="a constant factor on every step's cost (a sensitivity study: how far a slower or faster "
        "machine moves the prediction); recorded in the report",
    )
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def load_profile(args: argparse.Namespace, measured: dict) -> tuple[CostProfile, dict]:
    """The profile, with the measured run's step budget (a bench option), and for an out-of-sample
    prediction what separates the fit run from the held-out one."""
    budget = measured["engine"]["max_num_batched_tokens"]
    if args.profile_from is None:
        return dataclasses.replace(CostProfile.load(args.profile), max_num_batched_tokens=budget), {}
    holdout.check_held_out(
        args.profile_from, args.measured, speed_window=args.speed_window, lengths=args.measured_lengths
    )
    fit = json.loads((args.profile_from / "results.json").read_text())
    profile = fitted_profile(args.profile_from, args.profile, fit["engine"]["max_num_batched_tokens"])
    diff = holdout.differences(fit, measured)
    print(
        f"fit on {args.profile_from.name}, predicting {args.measured.parent.name}: {holdout.describe(diff)}"
    )
    return dataclasses.replace(profile, max_num_batched_tokens=budget), diff


def main() -> None:
    args = parse_args()
    measured = json.loads(args.measured.read_text())
    requests = read_trace(args.trace)[: args.limit or measured["options"]["requests"]]
    if measured["options"].get("layout") == "stable":  # replay what the bench replayed
        requests = with_stable_layout(requests)
    if args.measured_lengths:
        lengths = measured["runs"][0]["samples"]["prompt_tokens"]
        requests = with_measured_lengths(requests, lengths, measured["options"]["scale"])
    profile, diff = load_profile(args, measured)
    speed = {}
    if args.speed_window:
        logs = [args.measured.with_name(name) for name in ("steps.jsonl.gz", "steps.jsonl")]
        log = next(p for p in logs if p.exists())
        speed = machine_speed(log, measured, requests, profile, args.speed_window)
    if args.speed_factor is not None:
        speed["*"] = lambda _t: args.speed_factor
    rows = predict_runs(measured, requests, profile, args.hold, speed)
    report = {"profile": args.profile, "speed_window_s": args.speed_window, "rows": rows}
    report["speed_factor"] = args.speed_factor
    report["mean_over_repeats"] = means = mean_over_repeats(rows)
    for row in means:
        print(row)
    if args.profile_from is not None:
        report.update(out_of_sample_report(args, diff, rows, profile))
    hits = sum(abs(row[pct]["error"]) <= 0.2 for row in means for pct in ("p50", "p95"))
    print(f"mean over repeats within 20%: {hits} of {2 * len(means)}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def out_of_sample_report(
    args: argparse.Namespace, diff: dict, rows: list[dict], profile: CostProfile
) -> dict:
    """The fit run, the held-out run, what differs, and the means over the seeds the fit never saw."""
    new = [row for row in rows if row["seed"] in diff["new_seeds"] or row["qps"] in diff["new_rates"]]
    within = {
        f"within_{limit:.0%}": sum(
            abs(row[pct]["error"]) <= limit for row in mean_over_repeats(rows) for pct in ("p50", "p95")
        )
        for limit in (0.2, 0.25)
    }
    print(f"out of sample, means within 25%: {within['within_25%']} of {2 * len(mean_over_repeats(rows))}")
    return {
        "fit_run": str(args.profile_from),
        "held_out_run": str(args.measured.parent),
        "differences": diff,
        "what_differs": holdout.describe(diff),
        "fitted_profile": profile.to_json(),
        "mean_over_new_arrivals": mean_over_repeats(new) if new and len(new) < len(rows) else None,
        **within,
    }


if __name__ == "__main__":
    main()
