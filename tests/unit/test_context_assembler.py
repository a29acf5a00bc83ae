"""The context assembler's ordering, merging and assembly logic (no model)."""

from __future__ import annotations

import asyncio

import pytest

from stream2llm.context.assembler import ContextAssembler, RetrieverFailed, SequenceCheck, merge
from stream2llm.context.events import ContextEvent, Op
from stream2llm.context.prompt import DOC_SEPARATOR
from stream2llm.errors import InvalidEvent, SequenceError


def ev(seq: int, text: str = "x", final: bool = False, rid: str = "r") -> ContextEvent:
    return ContextEvent(rid, seq, Op.APPEND, text, final=final)


def test_sequence_check_orders_holds_and_drops_duplicates():
    check = SequenceCheck("r")
    assert check.accept(ev(1, "b")) == []
    assert check.waiting == 1
    assert [e.text for e in check.accept(ev(0, "a"))] == ["a", "b"]
    assert check.accept(ev(0, "a")) == []
    assert check.duplicates == 1
    assert [e.seq for e in check.accept(ev(2, "c", final=True))] == [2]
    with pytest.raises(SequenceError, match="after its final event"):
        check.accept(ev(3))
    with pytest.raises(InvalidEvent, match="'other'"):
        SequenceCheck("r").accept(ev(0, rid="other"))


def test_sequence_check_expect_rejects_what_is_not_the_next_event():
    check = SequenceCheck("r")
    check.expect(ev(0))
    check.advance(ev(0))
    with pytest.raises(SequenceError, match=r"out-of-order event 2 for 'r': expected 1"):
        check.expect(ev(2))
    with pytest.raises(SequenceError, match=r"duplicate event 0 for 'r' \(next is 1\)"):
        check.expect(ev(0))
    check.expect(ev(1, final=True))
    assert check.next_seq == 1  # not applied yet: a failing event does not use up its number
    check.advance(ev(1, final=True))
    with pytest.raises(SequenceError, match="after its final event"):
        check.expect(ev(2))
    with pytest.raises(InvalidEvent, match="'other'"):
        SequenceCheck("r").expect(ev(0, rid="other"))


async def _gen(events, delay: float = 0.0, fail_after: int | None = None):
    for i, e in enumerate(events):
        if fail_after is not None and i == fail_after:
            raise OSError("connection reset")
        await asyncio.sleep(delay)
        yield e


async def test_merge_interleaves_by_arrival_and_survives_a_failing_retriever():
    fast = _gen([ev(i, f"f{i}") for i in range(3)], delay=0.01)
    slow = _gen([ev(0, "s0"), ev(1, "s1")], delay=0.035)
    broken = _gen([ev(0, "b0"), ev(1, "b1")], delay=0.0, fail_after=1)
    items = [item async for item in merge({"fast": fast, "slow": slow, "broken": broken})]
    failures = [i for i in items if isinstance(i, RetrieverFailed)]
    assert len(failures) == 1 and failures[0].retriever == "broken"
    order = [e.text for i in items if not isinstance(i, RetrieverFailed) for _, e in [i]]
    assert sorted(order) == ["b0", "f0", "f1", "f2", "s0", "s1"]
    assert order.index("f2") < order.index("s1")  # arrival order, not retriever order


async def test_merge_closing_early_cancels_retrievers_and_back_pressure_bounds_the_queue():
    produced = []
    closed = asyncio.Event()

    async def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield ev(i)
                i += 1
        finally:
            closed.set()

    merged = merge({"endless": endless()}, max_pending=4)
    first = await anext(merged)
    await asyncio.sleep(0.05)
    assert first[1].seq == 0
    assert len(produced) <= 4 + 2  # the producer waits for the consumer
    await merged.aclose()
    await asyncio.wait_for(closed.wait(), 1)


def test_assembler_sections_keep_retriever_order_and_render_the_body():
    asm = ContextAssembler(["ann", "crawl"])
    assert asm.apply("crawl", ContextEvent("r", 0, Op.APPEND, "page one", sources=("http://a/1",)))
    assert asm.apply("ann", ContextEvent("r", 0, Op.UPDATE, ["doc A", "doc B"], sources=("A", "B")))
    assert asm.body == DOC_SEPARATOR.join(["doc A", "doc B", "page one"])
    assert asm.sources == ["A", "B", "http://a/1"]
    assert not asm.apply("ann", ContextEvent("r", 1, Op.UPDATE, ["doc A", "doc B"]))
    assert not asm.complete
    asm.apply("ann", ContextEvent("r", 2, Op.UPDATE, ["doc C", "doc A"], final=True, sources=("C", "A")))
    asm.apply("crawl", ContextEvent("r", 1, Op.APPEND, "", final=True))
    assert asm.complete
    assert asm.body == DOC_SEPARATOR.join(["doc C", "doc A", "page one"])
    assert asm.documents == 3


def test_assembler_uses_the_given_layout():
    def keep_survivors(previous, new):
        return [d for d in previous if d in new] + [d for d in new if d not in previous]

    asm = ContextAssembler(["ann"], layout=keep_survivors)
    asm.apply("ann", ContextEvent("r", 0, Op.UPDATE, ["A", "B", "C"]))
    asm.apply("ann", ContextEvent("r", 1, Op.UPDATE, ["D", "C", "A"], sources=("d", "c", "a")))
    assert asm.body == DOC_SEPARATOR.join(["A", "C", "D"])
    assert asm.sources == ["a", "c", "d"]
    with pytest.raises(InvalidEvent, match="distinct"):
        ContextAssembler(["x", "x"])
