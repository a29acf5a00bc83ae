"""The RAG pipeline on the real engine, with retrievers that emit real events over time."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from stream2llm.context.events import Op
from stream2llm.context.prompt import DOC_SEPARATOR
from stream2llm.pipelines.pipeline import ContextArrived, RagAnswer, RagPipeline, TokenDelta
from stream2llm.retrievers.base import EventNumberer
from tests.conftest import corpus_text
from tests.engine.helpers import GREEDY, oneshot

pytestmark = pytest.mark.engine


class Pages:
    """An append retriever: fixed pages, one every ``gap`` seconds, then an empty final event."""

    name = "pages"
    mode = Op.APPEND

    def __init__(self, pages: list[str], gap: float = 0.05, fail_after: int | None = None) -> None:
        self.pages, self.gap, self.fail_after = pages, gap, fail_after

    async def stream(self, query: str, *, request_id: str = ""):
        events = EventNumberer(request_id)
        for i, page in enumerate(self.pages):
            if i == self.fail_after:
                raise ConnectionError("site went away")
            await asyncio.sleep(self.gap)
            yield events.append(page, source=f"http://site/{i}")
        yield events.end()


class Refining:
    """An update retriever: a top-k that changes over a few stages, the last one final."""

    name = "ann"
    mode = Op.UPDATE

    def __init__(self, stages: list[list[str]], gap: float = 0.03) -> None:
        self.stages, self.gap = stages, gap

    async def stream(self, query: str, *, request_id: str = ""):
        events = EventNumberer(request_id)
        for i, docs in enumerate(self.stages):
            await asyncio.sleep(self.gap)
            ids = tuple(d[:8] for d in docs)
            yield events.update(docs, final=i == len(self.stages) - 1, sources=ids)


def _docs(n: int, seed: int) -> list[str]:
    return [corpus_text(500, seed=seed * 10 + i) for i in range(n)]


async def test_streamed_pipeline_answers_like_one_shot_on_the_same_context(engine):
    pages = _docs(4, seed=1)
    pipeline = RagPipeline(engine, [Pages(pages)], sampling=GREEDY)
    items = [item async for item in pipeline.events("What does this say about classes?")]
    kinds = [type(i) for i in items]
    assert kinds.count(ContextArrived) == 5 and isinstance(items[-1], RagAnswer)
    assert max(i for i, k in enumerate(kinds) if k is ContextArrived) < kinds.index(TokenDelta)
    answer = items[-1]
    assert "".join(i.text for i in items if isinstance(i, TokenDelta)) == answer.text
    ref = await oneshot(engine, "What does this say about classes?", DOC_SEPARATOR.join(pages))
    assert answer.text == ref.text
    assert answer.prompt_tokens == len(ref.prompt_token_ids)
    # the pages went as appends: every prompt token was prefilled once, none recomputed
    assert answer.tokens_recomputed == 0 and answer.tokens_prefilled == answer.prompt_tokens
    assert answer.sources == [f"http://site/{i}" for i in range(4)]
    assert answer.timings["retrieval_s"] >= 4 * 0.05
    assert answer.timings["ttft_query_s"] >= answer.timings["retrieval_s"] - 0.01


async def test_two_retrievers_and_nonstream_mode_give_the_same_answer(engine):
    docs = _docs(5, seed=2)
    stages = [[docs[0], docs[1], docs[2]], [docs[3], docs[0], docs[2]], [docs[3], docs[4], docs[0]]]
    pages = _docs(2, seed=3)

    def retrievers():
        return [Refining(stages), Pages(pages, gap=0.08)]

    streamed = await RagPipeline(engine, retrievers(), sampling=GREEDY).answer("Which one matters?")
    baseline = await RagPipeline(engine, retrievers(), sampling=GREEDY, mode="nonstream").answer(
        "Which one matters?"
    )
    assert streamed.text == baseline.text
    assert streamed.prompt_tokens == baseline.prompt_tokens
    assert streamed.mode == "stream" and baseline.mode == "nonstream"
    # the final top-k's three documents, then both pages
    assert len(streamed.sources) == 5 and streamed.sources[-2:] == ["http://site/0", "http://site/1"]
    assert streamed.tokens_prefilled >= streamed.prompt_tokens  # updates recompute past their LCP
    assert baseline.tokens_prefilled <= baseline.prompt_tokens


async def test_a_failing_retriever_keeps_what_arrived_and_other_queries_are_unharmed(engine):
    pages = _docs(3, seed=4)
    pipeline = RagPipeline(engine, [Pages(pages, fail_after=2)], sampling=GREEDY)
    healthy = RagPipeline(engine, [Pages(pages[:2])], sampling=GREEDY)
    broken, fine = await asyncio.gather(pipeline.answer("q?"), healthy.answer("q?"))
    assert broken.errors == ["pages: site went away"]
    assert fine.errors == []
    assert broken.text == fine.text  # both saw exactly the first two pages
    assert broken.sources == fine.sources == ["http://site/0", "http://site/1"]


async def test_answer_many_runs_queries_concurrently_and_leaves_no_session_behind(engine):
    pages = _docs(3, seed=5)
    questions = [f"question {i} {uuid.uuid4().hex[:4]}?" for i in range(6)]
    pipeline = RagPipeline(engine, [Pages(pages, gap=0.1)], sampling=GREEDY)
    answers = await pipeline.answer_many(questions, concurrency=6)
    assert [a.question for a in answers] == questions
    # six queries with 0.1 s gaps each: concurrent, so far less than 6 x the retrieval time
    longest = max(a.timings["total_s"] for a in answers)
    assert longest < 6 * min(a.timings["retrieval_s"] for a in answers)
    assert not engine.open_sessions()


async def test_closing_the_event_stream_early_aborts_the_session(engine):
    pipeline = RagPipeline(engine, [Pages(_docs(3, seed=6), gap=0.2)], sampling=GREEDY)
    stream = pipeline.events("stop early?")
    first = await anext(stream)
    assert isinstance(first, ContextArrived)
    await stream.aclose()
    assert not engine.open_sessions()
