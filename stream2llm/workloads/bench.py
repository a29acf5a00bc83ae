"""``stream2llm bench``: replay traces for every policy and rate on one engine; write results and plots."""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from stream2llm.context.layout import layout_named
from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.workloads import plots
from stream2llm.workloads.bench_policies import check_policies
from stream2llm.workloads.engine_replay import run_bench
from stream2llm.workloads.metrics import summarize_repeats
from stream2llm.workloads.replay import BenchPlan, ReplayOptions
from stream2llm.workloads.trace import TraceRequest, read_trace, with_stable_layout


def parse_bytes(text: str | None, default: int) -> int:
    if not text:
        return default
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise ValueError(f"--kv-budget {text!r}: expected a size like 512M or 2G")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(float(match.group(1)) * unit)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor()
    )
    import os

    return f"{platform.machine()} {cpu}, {os.cpu_count()} cpus"


BASELINES = ("nonstream", "nonstream-ranked")  # one-shot prompts: FIFO (vLLM's), then ranked as ours


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
        "qps",
        "policy",
        "p50",
        "p95",
        "p99",
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
            f"{qps:g}",
            policy,
            *(f"{run[metric][p]:.3f}" for p in ("p50", "p95", "p99")),
            *((f"{run['ttft_due_s']['p50']:.3f}", f"{run['ttft_due_s']['p99']:.3f}") if due else ()),
            f"{run['completion_s']:.1f}s",
            *gains,
            str(run["errors"]),
        )
    return table


async def run_bench_command(
    traces: Path,
    *,
    qps: list[float],
    policies: list[str],
    delay_multiplier: float,
    kv_budget: str | None,
    scale: float,
    repeat: int,
    limit: int | None,
    max_tokens: int,
    max_model_len: int,
    model: str,
    out: Path,
    console: Console,
    max_batched_tokens: int = 2048,
    deadline: float | None = None,
    max_num_seqs: int = 256,
    layout: str = "score",
    step_log: bool = False,
) -> dict[str, Any]:
    """Every (policy, qps, repeat) on one engine: results.json and plots in ``out``, tables on the console."""
    check_policies(policies)
    requests = load_requests(traces, limit, layout)
    if scale != 1.0:
        console.print(
            f"[yellow]token counts scaled by {scale:g} so that this machine's load matches "
            "the published setting[/yellow]"
        )
    out.mkdir(parents=True, exist_ok=True)
    config = EngineConfig(
        step_log=str(out / "steps.jsonl") if step_log else None,
        model=model,
        max_model_len=max_model_len,
        kv_cache_bytes=parse_bytes(kv_budget, 2 << 30),
        max_num_batched_tokens=max_batched_tokens,
        max_num_seqs=max_num_seqs,
    )
    options = ReplayOptions(
        delay_multiplier=delay_multiplier, scale=scale, max_tokens=max_tokens, deadline_s=deadline
    )
    plan = BenchPlan(tuple(policies), tuple(qps), repeat)
    result = await _replay(config, requests, plan, options, console, out)
    result["summary"] = summarize_repeats(result["runs"])
    result["machine"] = machine()
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["trace"] = str(traces)
    result["options"]["layout"] = layout
    write_results(result, out, max(qps))
    console.print(ratio_table(result))
    if repeat > 1:
        console.print(repeats_table(result["summary"]))
        console.print(repeats_table(result["summary"], "ttft_due_s"))
    console.print(f"results: {out / 'results.json'}")
    return result


def load_requests(traces: Path, limit: int | None, layout: str) -> list[TraceRequest]:
    """The trace's first ``limit`` requests, their update documents in the named layout."""
    layout_named(layout)  # validates
    requests = read_trace(traces)[:limit]
    if layout == "stable":  # every policy, nonstream included, gets the same laid-out documents
        requests = with_stable_layout(requests)
    return requests


async def _replay(
    config: EngineConfig,
    requests: list[TraceRequest],
    plan: BenchPlan,
    options: ReplayOptions,
    console: Console,
    out: Path,
) -> dict[str, Any]:
    """Start the engine, run the plan with a progress bar per run (each finished run goes to
    ``out/results.json`` at once, marked incomplete), and shut the engine down."""
    with console.status(f"starting the engine ({config.model}) ..."):
        engine = await StreamingEngine.start(config)
    progress, track = run_progress(console)
    try:
        with progress:
            return await run_bench(engine, requests, plan, options, track, lambda doc: write_json(doc, out))
    finally:
        await engine.shutdown()


def run_progress(console: Console) -> tuple[Progress, Callable[[str, int], Callable[[], None]]]:
    """A progress bar per (policy, qps, repeat) run: the bar and ``track(label, total)``, which adds
    one and returns the callback that advances it by a request."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )

    def track(label: str, total: int) -> Callable[[], None]:
        task = progress.add_task(label, total=total)
        return lambda: progress.advance(task)

    return progress, track


def write_json(result: dict[str, Any], out: Path) -> None:
    """results.json, replaced whole (written beside it, then renamed): never half a file."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.json.part"
    partial.write_text(json.dumps(result, indent=1) + "\n")
    partial.replace(out / "results.json")


def write_results(result: dict[str, Any], out: Path, top_qps: float) -> None:
    """results.json and the plots (the CCDF at the highest rate)."""
    write_json(result, out)
    plots.plot_ttft_vs_qps(result, out / "ttft_final_vs_qps.png")
    plots.plot_ttft_vs_qps(result, out / "ttft_due_vs_qps.png", metric="ttft_due_s")
    plots.plot_ttft_vs_qps(result, out / "ttft_query_vs_qps.png", metric="ttft_query_s")
    plots.plot_completion(result, out / "completion.png")
    samples = {
        r["policy"]: r["samples"]["ttft_final_s"]
        for r in result["runs"]
        if r["qps"] == top_qps and r["repeat"] == 0
    }
    plots.plot_ccdf(
        samples,
        out / f"ttft_final_ccdf_qps{top_qps:g}.png",
        f"TTFT after the final chunk, {top_qps:g} qps",
    )
