"""``stream2llm synth|capture|bench|simulate|calibrate``: make and replay workloads, model them and
fit the model's cost profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from stream2llm.cli.common import (
    AllowPrivateOpt,
    DebugOpt,
    IndexDocsOpt,
    JsonOpt,
    MaxPagesOpt,
    ModelOpt,
    RetrieverOpt,
    SeedOpt,
    console,
    fail,
    run_async,
    source_options,
    write_json,
)


def synth(
    workload: Annotated[str, typer.Option(help="crawler or anns")] = "crawler",
    n: Annotated[int, typer.Option(help="Requests to generate.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    scale: Annotated[float, typer.Option(help="Multiply token counts.")] = 1.0,
    churn: Annotated[
        str,
        typer.Option(
            help="anns: how updates change the top-k: fitted (to real progressive search, most change"
            " nothing) or uniform (1-3 of 10 documents replaced every update, a stress variant)."
        ),
    ] = "fitted",
    out: Annotated[Path, typer.Option(help="Trace file to write (JSON Lines).")] = Path("traces.jsonl"),
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Synthetic traces matching the published workload statistics; prints achieved vs target."""
    from stream2llm.workloads import synth as synth_mod
    from stream2llm.workloads.trace import write_trace

    try:
        requests = synth_mod.synthesize(workload, n, seed=seed, scale=scale, churn=churn)
        write_trace(out, requests)
    except (ValueError, OSError) as exc:
        fail(exc, debug)
    target = synth_mod.published_stats()["workloads"][workload]
    achieved = synth_mod.achieved_stats(requests)
    write_json(
        json_out, {"workload": workload, "n": n, "out": str(out), "target": target, "achieved": achieved}
    )
    table = Table("statistic", "target (published)", "achieved", title=f"{n} {workload} requests -> {out}")
    for group, values in achieved.items():
        for key, value in values.items():
            published = target.get(group, {}).get(key)
            shown = "" if published is None else f"{published * (scale if 'tokens' in group else 1):,.1f}"
            table.add_row(f"{group}.{key}", shown, f"{value:,.1f}")
    console.print(table)


