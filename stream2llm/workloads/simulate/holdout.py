"""Out-of-sample validation: what separates the run a profile is fitted on from the run it predicts.

A prediction is out of sample only when nothing measured in the held-out run reaches the model
except what a user has before running it: the trace, the arrivals (seed and rate) and the engine's
and bench's options. So the held-out run's step log (its machine speed) and its measured prompt
lengths are refused, and what differs between the two runs is recorded beside the errors."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any


def arrival_keys(results: dict[str, Any]) -> set[tuple[float, int]]:
    """(qps, seed) of every run in a bench's results: repeat r replays seed ``options.seed + r``."""
    seed = results["options"]["seed"]
    return {(run["qps"], seed + run.get("repeat", 0)) for run in results["runs"]}


def run_seed(results: dict[str, Any], run: dict[str, Any]) -> int:
    return results["options"]["seed"] + run.get("repeat", 0)


def differences(fit: dict[str, Any], held: dict[str, Any]) -> dict[str, Any]:
    """What the held-out run has that the fit run did not: arrivals (new seeds, new rates), another
    day or hour, another machine, other bench options. Recorded so that an error can be read
    against how far out of sample it is."""
    fit_keys, held_keys = arrival_keys(fit), arrival_keys(held)
    fit_day, held_day = _date(fit), _date(held)
    options = {
        name: [fit["options"].get(name), held["options"].get(name)]
        for name in ("requests", "scale", "layout", "delay_multiplier")
        if fit["options"].get(name) != held["options"].get(name)
    }
    return {
        "new_seeds": sorted({s for _, s in held_keys} - {s for _, s in fit_keys}),
        "new_rates": sorted({q for q, _ in held_keys} - {q for q, _ in fit_keys}),
        "seen_arrivals": sorted(held_keys & fit_keys),
        "dates": [fit.get("date"), held.get("date")],
        "other_day": fit_day is None or held_day is None or fit_day.date() != held_day.date(),
        "hours_apart": round((held_day - fit_day).total_seconds() / 3600, 2)
        if fit_day and held_day
        else None,
        "machines": [fit.get("machine"), held.get("machine")],
        "other_machine": fit.get("machine") != held.get("machine"),
        "traces": [fit.get("trace"), held.get("trace")],
        "other_trace": fit.get("trace") != held.get("trace"),
        "other_options": options,
    }


def describe(diff: dict[str, Any]) -> str:
    """One line for a table: what makes the held-out run out of sample."""
    parts = []
    if diff["new_seeds"]:
        parts.append("seeds " + "/".join(str(s) for s in diff["new_seeds"]))
    if diff["new_rates"]:
        parts.append("rates " + "/".join(f"{q:g}" for q in diff["new_rates"]))
    if diff.get("other_trace"):
        parts.append("trace")
    if diff["other_machine"]:
        parts.append("machine")
    parts.append("day" if diff["other_day"] else f"time ({diff['hours_apart']:+g} h)")
    if diff["other_options"]:
        parts.append("options " + ", ".join(diff["other_options"]))
    return ", ".join(parts)


def check_held_out(fit_dir: Path, held_results: Path, *, speed_window: float | None, lengths: bool) -> None:
    """Refuse what would make a prediction in sample: fitting on the predicted run itself, or
    feeding it the held-out run's measured speed or prompt lengths."""
    if fit_dir.resolve() == held_results.parent.resolve():
        raise ValueError(f"{fit_dir} is the run being predicted: that is in sample")
    if speed_window is not None:
        raise ValueError("--speed-window feeds the held-out run's measured speed: not out of sample")
    if lengths:
        raise ValueError("--measured-lengths feeds the held-out run's measured prompts: not out of sample")


def _date(results: dict[str, Any]) -> datetime | None:
    try:
        return datetime.strptime(results["date"], "%Y-%m-%d %H:%M:%S")
    except (KeyError, TypeError, ValueError):
        return None
