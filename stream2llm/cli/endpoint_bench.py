"""``stream2llm bench --endpoint URL``: the bench's replay over HTTP against a running deployment."""

from __future__ import annotations

from pathlib import Path

from stream2llm.cli.common import console, fail, run_async


def bench_endpoint(
    *,
    endpoint: str,
    traces: Path,
    qps: str,
    policies: str,
    delay_multiplier: float,
    scale: float,
    repeat: int,
    limit: int | None,
    max_tokens: int,
    max_model_len: int,
    deadline: float | None,
    layout: str,
    model: str,
    out: Path,
    debug: bool,
    **engine_options: object,
) -> None:
    """The same trace, arrivals and payloads as ``bench``, sent to ``endpoint``; the engine options
    (KV budget, batch size, step log) are the deployment's own and ignored here. ``model`` and
    ``max_model_len`` must match the deployment's, so that payloads have the intended sizes."""
    from stream2llm.workloads.http_bench import run_http_bench_command
    from stream2llm.workloads.replay import ReplayOptions

    options = ReplayOptions(delay_multiplier, scale, max_tokens, deadline_s=deadline)
    try:
        run_async(
            run_http_bench_command(
                endpoint,
                traces,
                qps=[float(q) for q in qps.split(",")],
                policies=policies.split(","),
                options=options,
                repeat=repeat,
                limit=limit,
                layout=layout,
                model=model,
                max_model_len=max_model_len,
                out=out,
                console=console,
            )
        )
    except Exception as exc:
        fail(exc, debug)
