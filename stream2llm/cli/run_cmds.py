"""``stream2llm demo|run|serve``: answer questions on a live engine, or serve the HTTP API."""

from __future__ import annotations

import json
import signal
from typing import Annotated, Any

import typer

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
    errors,
    fail,
    quiet_engine_logs,
    run_async,
    source_options,
    write_json,
)
from stream2llm.cli.lifecycle import Stopped
from stream2llm.engine import models


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
    """Answer real questions with streamed retrieval, showing context arriving and tokens streaming.

    A crawl of the local pygame docs and a progressive ANN search over Wikipedia find the context.

    TTFT is compared with sending the same context after retrieval (non-streaming) on the same engine."""
    from stream2llm.cli.demo import run_demo

    quiet_engine_logs()

    # paced like real retrieval: a polite crawler (one page a second from one site), an ANN
    # pipeline that refines its answer over ~4 s (the published workloads' time scales)
    options = source_options(None, False, max_pages, index_docs, min_stage_s=1.0, crawl_delay_s=1.0)
    try:
        report = run_async(
            run_demo(model, questions=questions, options=options, max_tokens=max_tokens, console=console)
        )
    except Exception as exc:
        fail(exc, debug)
    write_json(json_out, report)


ReplicasOpt = Annotated[
    int, typer.Option(help="Engine instances (processes) behind vllm-router; 1: this process serves.")
]
RoutingOpt = Annotated[
    str, typer.Option(help="With --replicas: consistent_hash or sticky_least_loaded (by X-Session-ID).")
]
DisaggregateOpt = Annotated[
    bool, typer.Option(help="Prefill here, decode on a vLLM instance; KV moves block by block as computed.")
]
KvConnectorOpt = Annotated[
    str,
    typer.Option(help="With --disaggregate: stream2llm (a host store, KV moved as computed) or nixl (GPUs)."),
]
KvEventsOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-events-config",
        help='vLLM\'s KV cache events on ZMQ, as vllm serve takes them (JSON), e.g. \'{"endpoint": "tcp://*:5557"}\'.',
    ),
]
OtlpOpt = Annotated[
    str | None,
    typer.Option(help="OpenTelemetry traces of sessions to this OTLP collector (OTEL_* variables apply)."),
]


def serve(
    model: ModelOpt = models.DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(envvar="STREAM2LLM_TOKEN", help="Require this bearer token (not on /health)."),
    ] = None,
    max_sessions: Annotated[int, typer.Option(help="Running sessions admitted at once (more: 429).")] = 256,
    allow_insecure_bind: Annotated[
        bool,
        typer.Option(help="Serve a non-loopback --host without a token (refused otherwise; warned)."),
    ] = False,
    allowed_origin: Annotated[
        list[str] | None,
        typer.Option(help="Browser Origin let in (repeatable; '*': any). Others get 403."),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Host header accepted besides localhost and the bind address (repeatable)."),
    ] = None,
    kv_cache_gb: Annotated[float, typer.Option(help="KV cache size in GiB.")] = 1.0,
    max_model_len: Annotated[int, typer.Option(help="Context window in tokens.")] = 4096,
    max_batched_tokens: Annotated[int, typer.Option(help="Token budget of one engine step.")] = 2048,
    max_num_seqs: Annotated[int, typer.Option(help="vLLM request slots (open streams hold one).")] = 64,
    policy: Annotated[str, typer.Option(help="Scheduling policy.")] = "stream2llm",
    dtype: Annotated[str, typer.Option(help="Weights and activations: bfloat16 or float32.")] = "bfloat16",
    replicas: ReplicasOpt = 1,
    routing: RoutingOpt = "consistent_hash",
    disaggregate: DisaggregateOpt = False,
    kv_connector: KvConnectorOpt = "stream2llm",
    kv_events_config: KvEventsOpt = None,
    otlp_traces_endpoint: OtlpOpt = None,
    debug: DebugOpt = False,
):
    """Serve the HTTP API (streaming sessions, OpenAI-compatible completions and chat) until Ctrl-C."""
    kv_events = _kv_events(kv_events_config, replicas, debug)
    if replicas > 1:
        from stream2llm.cli.replicas_cmds import serve_replicas

        return serve_replicas(
            replicas, routing, host, port, token, debug, model=model, max_sessions=max_sessions,
            kv_cache_gb=kv_cache_gb, max_model_len=max_model_len, policy=policy, dtype=dtype,
            disaggregate=disaggregate or None, kv_connector=kv_connector if disaggregate else None,
            max_batched_tokens=max_batched_tokens,
            max_num_seqs=max_num_seqs, otlp_traces_endpoint=otlp_traces_endpoint,
        )  # fmt: skip
    _serve_one(
        model=model, host=host, port=port, token=token, max_sessions=max_sessions, kv_cache_gb=kv_cache_gb,
        max_model_len=max_model_len, policy=policy, dtype=dtype, debug=debug,
        kv_connector=kv_connector if disaggregate else None, max_batched_tokens=max_batched_tokens,
        max_num_seqs=max_num_seqs, allow_insecure_bind=allow_insecure_bind,
        allowed_origins=tuple(allowed_origin or ()), allowed_hosts=tuple(allowed_host or ()),
        kv_events=kv_events, otlp_traces_endpoint=otlp_traces_endpoint,
    )  # fmt: skip


