"""``stream2llm demo``, the README's main job: real retrieval streamed into the model while it runs.

On first use it prepares the default model, the Wikipedia ANN index and the local crawl site (the
pygame docs on loopback); later runs reuse the caches. Each question streams its retriever's context
events into a session while retrieval goes on (live display), then the same final context is sent
the non-streaming way on the same engine, and the two TTFTs are compared.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from stream2llm.cli.show import describe_event
from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.pipelines.pipeline import ContextArrived, RagAnswer, RagPipeline, TokenDelta
from stream2llm.pipelines.sources import SourceOptions, open_retrievers


@dataclass(frozen=True)
class DemoQuestion:
    question: str
    retriever: str  # which packaged retriever answers it


QUESTIONS = (
    DemoQuestion("How do I draw a rectangle on a surface?", "crawl"),
    DemoQuestion("Who was Marie Curie and what did she discover?", "ann"),
    DemoQuestion("How can I play a sound?", "crawl"),
    DemoQuestion("What causes earthquakes?", "ann"),
)


class _LiveView:
    """The question being answered: the latest context events and the answer as it streams."""

    def __init__(self, question: DemoQuestion) -> None:
        self.question = question
        self.events: deque[str] = deque(maxlen=8)
        self.answer = ""
        self.status = "retrieving ..."

    def render(self) -> Panel:
        events = Text.from_markup("\n".join(self.events) or "[dim]waiting for the first context[/dim]")
        answer = Text(self.answer or "", style="bold")
        body = Group(events, Text(""), Text.assemble(("answer: ", "green"), answer))
        title = f"[{self.question.retriever}] {self.question.question}"
        return Panel(body, title=title, subtitle=self.status, title_align="left")


async def _streamed(pipeline: RagPipeline, question: DemoQuestion, live: Live, view: _LiveView) -> RagAnswer:
    answer = None
    async for item in pipeline.events(question.question):
        if isinstance(item, ContextArrived):
            view.events.append(describe_event(item))
            if item.final:
                view.status = "retrieval done, answering ..."
        elif isinstance(item, TokenDelta):
            view.answer += item.text
        else:
            answer = item
        live.update(view.render())
    assert answer is not None
    return answer


async def _nonstreamed(engine: StreamingEngine, question: str, context: str, sampling: Any) -> Any:
    """The baseline: the same final context, sent whole once retrieval is over. Its own cache salt
    keeps it from reusing the streamed session's KV (it must prefill everything, as it would)."""
    session = await engine.open(
        question, sampling, mode="nonstream", truncate=True, cache_salt=uuid.uuid4().hex
    )
    if context:
        await session.update(context)
    await session.finish()
    return await session.result()


def _row(question: DemoQuestion, streamed: RagAnswer, baseline: Any) -> dict[str, Any]:
    ttft_stream = streamed.timings["ttft_final_s"]
    return {
        "question": question.question,
        "retriever": question.retriever,
        "events": streamed.events,
        "prompt_tokens": streamed.prompt_tokens,
        "retrieval_s": streamed.timings["retrieval_s"],
        "ttft_final_stream_s": ttft_stream,
        "ttft_final_nonstream_s": baseline.ttft_final_s,
        "ttft_query_stream_s": streamed.timings["ttft_query_s"],
        "ttft_query_nonstream_s": streamed.timings["retrieval_s"] + baseline.ttft_final_s,
        "speedup": baseline.ttft_final_s / max(ttft_stream, 1e-6),
        "same_answer": streamed.text == baseline.text,
        # what the engine computed, both ways: tells a bf16 near-tie apart from a wrong prompt
        "same_prompt": streamed.prompt_digest is not None
        and streamed.prompt_digest == baseline.computed_prompt_digest,
        "answer": streamed.text,
        "sources": streamed.sources,
        "errors": streamed.errors,
    }


def summary_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(
        "question",
        "via",
        "tokens",
        "retrieval",
        "TTFT stream",
        "TTFT nonstream",
        "faster",
        "same",
        title="TTFT after retrieval ends: streamed prefill vs the same context sent after retrieval",
    )
    for r in rows:
        question = r["question"]
        table.add_row(
            question if len(question) <= 32 else question[:31] + "…",
            r["retriever"],
            f"{r['prompt_tokens']:,}",
            f"{r['retrieval_s']:.1f} s",
            f"{r['ttft_final_stream_s']:.2f} s",
            f"{r['ttft_final_nonstream_s']:.2f} s",
            f"{r['speedup']:.1f}x",
            _same(r),
        )
    if any(r["same_prompt"] and not r["same_answer"] for r in rows):
        table.caption = PROMPT_ONLY
    return table


PROMPT_ONLY = (
    "prompt: the engine computed the same prompt token ids both ways, and the answers part at a "
    "near-tie: bf16 kernels round a prefill split into chunks differently (float32 answers are "
    "identical; README, Quick start)"
)


def _same(row: dict[str, Any]) -> str:
    """``yes``: identical answers; ``prompt``: the same computed prompt, a bf16 near-tie; ``no``."""
    if row["same_answer"]:
        return "yes"
    return "[yellow]prompt[/yellow]" if row["same_prompt"] else "[red]no[/red]"


async def run_demo(
    model: str,
    *,
    questions: int,
    options: SourceOptions,
    max_tokens: int,
    console: Console,
    engine: StreamingEngine | None = None,
    max_doc_chars: int = 1500,
) -> dict[str, Any]:
    """Answer ``questions`` of the demo questions; returns the summary as a dict (for --json)."""
    from stream2llm.engine import models
    from stream2llm.engine.health import start_off_loop

    chosen = [QUESTIONS[i % len(QUESTIONS)] for i in range(questions)]
    t0 = time.monotonic()
    with console.status(f"preparing the model {model} (converted once on first use) ..."):
        await start_off_loop(lambda: models.resolve(model), lambda _: None)  # a signal is served meanwhile
    async with open_retrievers(sorted({q.retriever for q in chosen}), options) as sources:
        by_name = {s.name: s for s in sources}
        owned = engine is None
        if engine is None:
            with console.status(f"starting the engine ({model}) ..."):
                engine = await StreamingEngine.start(EngineConfig(model=model, max_model_len=8192))
        console.print(f"ready in {time.monotonic() - t0:.1f} s")
        from vllm import SamplingParams  # loaded by the engine's start, off the event loop

        sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
        try:
            rows = []
            for question in chosen:
                view = _LiveView(question)
                pipeline = RagPipeline(
                    engine, [by_name[question.retriever]], sampling=sampling, max_doc_chars=max_doc_chars
                )
                with Live(view.render(), console=console, refresh_per_second=12) as live:
                    streamed = await _streamed(pipeline, question, live, view)
                    view.status = "same context, sent after retrieval (nonstream) ..."
                    live.update(view.render())
                    baseline = await _nonstreamed(engine, question.question, streamed.context, sampling)
                    row = _row(question, streamed, baseline)
                    view.status = (
                        f"TTFT after retrieval {row['ttft_final_stream_s']:.3f} s streamed vs "
                        f"{row['ttft_final_nonstream_s']:.3f} s nonstream"
                    )
                    live.update(view.render())
                rows.append(row)
        finally:
            if owned:
                await engine.shutdown()
    console.print(summary_table(rows))
    return {"model": model, "questions": rows}
