"""Out-of-sample validation must say how far out of sample a held-out run is, and refuse inputs
measured in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream2llm.workloads.simulate import holdout


def _results(date: str, machine: str, qps: list[float], repeats: int, **options) -> dict:
    runs = [{"policy": "fcfs", "qps": q, "repeat": r} for q in qps for r in range(repeats)]
    opts = {"seed": 42, "requests": 120, "scale": 0.7, "layout": "score", "delay_multiplier": 1.0, **options}
    return {"date": date, "machine": machine, "options": opts, "runs": runs}


def test_differences_name_new_seeds_rates_day_and_machine():
    fit = _results("2026-12-02 14:21:54", "xeon", [4.0], 3)
    later = _results("2026-12-02 16:05:07", "xeon", [4.0], 5)
    diff = holdout.differences(fit, later)
    assert diff["new_seeds"] == [45, 46] and diff["new_rates"] == []
    assert not diff["other_day"] and diff["hours_apart"] == 1.72 and not diff["other_machine"]
    assert holdout.describe(diff) == "seeds 45/46, time (+1.72 h)"
    assert holdout.describe(holdout.differences(later, fit)) == "time (-1.72 h)"
    rates = _results("2026-12-04 16:54:56", "amd", [0.5, 4.0], 1, requests=60)
    rates["trace"] = "/tmp/anns.jsonl"
    diff = holdout.differences(fit, rates)
    assert diff["new_seeds"] == [] and diff["new_rates"] == [0.5] and diff["seen_arrivals"] == [(4.0, 42)]
    assert diff["other_day"] and diff["other_machine"] and diff["other_options"] == {"requests": [120, 60]}
    assert holdout.describe(diff) == "rates 0.5, trace, machine, day, options requests"


def test_held_out_refuses_its_own_run_speed_and_lengths(tmp_path: Path):
    fit, held = tmp_path / "fit", tmp_path / "held"
    holdout.check_held_out(fit, held / "results.json", speed_window=None, lengths=False)
    with pytest.raises(ValueError, match="in sample"):
        holdout.check_held_out(held, held / "results.json", speed_window=None, lengths=False)
    with pytest.raises(ValueError, match="measured speed"):
        holdout.check_held_out(fit, held / "results.json", speed_window=15.0, lengths=False)
    with pytest.raises(ValueError, match="measured prompts"):
        holdout.check_held_out(fit, held / "results.json", speed_window=None, lengths=True)