def _kv_events(text: str | None, replicas: int, debug: bool) -> dict[str, Any] | None:
    """``--kv-events-config`` as KVEventsConfig fields; a clear error for what cannot serve."""
    if text is None:
        return None
    if replicas > 1:
        why = "each instance needs its own endpoint: start them one by one (`stream2llm serve`)"
        fail(ValueError(f"--kv-events-config with --replicas: {why}"), debug)
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(ValueError(f"--kv-events-config is not JSON ({exc}): {text!r}"), debug)
    if not isinstance(fields, dict):
        fail(
            ValueError(f"--kv-events-config must be a JSON object of KVEventsConfig fields: {text!r}"), debug
        )
    return fields


def _serve_one(
    *,
    model: str,
    host: str,
    port: int,
    token: str | None,
    max_sessions: int,
    kv_cache_gb: float,
    max_model_len: int,
    policy: str,
    dtype: str,
    debug: bool,
    kv_connector: str | None,
    max_batched_tokens: int = 2048,
    max_num_seqs: int = 64,
    allow_insecure_bind: bool = False,
    allowed_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] = (),
    kv_events: dict[str, Any] | None = None,
    otlp_traces_endpoint: str | None = None,
) -> None:
    """One engine serving HTTP in this process until a signal (SIGTERM: status 0) or its death;
    with a ``kv_connector`` (``--disaggregate``) it prefills and a vLLM decode instance answers."""
    from stream2llm.engine.engine import EngineConfig
    from stream2llm.server.app import ServerSettings
    from stream2llm.server.app import serve as run_server

    config = EngineConfig(
        model=model,
        policy=policy,
        kv_cache_bytes=int(kv_cache_gb * (1 << 30)),
        max_model_len=max_model_len,
        max_sessions=max(max_sessions, 1),
        dtype=dtype,
        max_num_batched_tokens=max_batched_tokens,
        max_num_seqs=max_num_seqs,
        vllm_stats=True,  # vLLM's own metrics, as vllm serve exports them
        kv_events=kv_events,
        otlp_traces_endpoint=otlp_traces_endpoint,
    )
    settings = ServerSettings(
        host=host, port=port, token=token, max_sessions=max_sessions, allow_insecure_bind=allow_insecure_bind,
        allowed_origins=allowed_origins, allowed_hosts=allowed_hosts,
    )  # fmt: skip

    def ready(url: str) -> None:
        console.print(f"serving [bold]{model}[/bold] at [green]{url}[/green] (OpenAI base URL: {url}/v1)")

    def serving(engine_config: EngineConfig) -> Any:
        return run_server(engine_config, settings, on_ready=ready)

    try:
        console.print(f"starting the engine ({model}) ...")
        run_async(_disaggregated(config, serving, kv_connector) if kv_connector else serving(config))
    except Stopped as stop:
        if stop.signal != signal.SIGTERM:
            fail(stop, debug)
        console.print("stopped")  # a requested shutdown: status 0, as vLLM's own server
    except Exception as exc:
        fail(exc, debug)


async def _disaggregated(config: Any, serving: Any, connector: str) -> None:
    """``serve --disaggregate``: the decode instance first, then this (prefill) instance."""
    from stream2llm.deploy.disaggregated import run_disaggregated

    console.print(f"starting the decode instance (vLLM, KV connector: {connector}) ...")
    await run_disaggregated(config, serving, lambda line: console.print(line, highlight=False), connector)


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
    """Answer one question: print context events as the retrievers find them, then the answer.

    Exits 1 (after the answer and --json) when a retriever failed."""
    from stream2llm.cli.show import retrieval_failure, run_question

    quiet_engine_logs()

    try:
        report = run_async(
            run_question(
                question,
                retriever.split(","),
                source_options(seed_url, allow_private, max_pages, index_docs),
                model=model,
                mode=mode,
                max_tokens=max_tokens,
                max_model_len=max_model_len,
                console=console,
            )
        )
    except Exception as exc:
        fail(exc, debug)
    write_json(json_out, report)
    if (failure := retrieval_failure(report)) is not None:
        errors.print(f"[red]error:[/red] {failure}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
