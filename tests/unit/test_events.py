from __future__ import annotations

import pytest

from stream2llm.context.events import ContextEvent, Op
from stream2llm.errors import InvalidEvent


def test_valid_events():
    e = ContextEvent("r", 0, "append", "text")
    assert e.op is Op.APPEND and e.text == "text"
    u = ContextEvent("r", 1, Op.UPDATE, ["a", "b"], final=True)
    assert u.docs == ("a", "b") and u.final


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("r", -1, "append", "x"), "non-negative"),
        (("r", 0, "replace", "x"), "unknown op 'replace'"),
        (("r", 0, "append", ""), "is empty"),
        (("r", 0, "append", ["x"]), "needs text"),
        (("r", 0, "update", "x"), "list of documents"),
        (("r", 0, "update", ["", "  "]), "no document text"),
        (("r", 0, "update", [1, 2]), "must be text"),
    ],
)
def test_invalid_events_name_the_problem(args, message):
    with pytest.raises(InvalidEvent, match=message):
        ContextEvent(*args)


def test_final_append_may_be_empty():
    assert ContextEvent("r", 3, "append", "", final=True).final


def test_payload_accessors_check_op():
    with pytest.raises(InvalidEvent):
        _ = ContextEvent("r", 0, "append", "x").docs
