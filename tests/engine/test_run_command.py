"""What `stream2llm run` shows: context events as they arrive, then the answer, then the timings."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import pytest
from rich.console import Console

from stream2llm.cli.show import retrieval_failure, show_events, timings_table
from stream2llm.pipelines.pipeline import RagPipeline
from stream2llm.pipelines.sources import SourceOptions, open_retrievers
from stream2llm.retrievers.ann_index import AnnIndexError
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


class BrokenIndexRetriever:
    """A retriever whose index cannot be read: its stream raises before any context."""

    name = "broken"

    async def stream(self, query: str, *, request_id: str = ""):
        raise AnnIndexError("index file /nowhere/index.faiss is unreadable")
        yield  # an async generator


async def test_a_failed_retriever_is_reported_and_makes_run_fail(engine):
    """Every retriever failed: the error and the (context-free) answer are shown, and the report
    says retrieval failed; with another retriever working, the context is partial."""
    out = io.StringIO()
    console = Console(file=out, width=200)
    pipeline = RagPipeline(engine, [BrokenIndexRetriever()], sampling=GREEDY)
    answer = await show_events(pipeline, "surface blit", console)
    shown = out.getvalue()
    assert "retriever error: broken: index file /nowhere/index.faiss is unreadable" in shown
    assert answer.text.strip() and "answer: " in shown  # what it has is still printed
    assert answer.failed == ["broken"] and answer.context == ""
    assert "failed (broken)" in retrieval_failure(asdict(answer))
    assert "without any context" in retrieval_failure(asdict(answer))

    async with open_retrievers(["crawl"], SourceOptions(max_pages=2)) as retrievers:
        both = RagPipeline(engine, [*retrievers, BrokenIndexRetriever()], sampling=GREEDY)
        partial = await show_events(both, "surface blit", Console(file=io.StringIO()))
    assert partial.failed == ["broken"] and partial.context
    assert "partial context" in retrieval_failure(asdict(partial))
    assert not partial.errors[0].startswith("crawl")


def test_run_command_exits_1_after_printing_when_a_retriever_failed(monkeypatch, tmp_path):
    """The command's wiring: the answer and --json come first, then the error and status 1; a run
    whose retrieval succeeded exits 0."""
    from typer.testing import CliRunner

    from stream2llm import cli
    from stream2llm.cli import show

    report = {
        "question": "q",
        "text": "an answer",
        "failed": ["ann"],
        "errors": ["ann: broken"],
        "context": "",
    }

    async def fake_run_question(question, retrievers, options, **kwargs):
        kwargs["console"].print(f"answer: {report['text']}")
        return report

    monkeypatch.setattr(show, "run_question", fake_run_question)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(cli.app, ["run", "q", "--retriever", "ann", "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "answer: an answer" in result.output
    assert "retrieval failed (ann)" in result.output and "without any context" in result.output
    assert json.loads(out.read_text())["failed"] == ["ann"]  # the report was still written

    report = {**report, "failed": [], "errors": [], "context": "docs"}
    result = CliRunner().invoke(cli.app, ["run", "q", "--retriever", "ann"])
    assert result.exit_code == 0, result.output
