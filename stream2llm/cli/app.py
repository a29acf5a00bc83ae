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
from rich.progress import Progress
from rich.table import Table

from stream2llm.engine import models

app = typer.Typer(help="Streaming-aware RAG serving on vLLM.", no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Prepare and list the local models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()
errors = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="tiny, gemma-270m or a local HF directory.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
RetrieverOpt = Annotated[
    str, typer.Option("--retriever", "-r", help="ann, crawl, or both comma-separated (ann,crawl).")
]
SeedOpt = Annotated[
    list[str] | None,
    typer.Option("--seed-url", help="Crawl from this URL (repeatable); default: the local site."),
]
AllowPrivateOpt = Annotated[
    bool, typer.Option("--allow-private", help="Let the crawler reach private/loopback addresses.")
]
MaxPagesOpt = Annotated[int, typer.Option(help="Pages a crawl emits at most.")]
IndexDocsOpt = Annotated[
    int | None, typer.Option(help="Build/use a small ANN index of N articles (default: all 10,033).")
]


def _source_options(seed_url, allow_private, max_pages, index_docs, **extra):
    from stream2llm.pipelines.sources import SourceOptions

    return SourceOptions(
        seed_urls=tuple(seed_url or ()),
        allow_private=allow_private,
        max_pages=max_pages,
        index_docs=index_docs,
        **extra,
    )


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


def _quiet_engine_logs() -> None:
    """Interactive commands show their own progress; vLLM's warnings and load bars would bury it
    (set VLLM_LOGGING_LEVEL to see them)."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TQDM_DISABLE", "1")


def _fail(exc: BaseException, debug: bool) -> None:
    """One clear line on stderr and exit status 1 (130 when interrupted); --debug re-raises."""
    if debug:
        raise exc
    if isinstance(exc, KeyboardInterrupt):
        errors.print("interrupted")
        raise typer.Exit(130)
    message = " ".join(str(exc).split()) or type(exc).__name__
    errors.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _write_json(path: Path | None, report: object) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")


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
def model_list(json_out: JsonOpt = None):
    """Known models and whether they are prepared."""
    table = Table("name", "description", "prepared at")
    listed = models.list_models()
    for name, about, path in listed:
        table.add_row(name, about, str(path) if path else "[dim]not yet[/dim]")
    console.print(table)
    _write_json(json_out, [{"name": n, "description": a, "path": p} for n, a, p in listed])


@app.command()
def demo(
    model: ModelOpt = models.DEFAULT_MODEL,
    questions: Annotated[int, typer.Option(help="Demo questions to answer (crawl and ANN alternate).")] = 4,
    max_pages: MaxPagesOpt = 6,
    index_docs: Annotated[
        int | None, typer.Option(help="Articles in the demo's ANN index (built once, ~1 min; all: 10,033).")
    ] = 2500,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate per answer.")] = 48,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Answer real questions with streamed retrieval (a crawl of the local pygame docs, progressive
    ANN search over Wikipedia), showing context arriving and tokens streaming, and compare TTFT with
    sending the same context after retrieval (non-streaming) on the same engine."""
    from stream2llm.cli.demo import run_demo

    _quiet_engine_logs()

    # paced like real retrieval: a polite crawler (one page a second from one site), an ANN
    # pipeline that refines its answer over ~4 s (the published workloads' time scales)
    options = _source_options(None, False, max_pages, index_docs, min_stage_s=1.0, crawl_delay_s=1.0)
    try:
        report = _run(
            run_demo(model, questions=questions, options=options, max_tokens=max_tokens, console=console)
        )
    except Exception as exc:
        _fail(exc, debug)
    _write_json(json_out, report)


@app.command()
def synth(
    workload: Annotated[str, typer.Option(help="crawler or anns")] = "crawler",
    n: Annotated[int, typer.Option(help="Requests to generate.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    scale: Annotated[float, typer.Option(help="Multiply token counts.")] = 1.0,
    out: Annotated[Path, typer.Option(help="Trace file to write (JSON Lines).")] = Path("traces.jsonl"),
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Synthetic traces matching the published workload statistics; prints achieved vs target."""
    from stream2llm.workloads import synth as synth_mod
    from stream2llm.workloads.trace import write_trace

    try:
        requests = synth_mod.synthesize(workload, n, seed=seed, scale=scale)
        write_trace(out, requests)
    except (ValueError, OSError) as exc:
        _fail(exc, debug)
    target = synth_mod.published_stats()["workloads"][workload]
    achieved = synth_mod.achieved_stats(requests)
    _write_json(
        json_out, {"workload": workload, "n": n, "out": str(out), "target": target, "achieved": achieved}
    )
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
    max_num_seqs: Annotated[
        int, typer.Option(help="vLLM request slots; every open stream holds one, parked or not.")
    ] = 256,
    deadline: Annotated[
        float | None,
        typer.Option(help="Abort requests without a first token this long after the last event."),
    ] = None,
    layout: Annotated[
        str,
        typer.Option(help="Update documents: the trace's score order, or the connector's layout (stable)."),
    ] = "score",
    step_log: Annotated[
        bool, typer.Option(help="Log every engine step (tokens, context, times) to OUT/steps.jsonl.")
    ] = False,
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
                max_num_seqs=max_num_seqs,
                deadline=deadline,
                layout=layout,
                model=model,
                out=out,
                console=console,
                step_log=step_log,
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
    from stream2llm.workloads.simulate.simulator import simulate_command

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
    _write_json(json_out, report)


@app.command()
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
            profile = _run(
                run_calibrate(
                    model,
                    max_model_len=max_model_len,
                    repeats=repeats,
                    console=console,
                    max_batched_tokens=max_batched_tokens,
                )
            )
    except Exception as exc:
        _fail(exc, debug)
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


@app.command()
def serve(
    model: ModelOpt = models.DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(envvar="STREAM2LLM_TOKEN", help="Require this bearer token (not on /health)."),
    ] = None,
    max_sessions: Annotated[int, typer.Option(help="Running sessions admitted at once (more: 429).")] = 256,
    kv_cache_gb: Annotated[float, typer.Option(help="KV cache size in GiB.")] = 1.0,
    max_model_len: Annotated[int, typer.Option(help="Context window in tokens.")] = 4096,
    policy: Annotated[str, typer.Option(help="Scheduling policy.")] = "stream2llm",
    debug: DebugOpt = False,
):
    """Serve the HTTP API (streaming sessions, OpenAI-compatible completions and chat) until Ctrl-C."""
    from stream2llm.engine.engine import EngineConfig
    from stream2llm.server.app import ServerSettings
    from stream2llm.server.app import serve as run_server

    config = EngineConfig(
        model=model,
        policy=policy,
        kv_cache_bytes=int(kv_cache_gb * (1 << 30)),
        max_model_len=max_model_len,
        max_sessions=max(max_sessions, 1),
    )
    settings = ServerSettings(host=host, port=port, token=token, max_sessions=max_sessions)

    def ready(url: str) -> None:
        console.print(f"serving [bold]{model}[/bold] at [green]{url}[/green] (OpenAI base URL: {url}/v1)")

    try:
        console.print(f"starting the engine ({model}) ...")
        _run(run_server(config, settings, on_ready=ready))
    except KeyboardInterrupt:
        console.print("stopped")
    except Exception as exc:
        _fail(exc, debug)


@app.command()
def run(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    retriever: RetrieverOpt = "ann",
    seed_url: SeedOpt = None,
    allow_private: AllowPrivateOpt = False,
    max_pages: MaxPagesOpt = 8,
    index_docs: IndexDocsOpt = None,
    mode: Annotated[str, typer.Option(help="stream, nonstream or vllm.")] = "stream",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    max_model_len: Annotated[int, typer.Option(help="Context window (older context is dropped).")] = 8192,
    model: ModelOpt = models.DEFAULT_MODEL,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Answer one question: print context events as the retrievers find them, then the answer."""
    from stream2llm.cli.show import run_question

    _quiet_engine_logs()

    try:
        report = _run(
            run_question(
                question,
                retriever.split(","),
                _source_options(seed_url, allow_private, max_pages, index_docs),
                model=model,
                mode=mode,
                max_tokens=max_tokens,
                max_model_len=max_model_len,
                console=console,
            )
        )
    except Exception as exc:
        _fail(exc, debug)
    _write_json(json_out, report)


@app.command()
def capture(
    queries: Annotated[Path, typer.Option(help="Queries: one a line, or JSON Lines with 'query'.")],
    retriever: RetrieverOpt = "crawl",
    out: Annotated[Path, typer.Option(help="Trace file to write (JSON Lines).")] = Path("traces.jsonl"),
    seed_url: SeedOpt = None,
    allow_private: AllowPrivateOpt = False,
    max_pages: MaxPagesOpt = 12,
    index_docs: IndexDocsOpt = None,
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
        options = _source_options(seed_url, allow_private, max_pages, index_docs)
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
        requests = _run(go())
    except Exception as exc:
        _fail(exc, debug)
    events = sum(len(r.events) for r in requests)
    console.print(f"{len(requests)} requests, {events} events written to {out}")
    _write_json(json_out, {"out": str(out), "requests": len(requests), "events": events})


index_app = typer.Typer(
    help="Build and inspect the ANN index (packaged Wikipedia corpus).", no_args_is_help=True
)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    docs: Annotated[int | None, typer.Option("--docs", help="Index only N articles (spread evenly).")] = None,
    kind: Annotated[str, typer.Option(help="auto (IVF above 5,000 vectors), flat or ivf.")] = "auto",
    nlist: Annotated[int | None, typer.Option(help="IVF lists (default ~4 sqrt(n)).")] = None,
    out: Annotated[Path | None, typer.Option(help="Index directory (default: the user cache).")] = None,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Embed the Wikipedia lead extracts (all-MiniLM-L6-v2, CPU) and save a FAISS index (where
    `run`, `capture` and `demo` look for it: `--index-docs N` uses the N-article one)."""
    from stream2llm.pipelines.sources import SourceOptions, index_name
    from stream2llm.retrievers import faiss_ann

    try:
        index = faiss_ann.build_wiki_index(docs, kind=kind, nlist=nlist, progress=True, console=console)
        path = index.save(out or faiss_ann.default_index_dir(index_name(SourceOptions(index_docs=docs))))
    except Exception as exc:
        _fail(exc, debug)
    _print_index_meta(index.meta, path)
    _write_json(json_out, {"path": str(path), **vars(index.meta)})


@index_app.command("info")
def index_info(
    path: Annotated[Path | None, typer.Argument(help="Index directory (default: the user cache).")] = None,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """What an index holds and how it was built."""
    from stream2llm.retrievers import faiss_ann

    path = path or faiss_ann.default_index_dir()
    try:
        meta = faiss_ann.read_meta(path)
    except Exception as exc:
        _fail(exc, debug)
    _print_index_meta(meta, path)
    _write_json(json_out, {"path": str(path), **vars(meta)})


def _print_index_meta(meta, path: Path) -> None:
    table = Table("field", "value", title=f"index at {path}")
    for key, value in vars(meta).items():
        table.add_row(key, str(value))
    console.print(table)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="stream2llm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
