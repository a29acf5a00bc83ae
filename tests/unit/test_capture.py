"""Trace capture from a retriever (no model): timing, payloads, and a round trip through the reader."""

from __future__ import annotations

import asyncio

import pytest

from stream2llm.context.events import Op
from stream2llm.retrievers.base import EventNumberer
from stream2llm.workloads.capture import capture, read_queries
from stream2llm.workloads.trace import TraceError, read_trace


class Slow:
    name = "slow"
    mode = Op.UPDATE

    async def stream(self, query: str, *, request_id: str = ""):
        events = EventNumberer(request_id)
        await asyncio.sleep(0.05)
        yield events.update([f"{query} one"])
        await asyncio.sleep(0.1)
        yield events.update([f"{query} two", f"{query} one"], final=True)


async def test_capture_records_event_times_and_payloads_and_reads_back(tmp_path):
    out = tmp_path / "t.jsonl"
    requests = await capture(Slow(), ["alpha", "beta"], out)
    back = read_trace(out)
    assert [r.query for r in back] == ["alpha", "beta"]
    assert [r.id for r in back] == [r.id for r in requests] == ["slow-00000", "slow-00001"]
    first = back[0].events
    assert [e.op for e in first] == ["update", "update"]
    assert first[1].docs == ("alpha two", "alpha one")
    assert 0.04 <= first[0].t < 0.1 and 0.14 <= first[1].t < 0.3


def test_read_queries_accepts_text_and_jsonl_and_names_bad_lines(tmp_path):
    text = tmp_path / "q.txt"
    text.write_text('# comment\nwhat is a surface?\n\n{"question": "how to draw?"}\n')
    assert read_queries(text) == ["what is a surface?", "how to draw?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('fine\n{"query": 3}\n')
    with pytest.raises(TraceError, match=r"bad.jsonl:2: needs a non-empty 'query'"):
        read_queries(bad)
