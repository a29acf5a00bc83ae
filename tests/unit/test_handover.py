"""How a session's context changes become chunks for the engine (no engine needed)."""

from __future__ import annotations

from stream2llm.core.protocol import ChunkMeta
from stream2llm.core.protocol import ChunkOp as Op
from stream2llm.engine.handover import _answer_logprobs, chunk_op


def test_the_token_diff_says_append_only_for_an_extension():
    sent = [1, 5, 6, 7]
    assert chunk_op(sent, [1, 5, 6, 7, 8, 9], final=False) is Op.APPEND  # whatever changed the text
    assert chunk_op(sent, [1, 5, 6, 70, 8], final=False) is Op.UPDATE  # a BPE merge reached back
    assert chunk_op(sent, [1, 5, 6], final=False) is Op.UPDATE  # shorter: not an extension
    assert chunk_op(sent, list(sent), final=False) is None  # nothing new is safe to prefill yet
    assert chunk_op(sent, list(sent), final=True) is Op.UPDATE  # the final chunk always goes


def test_the_answers_logprobs_are_the_last_ones_whatever_the_throw_away_tokens_had():
    """A chunk another took over ends with a placeholder token that has no logprobs; one that
    prefilled to its end sampled one that has."""

    class Lp:
        def __init__(self, v):
            self.logprob = v

    sampled, answer = {7: Lp(-0.5)}, [{1: Lp(-0.1)}, {2: Lp(-0.2)}]
    assert _answer_logprobs([sampled, *answer], 2) == [{1: -0.1}, {2: -0.2}]
    assert _answer_logprobs(answer, 2) == [{1: -0.1}, {2: -0.2}]  # the throw-away token had none
    assert _answer_logprobs(None, 2) is None


def test_a_chunks_op_reaches_the_engine_core_as_an_op():
    from vllm import SamplingParams

    from stream2llm.engine.handover import chunk_params

    final = SamplingParams(temperature=0, max_tokens=24)
    middle = chunk_params(final, ChunkMeta(Op.UPDATE, False, "fcfs"))
    assert ChunkMeta.of(middle) == ChunkMeta(Op.UPDATE, False, "fcfs")
    assert middle.max_tokens == 1  # an intermediate chunk samples one throw-away token
    last = chunk_params(final, ChunkMeta(Op.APPEND, True, None))
    assert ChunkMeta.of(last) == ChunkMeta(Op.APPEND, True, None) and last.max_tokens == 24
    assert final.extra_args is None  # the caller's parameters are not changed
