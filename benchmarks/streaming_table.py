"""Streaming against not streaming: each ``stream2llm bench`` run dir as one markdown table.

Per policy: ttft_final p50, p95 and p99 as the mean over the repeats (seeds) and pooled over them,
p50 per seed, tokens prefilled (mean), errors; then stream2llm's ratios against nonstream and
nonstream-ranked on the seeds' mean p50 and p95 (above 1: stream2llm is faster; the issue's
"never above by more than 5%" is a ratio of at least 0.95). Run:

    PYTHONPATH=. .venv/bin/python benchmarks/streaming_table.py RESULTS_DIR [RESULTS_DIR ...] [--json OUT]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

PCTS = ("p50", "p95", "p99")
BASELINES = ("nonstream", "nonstream-ranked")


def summarize(results: Path) -> dict:
    """Per policy: mean-of-seeds and pooled percentiles, p50 per seed, tokens, errors."""
    doc = json.loads((results / "results.json").read_text())
    runs: dict[str, list[dict]] = defaultdict(list)
    for run in doc["runs"]:
        runs[run["policy"]].append(run)
    out = {"run": results.name, "options": doc.get("options", {}), "policies": {}}
    for policy, group in runs.items():
        group.sort(key=lambda r: r.get("repeat", 0))
        pooled = [x for r in group for x in r["samples"]["ttft_final_s"]]
        out["policies"][policy] = {
            "mean": {p: statistics.mean(r["ttft_final_s"][p] for r in group) for p in PCTS},
            "pooled": {p: float(np.percentile(pooled, int(p[1:]))) for p in PCTS},
            "p50_per_seed": [r["ttft_final_s"]["p50"] for r in group],
            "prefilled": statistics.mean(r["tokens_prefilled"] for r in group),
            "errors": sum(r["errors"] for r in group),
            "qps": group[0]["qps"],
        }
    ours = out["policies"].get("stream2llm")
    if ours is not None:
        out["ratios"] = {
            base: {p: out["policies"][base]["mean"][p] / ours["mean"][p] for p in ("p50", "p95")}
            for base in BASELINES
            if base in out["policies"]
        }
    return out


def markdown(summary: dict) -> str:
    lines = [
        f"`{summary['run']}` ({summary['options'].get('requests')} requests, "
        f"{next(iter(summary['policies'].values()))['qps']} queries/s)",
        "",
        "| policy | p50 | p95 | p99 | pooled p50 / p95 / p99 | p50 per seed | prefilled | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for policy, row in summary["policies"].items():
        mean, pooled = row["mean"], row["pooled"]
        lines.append(
            f"| {policy} | {mean['p50']:.3f} | {mean['p95']:.3f} | {mean['p99']:.3f} | "
            f"{pooled['p50']:.3f} / {pooled['p95']:.3f} / {pooled['p99']:.3f} | "
            + " / ".join(f"{x:.3f}" for x in row["p50_per_seed"])
            + f" | {row['prefilled']:,.0f} | {row['errors']} |"
        )
    for base, ratio in summary.get("ratios", {}).items():
        lines.append(f"\nstream2llm vs {base}: p50 {ratio['p50']:.2f}x, p95 {ratio['p95']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    out = None
    if "--json" in args:
        i = args.index("--json")
        out, args = Path(args[i + 1]), args[:i] + args[i + 2 :]
    summaries = [summarize(Path(a)) for a in args]
    for s in summaries:
        print(markdown(s) + "\n")
    if out is not None:
        out.write_text(json.dumps(summaries, indent=1) + "\n")


if __name__ == "__main__":
    main()
