"""What `stream2llm run` shows: context events as they arrive, then the answer, then the timings."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from stream2llm.cli.show import show_events, timings_table
from stream2llm.pipelines.pipeline import RagPipeline
from stream2llm.pipelines.sources import SourceOptions, open_retrievers
from tests.engine.helpers import GREEDY

pytestmark = pytest.mark.engine


async def test_run_prints_each_crawled_page_then_the_streamed_answer(engine):
    out = io.StringIO()
    console = Console(file=out, width=200)
    async with open_retrievers(["crawl"], SourceOptions(max_pages=3)) as retrievers:
        answer = await show_events(RagPipeline(engine, retrievers, sampling=GREEDY), "surface blit", console)
    console.print(timings_table(answer))
    lines = out.getvalue().splitlines()
    events = [line for line in lines if " crawl append #" in line]
    assert len(events) == 4  # three pages from the local site, then the end of the crawl
    assert all("http://127.0.0.1:" in line for line in events[:3]) and "end of retrieval" in events[3]
    answer_line = next(i for i, line in enumerate(lines) if line.startswith("answer: "))
    assert answer_line > lines.index(events[-1])  # the answer streams after the context
    shown = "\n".join(lines[answer_line:]).removeprefix("answer: ")
    assert answer.text.strip() and shown.lstrip().startswith(answer.text.strip()[:12])
    assert any(line.strip().startswith("│ stream ") for line in lines)  # the timings table
