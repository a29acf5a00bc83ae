"""Running one question from the command line: context events as they arrive, then the answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.pipelines.pipeline import ContextArrived, RagAnswer, RagPipeline, TokenDelta
from stream2llm.pipelines.sources import SourceOptions, open_retrievers


def describe_event(event: ContextArrived) -> str:
    """One line per context event: when, which retriever, what changed."""
    what = f"{event.chars:,} chars"
    if event.op == "update":
        what = f"{len(event.sources)} docs, {what}"
    elif not event.chars:
        what = "end of retrieval"
    where = f" [dim]{', '.join(event.sources[:3])}{' ...' if len(event.sources) > 3 else ''}[/dim]"
    return f"[cyan]+{event.t_s:6.2f}s[/cyan] {event.retriever} {event.op} #{event.seq}: {what}{where}"


def timings_table(answer: RagAnswer) -> Table:
    table = Table("mode", "retrieval", "TTFT after retrieval", "TTFT from question", "total", "prompt tokens")
    t = answer.timings
    table.add_row(
        answer.mode,
        f"{t['retrieval_s']:.2f} s",
        f"{t['ttft_final_s']:.3f} s",
        f"{t['ttft_query_s']:.2f} s",
        f"{t['total_s']:.2f} s",
        f"{answer.prompt_tokens:,}",
    )
    return table


async def show_events(pipeline: RagPipeline, question: str, console: Console) -> RagAnswer:
    """Print events as they arrive and the answer as it streams; return the answer."""
    answer: RagAnswer | None = None
    answering = False
    async for item in pipeline.events(question):
        if isinstance(item, ContextArrived):
            console.print(describe_event(item), highlight=False)
        elif isinstance(item, TokenDelta):
            if not answering:
                console.print("[bold]answer:[/bold] ", end="")
                answering = True
            console.print(item.text, end="", highlight=False, markup=False)
        else:
            answer = item
    console.print()
    assert answer is not None
    for error in answer.errors:
        console.print(f"[yellow]retriever error:[/yellow] {error}")
    return answer


def retrieval_failure(report: dict[str, Any]) -> str | None:
    """Why ``stream2llm run`` must exit non-zero although it answered: a retriever failed, so the
    answer was generated without (all of) its context; None when retrieval succeeded."""
    failed = report.get("failed") or []
    if not failed:
        return None
    context = "without any context" if not report.get("context") else "with partial context"
    return f"retrieval failed ({', '.join(failed)}): the answer above was generated {context}"


async def run_question(
    question: str,
    retrievers: Sequence[str],
    options: SourceOptions,
    *,
    model: str,
    mode: str,
    max_tokens: int,
    max_model_len: int,
    console: Console,
) -> dict[str, Any]:
    """``stream2llm run``: one question through the chosen retrievers and the engine."""
    async with open_retrievers(retrievers, options) as sources:
        with console.status(f"starting the engine ({model}) ..."):
            engine = await StreamingEngine.start(EngineConfig(model=model, max_model_len=max_model_len))
        try:
            from vllm import SamplingParams  # loaded by the engine's start, off the event loop

            pipeline = RagPipeline(
                engine, sources, mode=mode, sampling=SamplingParams(temperature=0, max_tokens=max_tokens)
            )
            answer = await show_events(pipeline, question, console)
        finally:
            await engine.shutdown()
    console.print(timings_table(answer))
    return asdict(answer)
