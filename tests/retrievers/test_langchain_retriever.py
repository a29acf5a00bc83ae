"""LangChain bridges: LangChain's own standard retriever tests on our ANN retriever, and a LangChain
retriever wrapped as a stream."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_tests.integration_tests import RetrieversIntegrationTests

from stream2llm.context.events import Op
from stream2llm.integrations.langchain.retriever import (
    OneShotStream,
    StreamingRetrieverAdapter,
    as_langchain_retriever,
)
from stream2llm.retrievers.base import StreamingRetriever
from stream2llm.retrievers.faiss_ann import ProgressiveAnnRetriever, ShardedAnnRetriever
from tests.retrievers.helpers import NPROBE, small_index

QUERY = "Which planet has the largest moons?"


class TestAnnRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[StreamingRetrieverAdapter]:
        return StreamingRetrieverAdapter

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"retriever": ProgressiveAnnRetriever(small_index(), k=5, nprobe=NPROBE), "k": 4}

    @property
    def retriever_query_example(self) -> str:
        return QUERY


def test_adapter_returns_the_final_update_in_order_with_ids():
    index = small_index()
    streaming = ProgressiveAnnRetriever(index, k=5, nprobe=NPROBE, layout="score")
    docs = as_langchain_retriever(streaming).invoke(QUERY)
    hits = index.search(QUERY, 5, nprobe=NPROBE)
    assert [d.id for d in docs] == [h.doc.id for h in hits]
    assert [d.page_content for d in docs] == [h.doc.render() for h in hits]
    assert docs[0].metadata == {"source": hits[0].doc.id, "seq": 3}  # the 4th (last) stage's list


async def test_adapter_returns_every_page_of_an_append_retriever():
    index = small_index()
    streaming = ShardedAnnRetriever.from_index(index, 3, k=4)
    events = [e async for e in streaming.stream(QUERY)]
    docs = await as_langchain_retriever(streaming).ainvoke(QUERY)
    pages = [e for e in events if e.text]
    assert [d.page_content for d in docs] == [e.text.strip() for e in pages]
    assert [d.metadata["seq"] for d in docs] == [e.seq for e in pages]


class ListRetriever(BaseRetriever):
    """A plain LangChain retriever: documents whose text contains a query word."""

    docs: list[Document]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        words = set(query.lower().split())
        return [d for d in self.docs if words & set(d.page_content.lower().split())]


async def test_one_shot_stream_emits_one_final_update():
    docs = [
        Document(page_content="Mars has two moons.", id="mars"),
        Document(page_content="Venus has none.", metadata={"source": "venus.html"}),
        Document(page_content="Jupiter has moons too.", id="jupiter"),
    ]
    stream = OneShotStream(ListRetriever(docs=docs), name="list")
    assert isinstance(stream, StreamingRetriever) and stream.mode is Op.UPDATE
    events = [e async for e in stream.stream("Mars or Jupiter", request_id="q")]
    assert len(events) == 1
    (event,) = events
    assert (event.op, event.final, event.seq, event.request_id) == (Op.UPDATE, True, 0, "q")
    assert event.docs == ("Mars has two moons.", "Jupiter has moons too.")
    assert event.sources == ("mars", "jupiter")
    assert [e.sources async for e in stream.stream("venus")] == [("venus.html",)]

    (empty,) = [e async for e in stream.stream("Saturn")]
    assert (empty.op, empty.final, empty.text) == (Op.APPEND, True, "")


async def test_round_trip_langchain_to_stream_to_langchain():
    docs = [Document(page_content="Mars has two moons.", id="mars")]
    back = await as_langchain_retriever(OneShotStream(ListRetriever(docs=docs))).ainvoke("mars")
    assert [(d.id, d.page_content) for d in back] == [("mars", "Mars has two moons.")]
