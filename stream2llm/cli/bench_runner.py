"""``stream2llm bench``'s runners: the in-process engine or a deployment over HTTP
(``--endpoint``), each with a progress bar per run, results.json written after every run, the
plots and the tables at the end. The replay itself is ``stream2llm.workloads``'."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stream2llm.cli.bench_tables import decode_table, ratio_table, repeats_table
from stream2llm.workloads import plots
from stream2llm.workloads.bench import load_requests, machine
from stream2llm.workloads.bench_policies import check_policies
from stream2llm.workloads.metrics import summarize_repeats
from stream2llm.workloads.replay import BenchPlan, ReplayOptions

if TYPE_CHECKING:
    from stream2llm.engine.engine import EngineConfig
    from stream2llm.workloads.trace import TraceRequest


@dataclass(frozen=True)
class BenchArgs:
    """What ``bench`` replays and where it writes, whichever way the requests reach the engine.
    ``model`` and ``max_model_len`` size the payloads (over HTTP: they must be the deployment's)."""

    traces: Path
    qps: list[float]
    policies: list[str]
    options: ReplayOptions
    repeat: int
    limit: int | None
    layout: str
    model: str
    max_model_len: int
    out: Path

    @property
    def plan(self) -> BenchPlan:
        return BenchPlan(tuple(self.policies), tuple(self.qps), self.repeat)


@dataclass(frozen=True)
class EngineArgs:
    """The in-process engine's own settings (over HTTP they are the deployment's)."""

    kv_budget: str | None = None
    max_batched_tokens: int = 2048
    max_num_seqs: int = 256
    step_log: bool = False
    preemptions: tuple[str, ...] = ("cost",)  # the engine has a KV tier unless only "recompute"
    cost_profile: str | None = None

    def config(self, args: BenchArgs) -> EngineConfig:
        from stream2llm.engine.engine import EngineConfig

        return EngineConfig(
            step_log=str(args.out / "steps.jsonl") if self.step_log else None,
            model=args.model,
            max_model_len=args.max_model_len,
            kv_cache_bytes=parse_bytes(self.kv_budget, 2 << 30),
            max_num_batched_tokens=self.max_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            preemption=self.preemptions[0] if len(self.preemptions) == 1 else "cost",
            **({"cost_profile": self.cost_profile} if self.cost_profile else {}),
        )


def parse_bytes(text: str | None, default: int) -> int:
    if not text:
        return default
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise ValueError(f"--kv-budget {text!r}: expected a size like 512M or 2G")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(float(match.group(1)) * unit)


async def run_bench_command(args: BenchArgs, engine: EngineArgs, console: Console) -> dict[str, Any]:
    """Every (policy, qps, repeat) on one engine: results.json and plots in ``out``, tables on the console."""
    check_policies(args.policies)
    requests = load_requests(args.traces, args.limit, args.layout)
    if args.options.scale != 1.0:
        console.print(
            f"[yellow]token counts scaled by {args.options.scale:g} so that this machine's load matches "
            "the published setting[/yellow]"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    config = engine.config(args)
    result = await _replay(config, requests, args, console)
    _finish(result, args, machine())
    console.print(ratio_table(result))
    if args.repeat > 1:
        console.print(repeats_table(result["summary"]))
        console.print(repeats_table(result["summary"], "ttft_due_s"))
    console.print(f"results: {args.out / 'results.json'}")
    return result


async def _replay(
    config: EngineConfig, requests: list[TraceRequest], args: BenchArgs, console: Console
) -> dict[str, Any]:
    """Start the engine, run the plan with a progress bar per run (each finished run goes to
    ``out/results.json`` at once, marked incomplete), and shut the engine down."""
    from stream2llm.engine.engine import StreamingEngine
    from stream2llm.workloads.engine_replay import run_bench

    with console.status(f"starting the engine ({config.model}) ..."):
        engine = await StreamingEngine.start(config)
    progress, track = run_progress(console)
    try:
        with progress:
            return await run_bench(
                engine, requests, args.plan, args.options, track, lambda doc: write_json(doc, args.out)
            )
    finally:
        await engine.shutdown()


async def run_http_bench_command(endpoint: str, args: BenchArgs, console: Console) -> dict[str, Any]:
    """Every (policy, qps, repeat) against ``endpoint``: results.json and plots in ``out``."""
    from stream2llm.workloads.http_replay import run_http_bench
    from stream2llm.workloads.replay import EventText

    check_policies(args.policies)
    requests = load_requests(args.traces, args.limit, args.layout)
    texts = EventText.for_model(args.model, args.max_model_len, args.options)
    progress, track = run_progress(console)
    with progress:
        result = await run_http_bench(
            endpoint, requests, args.plan, args.options, texts, track, lambda doc: write_json(doc, args.out)
        )
    _finish(result, args, machine() + " (the client's)")
    console.print(ratio_table(result))
    if (decode := decode_table(result)) is not None:
        console.print(decode)
    console.print(f"results: {args.out / 'results.json'}")
    return result


def _finish(result: dict[str, Any], args: BenchArgs, host: str) -> None:
    """The bench document's summary over repeats and where it ran; written with its plots."""
    result["summary"] = summarize_repeats(result["runs"])
    result["machine"] = host
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["trace"] = str(args.traces)
    result["options"]["layout"] = args.layout
    write_results(result, args.out, max(args.qps))


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
