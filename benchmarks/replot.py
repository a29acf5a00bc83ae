"""The PNG plots of recorded ``stream2llm bench`` results, drawn again from their results.json.

The plots are not kept in git (benchmarks/README.md, "Results kept in git"): each is a rendering of
its run's results.json, which is, and this redraws them byte for byte. It draws what the bench
draws (TTFT against QPS from the final event, from the due time and from the query, completion
time, the TTFT CCDF at the highest rate) beside each results.json given, by default beside every
results.json under benchmarks/results (the benches', the deployments' per instance; other results
have no plots).

    /work/main/.venv/bin/python benchmarks/replot.py [benchmarks/results/bench-*/results.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stream2llm.workloads import plots

RESULTS = Path(__file__).resolve().parent / "results"


def replot(results: Path) -> list[Path]:
    """The plots of one bench result, beside it; none for a result of another kind."""
    result: dict[str, Any] = json.loads(results.read_text())
    runs = result.get("runs") if isinstance(result, dict) else None
    if not runs or not all(isinstance(r, dict) and "policy" in r and "qps" in r for r in runs):
        return []
    out = results.parent
    written = []
    for metric, name in (("ttft_final_s", "final"), ("ttft_due_s", "due"), ("ttft_query_s", "query")):
        if all(metric in r for r in runs):
            written.append(plots.plot_ttft_vs_qps(result, out / f"ttft_{name}_vs_qps.png", metric=metric))
    if all("completion_s" in r for r in runs):
        written.append(plots.plot_completion(result, out / "completion.png"))
    top = max(r["qps"] for r in runs)
    samples = {
        r["policy"]: r["samples"]["ttft_final_s"]
        for r in runs
        if r["qps"] == top and r.get("repeat", 0) == 0 and "ttft_final_s" in r.get("samples", {})
    }
    if samples:
        title = f"TTFT after the final chunk, {top:g} qps"
        written.append(plots.plot_ccdf(samples, out / f"ttft_final_ccdf_qps{top:g}.png", title))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="results.json files (default: all recorded)")
    args = parser.parse_args()
    for path in args.results or sorted(RESULTS.rglob("results.json")):
        for png in replot(path):
            print(png)


if __name__ == "__main__":
    main()
