"""``stream2llm simulate``'s runner: the simulated sweep as a table beside the published results."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from stream2llm.cli.bench_tables import PERCENTILES, RUN_COLUMNS, run_cells


def print_report(report: dict[str, Any], console: Console) -> None:
    """The sweep ``simulate_runs`` returned, as one table beside the published results."""
    title = f"simulated ttft_final (s): {report['workload']}, profile {report['profile']}"
    console.print(results_table(report["runs"], report["published"], title))


def results_table(runs: list[dict[str, Any]], published: dict[str, Any], title: str) -> Table:
    """Percentiles per (qps, policy), the published ones and the speedups over nonstream (vLLM's
    FIFO) and, when simulated, over nonstream-ranked (our ranking: the gain of streaming alone)."""
    by_key = {(r["qps"], r["policy"]): r for r in runs}
    ranked = any(p == "nonstream-ranked" for _, p in by_key)
    table = Table(
        *RUN_COLUMNS,
        "published p50/p95/p99",
        "speedup p50/p95/p99 vs nonstream",
        *(("speedup vs nonstream-ranked",) if ranked else ()),
        "published fcfs speedup",
        title=title,
    )
    for (q, p), run in by_key.items():
        row = _row(q, p, run, by_key.get((q, "nonstream")), published)
        if ranked:
            row.insert(-1, _speedup(by_key.get((q, "nonstream-ranked")), run))
        table.add_row(*row)
    return table


def _speedup(base: dict[str, Any] | None, run: dict[str, Any]) -> str:
    s = run["ttft_final_s"]
    return "/".join(f"{base['ttft_final_s'][k] / s[k]:.2f}" for k in PERCENTILES) if base else "-"


def _row(
    q: float, p: str, run: dict[str, Any], base: dict[str, Any] | None, published: dict[str, Any]
) -> list[str]:
    s = run["ttft_final_s"]
    key = f"{q:g}"
    pub = {"nonstream": published.get("nonstream", {}), "vllm": published.get("vllm_stream", {})}.get(p, {})
    pub_speed = published.get("fcfs_speedup_vs_nonstream", {}).get(key) if p == "fcfs" else None
    return [
        *run_cells(q, p, s),
        "/".join(f"{v:.3f}" for v in pub[key]) if key in pub else "",
        _speedup(base, run),
        "/".join(f"{v:.2f}" for v in pub_speed) if pub_speed else "",
    ]
