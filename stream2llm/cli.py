"""The ``stream2llm`` command line (typer). Async work runs under ``asyncio.run`` (typer ignores
``async def`` commands)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from stream2llm.serving import models

app = typer.Typer(help="Streaming-aware RAG serving on vLLM.", no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Prepare and list the local models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="tiny, gemma-270m or a local HF directory.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _run(coro):
    """asyncio.run, with SIGTERM turned into KeyboardInterrupt so that ``finally`` blocks shut the
    engine down (otherwise vLLM's engine-core and worker processes outlive a killed command)."""
    import signal

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        return asyncio.run(coro)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


@model_app.command("prepare")
def model_prepare(name: Annotated[str, typer.Argument(help="tiny or gemma-270m")], debug: DebugOpt = False):
    """Build a model once and cache it (gemma-270m: ~90 s, 544 MB)."""
    try:
        with console.status(f"preparing {name} ..."):
            info = models.prepare(name)
    except Exception as exc:
        _fail(exc, debug)
    console.print(f"{name}: [green]ready[/green] at {info.path}")


@model_app.command("list")
def model_list():
    """Known models and whether they are prepared."""
    table = Table("name", "description", "prepared at")
    for name, about, path in models.list_models():
        table.add_row(name, about, str(path) if path else "[dim]not yet[/dim]")
    console.print(table)


@app.command()
def demo(
    model: ModelOpt = models.DEFAULT_MODEL,
    chunks: Annotated[int, typer.Option(help="Pieces the context arrives in.")] = 4,
    gap: Annotated[float, typer.Option(help="Seconds between pieces (retrieval time).")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 48,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Stream retrieved context into the model while it "arrives", then answer; compare TTFT with
    sending the whole prompt after retrieval (non-streaming) on the same engine."""
    from stream2llm.pipelines.demo import run_demo

    try:
        report = _run(run_demo(model, chunks=chunks, gap_s=gap, max_tokens=max_tokens, console=console))
    except Exception as exc:
        _fail(exc, debug)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


@app.command()
def synth(
    workload: Annotated[str, typer.Option(help="crawler or anns")] = "crawler",
    n: Annotated[int, typer.Option(help="Requests to generate.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    scale: Annotated[float, typer.Option(help="Multiply token counts.")] = 1.0,
    out: Annotated[Path, typer.Option(help="Trace file to write (JSON Lines).")] = Path("traces.jsonl"),
    debug: DebugOpt = False,
):
    """Synthetic traces matching the published workload statistics; prints achieved vs target."""
    from stream2llm.workloads import synth as synth_mod
    from stream2llm.workloads.trace import write_trace

    try:
        requests = synth_mod.synthesize(workload, n, seed=seed, scale=scale)
    except ValueError as exc:
        _fail(exc, debug)
    write_trace(out, requests)
    target = synth_mod.published_stats()["workloads"][workload]
    achieved = synth_mod.achieved_stats(requests)
    table = Table("statistic", "target (published)", "achieved", title=f"{n} {workload} requests -> {out}")
    for group, values in achieved.items():
        for key, value in values.items():
            published = target.get(group, {}).get(key)
            shown = "" if published is None else f"{published * (scale if 'tokens' in group else 1):,.1f}"
            table.add_row(f"{group}.{key}", shown, f"{value:,.1f}")
    console.print(table)


@app.command()
def bench(
    traces: Annotated[Path, typer.Argument(help="Trace file (stream2llm.trace/1).")],
    qps: Annotated[str, typer.Option(help="Comma-separated arrival rates.")] = "0.5,1,2,4",
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = "nonstream,vllm,stream2llm",
    delay_multiplier: Annotated[float, typer.Option(help="Stretch the gaps between events.")] = 1.0,
    kv_budget: Annotated[str | None, typer.Option(help="KV cache size, e.g. 512M or 2G.")] = None,
    scale: Annotated[float, typer.Option(help="Multiply synthetic token counts.")] = 1.0,
    repeat: Annotated[int, typer.Option(help="Repeats per (policy, qps).")] = 1,
    limit: Annotated[int | None, typer.Option(help="Replay only the first N requests.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 1,
    max_model_len: Annotated[int, typer.Option(help="Context window (longer requests are capped).")] = 32768,
    max_batched_tokens: Annotated[int, typer.Option(help="Token budget of one engine step.")] = 2048,
    deadline: Annotated[
        float | None,
        typer.Option(help="Abort requests without a first token this long after the last event."),
    ] = None,
    model: ModelOpt = "tiny",
    out: Annotated[Path, typer.Option(help="Directory for results.json and plots.")] = Path("bench-out"),
    debug: DebugOpt = False,
):
    """Replay traces against one engine for every policy and rate; results JSON, table and plots."""
    from stream2llm.workloads.bench import run_bench_command

    try:
        _run(
            run_bench_command(
                traces,
                qps=[float(q) for q in qps.split(",")],
                policies=policies.split(","),
                delay_multiplier=delay_multiplier,
                kv_budget=kv_budget,
                scale=scale,
                repeat=repeat,
                limit=limit,
                max_tokens=max_tokens,
                max_model_len=max_model_len,
                max_batched_tokens=max_batched_tokens,
                deadline=deadline,
                model=model,
                out=out,
                console=console,
            )
        )
    except Exception as exc:
        _fail(exc, debug)


@app.command()
def simulate(
    traces: Annotated[Path | None, typer.Argument(help="Trace file; default: synthetic --workload.")] = None,
    workload: Annotated[str, typer.Option(help="crawler or anns, when no trace file is given.")] = "crawler",
    n: Annotated[int, typer.Option(help="Synthetic requests.")] = 1000,
    profile: Annotated[
        str, typer.Option(help="Cost profile: packaged name or JSON file.")
    ] = "h200-llama3.1-8b",
    qps: Annotated[str, typer.Option(help="Comma-separated arrival rates.")] = "0.5,1,2,4",
    policies: Annotated[
        str, typer.Option(help="Comma-separated policies.")
    ] = "nonstream,vllm,fcfs,lcas,mcps,stream2llm",
    delay_multiplier: Annotated[float, typer.Option(help="Stretch the gaps between events.")] = 1.0,
    scale: Annotated[float, typer.Option(help="Multiply token counts.")] = 1.0,
    block_size: Annotated[int, typer.Option(help="KV block size in tokens.")] = 16,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Discrete-event model of the engine with the same policies, in seconds instead of hours;
    beside the published results where they exist (H200 profile, crawler or anns)."""
    from stream2llm.workloads.simulate import simulate_command

    try:
        report = simulate_command(
            traces,
            workload=workload,
            n=n,
            profile=profile,
            qps=[float(q) for q in qps.split(",")],
            policies=policies.split(","),
            delay_multiplier=delay_multiplier,
            scale=scale,
            block_size=block_size,
            console=console,
        )
    except (ValueError, OSError) as exc:
        _fail(exc, debug)
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))


@app.command()
def calibrate(
    model: ModelOpt = "tiny",
    out: Annotated[Path, typer.Option(help="Profile JSON to write.")] = Path("cost-profile.json"),
    max_model_len: Annotated[int, typer.Option(help="Longest prompt to measure.")] = 32768,
    repeats: Annotated[int, typer.Option(help="Measurements per size (median).")] = 3,
    debug: DebugOpt = False,
):
    """Measure the engine at hand (prefill latency against prompt length) and write a cost profile."""
    from stream2llm.serving.calibrate import calibrate as run_calibrate

    try:
        profile = _run(run_calibrate(model, max_model_len=max_model_len, repeats=repeats, console=console))
    except Exception as exc:
        _fail(exc, debug)
    profile.save(out)
    console.print(
        f"profile written to {out}: prefill(n) = {profile.prefill[0]:.4g} + {profile.prefill[1]:.4g} n"
        f" + {profile.prefill[2]:.4g} n^2 s; offload: {profile.offload_note}"
    )


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="stream2llm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
