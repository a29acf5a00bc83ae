"""PNG plots of a bench result: TTFT CCDF per policy, TTFT against QPS, completion time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _by_policy(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run["policy"], []).append(run)
    return out


def _save(fig: Any, ax: Any, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_vs_qps(result: dict[str, Any], path: Path, metric: str = "ttft_final_s") -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy, runs in _by_policy(result["runs"]).items():
        runs = sorted(runs, key=lambda r: r["qps"])
        for ax, pct in zip(axes, ("p50", "p99")):
            ax.plot([r["qps"] for r in runs], [r[metric][pct] for r in runs], marker="o", label=policy)
    for ax, pct in zip(axes, ("p50", "p99")):
        ax.set(xlabel="queries per second", ylabel=f"{metric} {pct} (s)", yscale="log", title=pct)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_completion(result: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, runs in _by_policy(result["runs"]).items():
        runs = sorted(runs, key=lambda r: r["qps"])
        ax.plot([r["qps"] for r in runs], [r["completion_s"] for r in runs], marker="o", label=policy)
    ax.set(xlabel="queries per second", ylabel="trace completion (s)", title="Trace completion time")
    return _save(fig, ax, path)


def plot_ccdf(samples: dict[str, list[float]], path: Path, title: str) -> Path:
    """CCDF of per-request TTFTs, one line per policy (log scale, so tails show)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, values in samples.items():
        values = sorted(values)
        n = len(values)
        if n:
            ax.step(values, [1 - i / n for i in range(n)], where="post", label=policy)
    ax.set(xscale="log", yscale="log", xlabel="TTFT (s)", ylabel="P(TTFT > x)", title=title)
    return _save(fig, ax, path)
