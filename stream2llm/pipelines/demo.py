"""The README's main job until the retriever demo lands: stream context into the default model while
it "arrives" and compare the time to first token with sending everything after retrieval."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from rich.console import Console
from rich.table import Table

from stream2llm.serving.engine import EngineConfig, Session, StreamingEngine

QUESTION = "What does the with statement do, and what happens when an exception is raised inside it?"
TOPICS = ("with", "context-managers", "exceptions")


def demo_context() -> list[str]:
    """Real documentation text shipped with Python (its help topics), one piece per "page"."""
    from pydoc_data.topics import topics

    return [topics[name].strip() + "\n\n" for name in TOPICS]


def _split(pages: list[str], chunks: int) -> list[str]:
    text = "".join(pages)
    size = -(-len(text) // chunks)
    return [text[i : i + size] for i in range(0, len(text), size)]


async def _answer(session: Session, console: Console, label: str) -> Any:
    console.print(f"[bold]{label} answer:[/bold] ", end="")
    async for delta in session.stream():
        console.print(delta, end="", highlight=False, markup=False)
    console.print()
    return await session.result()


async def _run_mode(
    engine: StreamingEngine, mode: str, pieces: list[str], gap_s: float, sampling: Any, console: Console
) -> dict[str, Any]:
    t0 = time.monotonic()
    session = await engine.open(QUESTION, sampling, mode=mode, cache_salt=uuid.uuid4().hex)
    for i, piece in enumerate(pieces):
        await asyncio.sleep(gap_s)  # retrieval of the next piece
        await session.append(piece)
        console.print(f"  [dim]{mode}: piece {i + 1}/{len(pieces)} arrived ({len(piece)} chars)[/dim]")
    await session.finish()
    result = await _answer(session, console, mode)
    return {
        "mode": mode,
        "ttft_final_s": result.ttft_final_s,
        "ttft_query_s": result.ttft_open_s,
        "wall_s": time.monotonic() - t0,
        "prompt_tokens": len(result.prompt_token_ids),
        "token_ids": result.token_ids,
        "text": result.text,
    }


async def run_demo(model: str, *, chunks: int, gap_s: float, max_tokens: int, console: Console) -> dict:
    from vllm import SamplingParams

    with console.status(f"preparing {model} and starting the engine (first run converts the model) ..."):
        engine = await StreamingEngine.start(EngineConfig(model=model, max_model_len=8192))
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens)
    pieces = _split(demo_context(), chunks)
    console.print(f"[bold]Question:[/bold] {QUESTION}")
    try:
        runs = [
            await _run_mode(engine, mode, pieces, gap_s, sampling, console)
            for mode in ("stream", "nonstream")
        ]
    finally:
        await engine.shutdown()
    stream, nonstream = runs
    table = Table(
        "mode", "prompt tokens", "TTFT after last piece", "TTFT from question", title="stream2llm demo"
    )
    for run in runs:
        table.add_row(
            run["mode"],
            str(run["prompt_tokens"]),
            f"{run['ttft_final_s']:.3f} s",
            f"{run['ttft_query_s']:.3f} s",
        )
    console.print(table)
    speedup = nonstream["ttft_final_s"] / max(stream["ttft_final_s"], 1e-9)
    same = stream["token_ids"] == nonstream["token_ids"]
    console.print(
        f"streaming cut TTFT after the last piece by [bold]{speedup:.1f}x[/bold]; "
        f"answers identical: [bold]{same}[/bold]"
    )
    return {
        "model": model,
        "question": QUESTION,
        "runs": runs,
        "speedup_ttft_final": speedup,
        "identical": same,
    }