PreemptionOpt = Annotated[
    str,
    typer.Option(
        help="How evicted sessions give KV back, comma-separated to run each policy under each:"
        " recompute, offload (to the host KV tier) or cost (per victim, by the cost profile)."
    ),
]
DeadlineOpt = Annotated[
    float | None, typer.Option(help="Abort requests without a first token this long after the last event.")
]
LayoutOpt = Annotated[
    str, typer.Option(help="Update documents: the trace's score order, or the assembler's stable layout.")
]
CostProfileOpt = Annotated[
    str | None, typer.Option(help="Cost profile the engine decides by (packaged name or JSON file).")
]


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
    max_num_seqs: Annotated[
        int, typer.Option(help="vLLM request slots; every open stream holds one, parked or not.")
    ] = 256,
    deadline: DeadlineOpt = None,
    layout: LayoutOpt = "score",
    step_log: Annotated[bool, typer.Option(help="Log each engine step to OUT/steps.jsonl.")] = False,
    preemption: PreemptionOpt = "cost",
    cost_profile: CostProfileOpt = None,
    model: ModelOpt = "tiny",
    out: Annotated[Path, typer.Option(help="Directory for results.json and plots.")] = Path("bench-out"),
    endpoint: Annotated[str | None, typer.Option(help="Replay over HTTP against this deployment.")] = None,
    debug: DebugOpt = False,
):
    """Replay traces against one engine for every policy and rate; results JSON, table and plots.

    With ``--endpoint``: the same replay over HTTP, the engine options being the deployment's."""
    from stream2llm.cli.bench_runner import BenchArgs, EngineArgs, run_bench_command, run_http_bench_command
    from stream2llm.workloads.bench_policies import with_preemptions
    from stream2llm.workloads.replay import ReplayOptions

    try:
        preemptions = preemption.split(",")
        args = BenchArgs(
            traces,
            qps=[float(q) for q in qps.split(",")],
            policies=with_preemptions(policies.split(","), preemptions),
            options=ReplayOptions(delay_multiplier, scale, max_tokens, deadline_s=deadline),
            repeat=repeat,
            limit=limit,
            layout=layout,
            model=model,
            max_model_len=max_model_len,
            out=out,
        )
        if endpoint:
            run_async(run_http_bench_command(endpoint, args, console))
        else:
            engine = EngineArgs(
                kv_budget, max_batched_tokens, max_num_seqs, step_log, tuple(preemptions), cost_profile
            )
            run_async(run_bench_command(args, engine, console))
    except Exception as exc:
        fail(exc, debug)


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
    preemption: Annotated[
        str, typer.Option(help="How victims give KV back: recompute, offload or cost (by the profile).")
    ] = "cost",
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Discrete-event model of the engine with the same policies, in seconds instead of hours.

    Shows its results beside the published ones where they exist (H200 profile, crawler or anns)."""
    from stream2llm.cli.simulate_runner import print_report
    from stream2llm.workloads.simulate.runs import simulate_runs

    try:
        report = simulate_runs(
            traces,
            workload=workload,
            n=n,
            profile=profile,
            qps=[float(q) for q in qps.split(",")],
            policies=policies.split(","),
            delay_multiplier=delay_multiplier,
            scale=scale,
            block_size=block_size,
            preemption=preemption,
        )
    except (ValueError, OSError) as exc:
        fail(exc, debug)
    print_report(report, console)
    write_json(json_out, report)


def calibrate(
    model: ModelOpt = "tiny",
    out: Annotated[Path, typer.Option(help="Profile JSON to write.")] = Path("cost-profile.json"),
    max_model_len: Annotated[int, typer.Option(help="Longest prompt to measure.")] = 32768,
    repeats: Annotated[int, typer.Option(help="Measurements per size (median).")] = 3,
    max_batched_tokens: Annotated[
        int, typer.Option(help="Token budget of one engine step (use the one the bench will use).")
    ] = 2048,
    from_steps: Annotated[
        Path | None,
        typer.Option(help="Fit to a bench's logged steps (bench --step-log) instead of measuring idle."),
    ] = None,
    base_profile: Annotated[
        str, typer.Option(help="With --from-steps: the profile whose KV geometry is kept.")
    ] = "cpu-tiny",
    bench: Annotated[
        Path | None,
        typer.Option(help="With --from-steps: that bench's results.json, to fit the front end's costs too."),
    ] = None,
    debug: DebugOpt = False,
):
    """Measure the engine at hand (prefill latency against prompt length) and write a cost profile."""
    from stream2llm.workloads.simulate.calibrate import calibrate as run_calibrate
    from stream2llm.workloads.simulate.calibrate import profile_from_steps
    from stream2llm.workloads.simulate.cost_model import CostProfile

    try:
        if from_steps is not None:
            base = CostProfile.load(base_profile)
            profile = profile_from_steps(from_steps, base, max_batched_tokens, bench=bench)
        else:
            profile = run_async(
                run_calibrate(
                    model,
                    max_model_len=max_model_len,
                    repeats=repeats,
                    status=console.status,
                    max_batched_tokens=max_batched_tokens,
                )
            )
    except Exception as exc:
        fail(exc, debug)
    profile.save(out)
    console.print(
        f"profile written to {out}: prefill(n) = {profile.prefill[0]:.4g} per step of"
        f" {profile.max_num_batched_tokens} tokens + {profile.prefill[1]:.4g} n"
        f" + {profile.prefill[2]:.4g} n^2 s; per step {profile.chunk_request_s * 1e6:.0f} us a chunk,"
        f" {profile.held_request_s * 1e6:.1f} us a request held;"
        f" front end: {profile.frontend_in_s * 1000:.2f} ms in,"
        f" {profile.tokenize_token_s * 1e6:.2f} us/token tokenized,"
        f" {profile.frontend_out_s * 1000:.2f} ms out;"
        f" offload: {profile.offload_note}"
    )


def capture(
    queries: Annotated[Path, typer.Option(help="Queries: one a line, or JSON Lines with 'query'.")],
    retriever: RetrieverOpt = "crawl",
    out: Annotated[Path, typer.Option(help="Trace file to write (JSON Lines).")] = Path("traces.jsonl"),
    seed_url: SeedOpt = None,
    allow_private: AllowPrivateOpt = False,
    max_pages: MaxPagesOpt = 12,
    index_docs: IndexDocsOpt = None,
    k: Annotated[int, typer.Option(help="ANN: documents in each top-k.")] = 6,
    concurrency: Annotated[int, typer.Option(help="Queries retrieved at once.")] = 1,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Run the real retrievers over queries and record every event's time and payload as a trace."""
    from stream2llm.pipelines.sources import open_retrievers, parse_retrievers
    from stream2llm.workloads.capture import capture as run_capture
    from stream2llm.workloads.capture import read_queries

    async def go() -> list:
        names = parse_retrievers(retriever)
        if len(names) != 1:
            raise ValueError("capture records one retriever at a time (a trace has one workload)")
        questions = read_queries(queries)
        options = source_options(seed_url, allow_private, max_pages, index_docs, k=k)
        async with open_retrievers(names, options) as (source,):
            with Progress(console=console) as progress:
                task = progress.add_task(f"capturing ({source.name})", total=len(questions))
                return await run_capture(
                    source,
                    questions,
                    out,
                    workload=names[0],
                    concurrency=concurrency,
                    on_done=lambda _: progress.advance(task),
                )

    try:
        requests = run_async(go())
    except Exception as exc:
        fail(exc, debug)
    events = sum(len(r.events) for r in requests)
    console.print(f"{len(requests)} requests, {events} events written to {out}")
    write_json(json_out, {"out": str(out), "requests": len(requests), "events": events})
