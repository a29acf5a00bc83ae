"""``stream2llm bench --endpoint URL``: replay traces over HTTP against a running deployment; the
same results.json, tables and plots as the in-process bench."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from stream2llm.workloads.bench import (
    load_requests,
    machine,
    ratio_table,
    run_progress,
    write_json,
    write_results,
)
from stream2llm.workloads.bench_policies import check_policies
from stream2llm.workloads.http_replay import run_http_bench
from stream2llm.workloads.metrics import summarize_repeats
from stream2llm.workloads.replay import BenchPlan, EventText, ReplayOptions


async def run_http_bench_command(
    endpoint: str,
    traces: Path,
    *,
    qps: list[float],
    policies: list[str],
    options: ReplayOptions,
    repeat: int,
    limit: int | None,
    layout: str,
    model: str,
    max_model_len: int,
    out: Path,
    console: Console,
) -> dict[str, Any]:
    """Every (policy, qps, repeat) against ``endpoint``: results.json and plots in ``out``.
    ``model`` and ``max_model_len`` size the payloads as the deployment's model counts tokens."""
    check_policies(policies)
    requests = load_requests(traces, limit, layout)
    texts = EventText.for_model(model, max_model_len, options)
    progress, track = run_progress(console)
    plan = BenchPlan(tuple(policies), tuple(qps), repeat)
    with progress:
        result = await run_http_bench(
            endpoint, requests, plan, options, texts, track, lambda doc: write_json(doc, out)
        )
    result["summary"] = summarize_repeats(result["runs"])
    result["machine"] = machine() + " (the client's)"
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["trace"] = str(traces)
    result["options"]["layout"] = layout
    write_results(result, out, max(qps))
    console.print(ratio_table(result))
    console.print(f"results: {out / 'results.json'}")
    return result
