"""StreamingRAG: the RAG pipeline as a LangChain Runnable on the real engine, with a retriever that
delivers pages over real time. Tokens must stream (not one buffered chunk), equal the pipeline's own
answer, and context arrivals must be reported before the first token."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import RunnableLambda
from vllm import SamplingParams

from stream2llm.context.events import Op
from stream2llm.integrations.langchain import StreamingRAG, rag_question
from stream2llm.pipelines.pipeline import RagPipeline
from stream2llm.retrievers.base import EventNumberer
from tests.conftest import corpus_text

pytestmark = pytest.mark.engine

SAMPLING = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
QUESTION = "What does the with statement do?"
GAP_S = 0.05


class SlowPages:
    """An append retriever: a few pages, one every GAP_S seconds, the last one final."""

    name = "pages"
    mode = Op.APPEND

    def __init__(self, n: int = 3) -> None:
        self.pages = [corpus_text(300, seed=40 + i) for i in range(n)]

    async def stream(self, query: str, *, request_id: str = ""):
        events = EventNumberer(request_id)
        for i, page in enumerate(self.pages):
            await asyncio.sleep(GAP_S)
            yield events.append(page, final=i == len(self.pages) - 1, source=f"http://site/{i}")


class CustomEvents(BaseCallbackHandler):
    """Records custom events dispatched through sync callbacks."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def on_custom_event(self, name, data, **kwargs) -> None:
        self.events.append((name, data))


async def test_astream_yields_the_pipelines_answer_token_by_token(engine):
    pages = SlowPages()
    rag = StreamingRAG(engine, [pages], sampling=SAMPLING)
    chunks = [c async for c in rag.astream(QUESTION)]
    answer = await RagPipeline(engine, [pages], sampling=SAMPLING).answer(QUESTION)
    assert len(chunks) > 1
    assert "".join(chunks) == answer.text and answer.text
    assert answer.sources == [f"http://site/{i}" for i in range(3)]
    oneshot = StreamingRAG(engine, [pages], sampling=SAMPLING, mode="nonstream")
    assert await oneshot.ainvoke({"question": QUESTION}) == answer.text


async def test_astream_events_report_context_before_the_first_token(engine):
    rag = StreamingRAG(engine, [SlowPages()], sampling=SAMPLING)
    events = [e async for e in rag.astream_events(QUESTION, version="v2")]
    kinds = [(e["event"], e["name"]) for e in events]
    contexts = [i for i, k in enumerate(kinds) if k == ("on_custom_event", "context")]
    tokens = [i for i, k in enumerate(kinds) if k == ("on_chain_stream", "StreamingRAG")]
    assert len(contexts) == 3 and len(tokens) > 1
    assert max(contexts) < min(tokens)
    data = [events[i]["data"] for i in contexts]
    assert [d["seq"] for d in data] == [0, 1, 2]
    assert {d["retriever"] for d in data} == {"pages"} and {d["op"] for d in data} == {"append"}
    assert [d["sources"] for d in data] == [[f"http://site/{i}"] for i in range(3)]
    assert [d["chars"] for d in data] == [300, 300, 300]
    assert data[-1]["final"] and data[-1]["t_s"] >= 3 * GAP_S * 0.9
    assert data[0]["t_s"] < data[1]["t_s"] < data[2]["t_s"]
    streamed = "".join(events[i]["data"]["chunk"] for i in tokens)
    (end,) = [e for e in events if e["event"] == "on_chain_end" and e["name"] == "StreamingRAG"]
    assert end["data"]["output"] == streamed
    (summary,) = [e["data"] for e in events if e["name"] == "rag_answer"]
    assert summary["sources"] == [f"http://site/{i}" for i in range(3)] and summary["events"] == 3


async def test_lcel_composition_streams_chunk_by_chunk(engine):
    rag = StreamingRAG(engine, [SlowPages()], sampling=SAMPLING)
    reference = await rag.ainvoke(QUESTION)
    chain = RunnableLambda(lambda x: {"question": x["q"]}) | rag | StrOutputParser()
    chunks = [c async for c in chain.astream({"q": QUESTION})]
    assert len(chunks) > 1 and "".join(chunks) == reference


async def test_sync_calls_from_another_thread_and_bad_input(engine):
    rag = StreamingRAG(engine, [SlowPages()], sampling=SAMPLING)
    reference = await rag.ainvoke(QUESTION)
    seen = CustomEvents()
    chunks = await asyncio.to_thread(lambda: list(rag.stream(QUESTION, {"callbacks": [seen]})))
    assert len(chunks) > 1 and "".join(chunks) == reference
    assert [name for name, _ in seen.events] == ["context"] * 3 + ["rag_answer"]
    assert [data["seq"] for _, data in seen.events[:3]] == [0, 1, 2]
    assert await asyncio.to_thread(rag.invoke, {"question": QUESTION}) == reference
    with pytest.raises(ValueError, match="question string"):
        await rag.ainvoke(42)
    with pytest.raises(ValueError, match=r"needs a 'question' string; got keys \['q'\]"):
        await rag.ainvoke({"q": QUESTION})
    assert engine.open_sessions() == []


def test_rag_question_joins_streamed_input():
    assert rag_question(["What ", "is it?"]) == "What is it?"
    assert rag_question([{"question": "What "}, {"question": "is it?"}]) == "What is it?"
    with pytest.raises(ValueError, match="empty question"):
        rag_question(["  "])
