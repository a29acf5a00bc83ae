"""What `stream2llm run` shows: context events as they arrive, then the answer, then the timings."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from rich.console import Console

from stream2llm.cli.show import retrieval_failure, show_events, timings_table
from stream2llm.pipelines.pipeline import RagPipeline
from stream2llm.pipelines.sources import SourceOptions, open_retrievers
from stream2llm.retrievers.ann_index import AnnIndexError
from tests.engine.helpers import GREEDY

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parents[2]


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


def _run_command(*args: str, tmp_path) -> tuple[subprocess.CompletedProcess, dict]:
    """The real `stream2llm run` in its own process (its own engine), on the tiny model."""
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "stream2llm", "run", *args, "--model", "tiny", "--max-tokens", "8"]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [*command, "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    return done, json.loads(out.read_text()) if out.exists() else {}


def test_run_command_exits_1_after_printing_when_retrieval_failed(tiny_model, tmp_path):
    """A seed the crawler's address guard refuses (loopback, without --allow-private): the crawl
    fails, the context-free answer and --json still come, then the error line and status 1."""
    done, report = _run_command("surface blit", "--retriever", "crawl", "--seed-url", "http://127.0.0.1:9/",
                                tmp_path=tmp_path)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "answer:" in done.stdout
    assert "retrieval failed (crawl)" in done.stderr and "without any context" in done.stderr
    assert report["failed"] == ["crawl"] and report["text"]  # the report was still written


def test_run_command_exits_0_when_retrieval_succeeded(tiny_model, tmp_path):
    done, report = _run_command("surface blit", "--retriever", "crawl", "--max-pages", "2", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert report["failed"] == [] and report["context"]
