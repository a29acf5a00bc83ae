"""FAISS retrievers on a real index (600 Wikipedia articles, real all-MiniLM-L6-v2 vectors)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from stream2llm.context.events import Op
from stream2llm.context.prompt import DOC_SEPARATOR
from stream2llm.retrievers.ann_index import (
    AnnIndex,
    AnnIndexError,
    EmbedderMismatch,
    IndexCorrupt,
    IndexNotFound,
)
from stream2llm.retrievers.base import StreamingRetriever
from stream2llm.retrievers.faiss_ann import ProgressiveAnnRetriever, ShardedAnnRetriever, stage_bounds
from tests.retrievers.helpers import NPROBE

QUERIES = [
    "Which planet has the largest moons?",
    "history of the Roman empire",
    "How do vaccines train the immune system?",
    "famous composers of the baroque period",
    "Tell me about the 1968 film by Stanley Kubrick.",
    "rivers of South America",
]


async def collect(retriever, query: str, **kwargs):
    return [e async for e in retriever.stream(query, request_id="r1", **kwargs)]


async def test_progressive_final_equals_one_shot_search(ann_index):
    retriever = ProgressiveAnnRetriever(ann_index, k=6, nprobe=NPROBE, stages=4, layout="score")
    assert isinstance(retriever, StreamingRetriever)
    assert retriever.bounds() == [1, 2, 4, 8]
    refined = 0
    for query in QUERIES:
        events = await collect(retriever, query)
        one_shot = ann_index.search(query, 6, nprobe=NPROBE)
        assert len(events) == 4
        assert list(events[-1].sources) == [h.doc.id for h in one_shot]
        assert list(events[-1].docs) == [h.doc.render() for h in one_shot]
        refined += events[0].sources != events[-1].sources
        # the first stage is what one probe list gives
        assert set(events[0].sources) == {h.doc.id for h in ann_index.search(query, 6, nprobe=1)}
    assert refined >= 2  # the stages really refine the answer


async def test_stable_layout_has_the_same_final_set_and_keeps_survivors_in_place(ann_index):
    retriever = ProgressiveAnnRetriever(ann_index, k=6, nprobe=NPROBE, layout="stable")
    for query in QUERIES:
        events = await collect(retriever, query)
        assert set(events[-1].sources) == {h.doc.id for h in ann_index.search(query, 6, nprobe=NPROBE)}
        for before, after in zip(events, events[1:]):
            survivors = [s for s in before.sources if s in after.sources]
            assert list(after.sources[: len(survivors)]) == survivors


async def test_events_are_numbered_timed_updates_ending_in_one_final(ann_index):
    retriever = ProgressiveAnnRetriever(ann_index, k=4, nprobe=NPROBE)
    events = await collect(retriever, QUERIES[0])
    assert [e.seq for e in events] == list(range(len(events)))
    assert all(e.op is Op.UPDATE and e.request_id == "r1" for e in events)
    assert [e.final for e in events] == [False] * (len(events) - 1) + [True]
    assert all(a.t <= b.t for a, b in zip(events, events[1:]))
    for e in events:
        assert len(e.docs) == len(e.sources) == 4
        by_id = {d.id: d for d in ann_index.docs}
        assert list(e.docs) == [by_id[s].render() for s in e.sources]


async def test_a_title_query_finds_its_article(ann_index):
    retriever = ProgressiveAnnRetriever(ann_index, k=5, nprobe=NPROBE)
    titles = sorted({d.title for d in ann_index.docs})[::60]
    assert len(titles) >= 8
    for title in titles:
        events = await collect(retriever, title)
        found = {s.split("#")[0] for s in events[-1].sources}
        assert title in found, (title, events[-1].sources)


async def test_pacing_spaces_the_stages(ann_index):
    retriever = ProgressiveAnnRetriever(ann_index, k=3, nprobe=NPROBE, min_stage_s=0.15)
    events = await collect(retriever, QUERIES[1])
    gaps = [b.t - a.t for a, b in zip(events, events[1:])]
    assert len(gaps) == 3 and min(gaps) >= 0.14


async def test_cancelling_mid_stream_stops_at_once(ann_index):
    retriever = ProgressiveAnnRetriever(ann_index, k=3, nprobe=NPROBE, min_stage_s=0.5)
    seen = []
    first = asyncio.Event()

    async def consume():
        async for event in retriever.stream(QUERIES[2], request_id="c"):
            seen.append(event)
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 0.2
    await asyncio.sleep(0.6)  # a stage that kept running would have produced by now
    assert len(seen) == 1 and not seen[0].final

    stream = retriever.stream(QUERIES[2], request_id="c2")
    assert (await anext(stream)).seq == 0
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_flat_index_is_a_single_final_stage(ann_index):
    flat = ann_index.subset(0, 200)
    assert flat.kind == "flat"
    events = await collect(ProgressiveAnnRetriever(flat, k=4, nprobe=NPROBE, layout="score"), QUERIES[3])
    assert len(events) == 1 and events[0].final
    assert list(events[0].sources) == [h.doc.id for h in flat.search(QUERIES[3], 4)]


async def test_sharded_mode_appends_each_shards_new_documents(ann_index):
    retriever = ShardedAnnRetriever.from_index(ann_index, 3, k=5)
    assert retriever.mode is Op.APPEND
    exact = ann_index.subset(0, len(ann_index))  # flat: exact top-k over all shards
    for query in QUERIES[:3]:
        events = await collect(retriever, query)
        assert all(e.op is Op.APPEND for e in events)
        assert [e.seq for e in events] == list(range(len(events)))
        assert events[-1].final and not any(e.final for e in events[:-1])
        sent = [s for e in events for s in e.sources]
        assert len(sent) == len(set(sent))
        assert {h.doc.id for h in exact.search(query, 5)} <= set(sent)
        text = "".join(e.text for e in events)
        assert len(text.split(DOC_SEPARATOR)) >= len(sent)
        by_id = {d.id: d for d in ann_index.docs}
        assert all(by_id[s].render() in text for s in sent)


async def test_save_load_round_trip_and_embedder_mismatch(ann_index, tmp_path):
    path = ann_index.save(tmp_path / "idx")
    loaded = AnnIndex.load(path, embedder=ann_index.embedder)
    assert loaded.meta == ann_index.meta and loaded.kind == "ivf"
    assert loaded.docs == ann_index.docs
    for query in QUERIES[:2]:
        expected = [(h.doc.id, round(h.score, 5)) for h in ann_index.search(query, 5, nprobe=4)]
        assert [(h.doc.id, round(h.score, 5)) for h in loaded.search(query, 5, nprobe=4)] == expected

    meta = json.loads((path / "meta.json").read_text())
    meta["embedder"] = "some-other-model:0123456789abcdef:normalized"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(EmbedderMismatch, match="some-other-model"):
        AnnIndex.load(path, embedder=ann_index.embedder)
    with pytest.raises(IndexNotFound, match="stream2llm index build"):
        AnnIndex.load(tmp_path / "missing")


def test_corrupt_index_files_raise_the_index_error_naming_the_file(ann_index, tmp_path):
    """A truncated or garbage file of a saved index is an AnnIndexError that names it (FAISS's own
    RuntimeError and json's JSONDecodeError name no file)."""
    good = ann_index.save(tmp_path / "good")
    saved = {name: (good / name).read_bytes() for name in ("index.faiss", "docs.jsonl", "meta.json")}
    meta = json.loads(saved["meta.json"])
    damages = [
        ("index.faiss", saved["index.faiss"][: len(saved["index.faiss"]) // 2]),  # truncated
        ("index.faiss", b"\x00garbage" * 100),
        ("index.faiss", b""),
        ("meta.json", saved["meta.json"][: len(saved["meta.json"]) // 2]),  # truncated JSON
        ("meta.json", b"\xff\xfe not utf-8"),
        ("meta.json", b"[1, 2, 3]"),
        ("meta.json", json.dumps({k: v for k, v in meta.items() if k != "dim"}).encode()),
        ("docs.jsonl", saved["docs.jsonl"][: len(saved["docs.jsonl"]) // 2 + 7]),  # cut mid-line
        ("docs.jsonl", b'{"id": "x", "unknown_field": 1}\n'),
        ("docs.jsonl", b"\xff\xfe\n"),
    ]
    for i, (name, data) in enumerate(damages):
        path = tmp_path / f"bad{i}"
        path.mkdir()
        for other, content in saved.items():
            (path / other).write_bytes(data if other == name else content)
        with pytest.raises(AnnIndexError) as caught:
            AnnIndex.load(path, embedder=ann_index.embedder)
        assert str(path / name) in str(caught.value), (name, data[:40], caught.value)
        assert type(caught.value) is IndexCorrupt, (name, caught.value)
    loaded = AnnIndex.load(good, embedder=ann_index.embedder)  # the intact copy still loads
    assert loaded.docs == ann_index.docs


def test_bad_parameters_are_named(ann_index):
    with pytest.raises(ValueError, match="k must be"):
        ProgressiveAnnRetriever(ann_index, k=0)
    with pytest.raises(ValueError, match="layout"):
        ProgressiveAnnRetriever(ann_index, layout="random")
    with pytest.raises(ValueError, match="query is empty"):
        ann_index.search("  ", 3)
    with pytest.raises(AnnIndexError, match="kind"):
        AnnIndex.build(ann_index.docs[:3], ann_index.embedder, kind="hnsw")
    with pytest.raises(AnnIndexError, match="shards"):
        ann_index.split(0)
    assert stage_bounds(32, 4) == [4, 8, 16, 32] and stage_bounds(3, 4) == [1, 2, 3]


def test_build_embeds_unit_vectors_into_flat_or_ivf(ann_index):
    docs = ann_index.docs[:40]
    flat = AnnIndex.build(docs, ann_index.embedder)  # auto: small, so flat
    assert (flat.kind, flat.meta.n_vectors, flat.meta.nlist) == ("flat", 40, 0)
    assert flat.meta.embedder == ann_index.embedder.fingerprint
    top = flat.search(docs[7].render(), 1)[0]
    assert top.doc == docs[7] and top.score > 0.99  # unit vectors: cosine 1 with itself
    ivf = AnnIndex.build(docs, ann_index.embedder, kind="ivf", nlist=2)
    assert (ivf.kind, ivf.meta.nlist) == ("ivf", 2)
    assert [h.doc.id for h in ivf.search(QUERIES[0], 5, nprobe=2)] == [
        h.doc.id for h in flat.search(QUERIES[0], 5)
    ]  # probing every list is exact


def test_auto_switches_to_ivf_above_the_threshold():
    import numpy as np

    from stream2llm.retrievers.ann_index import IVF_MIN_VECTORS, _make_index, default_nlist

    vectors = np.random.default_rng(0).standard_normal((IVF_MIN_VECTORS + 1, 16)).astype("float32")
    assert _make_index(vectors[:-1], "auto", None).ntotal == IVF_MIN_VECTORS
    index = _make_index(vectors, "auto", None)
    assert index.nlist == default_nlist(len(vectors)) == len(vectors) // 39
    assert not hasattr(_make_index(vectors[:-1], "auto", None), "nlist")


async def test_concurrent_streams_each_get_their_own_one_shot_answer(ann_index):
    retriever = ProgressiveAnnRetriever(ann_index, k=5, nprobe=NPROBE, layout="score")
    runs = await asyncio.gather(*(collect(retriever, q) for q in QUERIES))
    for query, events in zip(QUERIES, runs):
        assert list(events[-1].sources) == [h.doc.id for h in ann_index.search(query, 5, nprobe=NPROBE)]
