"""The bench's tables on the console: percentiles per (qps, policy) and the gains over the one-shot
baselines, for repeat 0 and as means over repeats."""

from __future__ import annotations

from typing import Any

from rich.table import Table

BASELINES = ("nonstream", "nonstream-ranked")  # one-shot prompts: FIFO (vLLM's), then ranked as ours
PERCENTILES = ("p50", "p95", "p99")
RUN_COLUMNS = ("qps", "policy", *PERCENTILES)  # how every per-run table (bench, simulate) begins


def run_cells(qps: float, policy: str, seconds: dict[str, float]) -> list[str]:
    """The cells under ``RUN_COLUMNS``, one format for the bench's and the simulator's tables."""
    return [f"{qps:g}", policy, *(f"{seconds[p]:.3f}" for p in PERCENTILES)]


def _baselines(policies: set[str]) -> list[str]:
    """The one-shot baselines that ran: a gain over ``nonstream-ranked`` is streaming's alone."""
    return [b for b in BASELINES if b in policies]


def _ratio(base: float | None, value: float | None) -> str:
    if not base or not value or base != base or value != value:
        return "-"
    return f"{base / value:.2f}x"


def repeats_table(summary: list[dict[str, Any]], metric: str = "ttft_final_s") -> Table:
    """Mean ± 95% confidence half-width over repeats, per (qps, policy), and the p50's gain over
    each one-shot baseline that ran (means over the repeats)."""
    pcts = ("p50", "p95", "p99", "p999")
    summary = [e for e in summary if metric in e]
    bases = _baselines({e["policy"] for e in summary})
    table = Table(
        "qps",
        "policy",
        "repeats",
        *pcts,
        *(f"p50 vs {b}" for b in bases),
        title=f"{metric}: mean ± 95% CI over repeats (s)",
    )
    by_key = {(e["qps"], e["policy"]): e for e in summary}
    for (qps, policy), entry in sorted(by_key.items()):
        cells = [f"{entry[metric][p]['mean']:.3f} ± {entry[metric][p]['ci95']:.3f}" for p in pcts]
        gains = []
        for b in bases:
            base = by_key.get((qps, b))
            gains.append(_ratio(base and base[metric]["p50"]["mean"], entry[metric]["p50"]["mean"]))
        table.add_row(f"{qps:g}", policy, str(entry["repeats"]), *cells, *gains)
    return table


def ratio_table(result: dict[str, Any], metric: str = "ttft_final_s") -> Table:
    """Repeat 0's percentiles, TTFT from the trace's due time beside them, and the gains over the
    one-shot baselines (``nonstream``: vLLM's FIFO; ``nonstream-ranked``: our ranking) and stock
    vLLM streaming."""
    by_key = {(r["qps"], r["policy"]): r for r in result["runs"] if r["repeat"] == 0}
    bases = _baselines({policy for _, policy in by_key})
    due = all("ttft_due_s" in r for r in by_key.values())
    table = Table(
        *RUN_COLUMNS,
        *(("due p50", "due p99") if due else ()),
        "completion",
        *(f"{pct} vs {b}" for b in bases for pct in ("p50", "p99")),
        "p99 vs vllm",
        "errors",
        title=f"{metric}, repeat 0 (ratios > 1: faster than the baseline; due: TTFT from when the "
        "trace's final event was due)",
    )
    for (qps, policy), run in sorted(by_key.items()):
        gains = []
        for b in (*bases, "vllm"):
            base = by_key.get((qps, b))
            for pct in ("p50", "p99") if b != "vllm" else ("p99",):
                gains.append(_ratio(base and base[metric][pct], run[metric][pct]))
        table.add_row(
            *run_cells(qps, policy, run[metric]),
            *((f"{run['ttft_due_s']['p50']:.3f}", f"{run['ttft_due_s']['p99']:.3f}") if due else ()),
            f"{run['completion_s']:.1f}s",
            *gains,
            str(run["errors"]),
        )
    return table


def decode_table(result: dict[str, Any]) -> Table | None:
    """Repeat 0's TTFT beside second-token latency and time per output token, where the bench
    measured them (over HTTP): a deployment may move a hop from the first token to the second."""
    runs = [r for r in result["runs"] if r["repeat"] == 0 and "tpot_s" in r]
    if not runs:
        return None
    table = Table(
        "qps",
        "policy",
        "TTFT p50",
        "TTFT p99",
        "2nd token p50",
        "2nd token p99",
        "TPOT p50",
        "TPOT p99",
        title="after the first token, repeat 0 (seconds; over HTTP, from the text deltas)",
    )
    for run in sorted(runs, key=lambda r: (r["qps"], r["policy"])):
        cells = [run[m][p] for m in ("ttft_final_s", "second_token_s", "tpot_s") for p in ("p50", "p99")]
        table.add_row(f"{run['qps']:g}", run["policy"], *(f"{c:.4f}" for c in cells))
    return table
