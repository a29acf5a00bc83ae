"""The demo (the README's main job) in its small CI variant: tiny model, small index, local site."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from stream2llm.cli.demo import run_demo
from stream2llm.pipelines.sources import SourceOptions
from stream2llm.retrievers.ann_index import default_index_dir
from tests.retrievers import helpers

pytestmark = pytest.mark.engine


async def test_demo_streams_both_retrievers_and_answers_like_nonstream(engine):
    helpers.small_index()  # built once and cached (shared with the retriever tests)
    index_dir = default_index_dir(f"test-wiki-{helpers.ARTICLES}-{helpers._cache_key()}")
    options = SourceOptions(index=str(index_dir), max_pages=4, nprobe=helpers.NPROBE, min_stage_s=0.05)
    out = io.StringIO()
    console = Console(file=out, width=160)
    report = await run_demo(
        "tiny", questions=2, options=options, max_tokens=8, console=console, engine=engine
    )

    crawl, ann = report["questions"]
    assert (crawl["retriever"], ann["retriever"]) == ("crawl", "ann")
    # crawl: up to four pages of the local pygame docs, then the end-of-crawl event
    assert 2 <= crawl["events"] <= 5
    assert crawl["sources"] and all(s.startswith("http://127.0.0.1:") for s in crawl["sources"])
    # ann: one update per progressive stage, each a top-k of Wikipedia chunks
    assert ann["events"] >= 2 and len(ann["sources"]) == options.k
    for row in (crawl, ann):
        assert row["same_answer"], row  # streamed prefill answers exactly like one-shot prefill
        assert row["same_prompt"], row  # and the engine computed the same prompt token ids
        assert row["prompt_tokens"] > 200
        assert row["retrieval_s"] > 0 and row["ttft_final_stream_s"] > 0
        assert row["ttft_query_nonstream_s"] > row["retrieval_s"]
        assert not row["errors"]
    text = out.getvalue()
    assert "TTFT stream" in text and "TTFT nonstream" in text and "How do I draw a rectangle" in text
    assert not engine.open_sessions()
