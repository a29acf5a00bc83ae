"""How a session's context changes become chunks for the engine (no engine needed)."""

from __future__ import annotations

from stream2llm.core.protocol import ChunkMeta
from stream2llm.core.protocol import ChunkOp as Op
from stream2llm.engine.handover import Chunk, chunk_op, merge_chunks


def test_the_token_diff_says_append_only_for_an_extension():
    sent = [1, 5, 6, 7]
    assert chunk_op(sent, [1, 5, 6, 7, 8, 9], final=False) is Op.APPEND  # whatever changed the text
    assert chunk_op(sent, [1, 5, 6, 70, 8], final=False) is Op.UPDATE  # a BPE merge reached back
    assert chunk_op(sent, [1, 5, 6], final=False) is Op.UPDATE  # shorter: not an extension
    assert chunk_op(sent, list(sent), final=False) is None  # nothing new is safe to prefill yet
    assert chunk_op(sent, list(sent), final=True) is Op.UPDATE  # the final chunk always goes


def test_merged_chunks_keep_the_effect_of_both():
    append, update = Chunk(Op.APPEND, [7, 8], False), Chunk(Op.UPDATE, [1, 2, 3], False)
    assert merge_chunks(None, append) == append
    assert merge_chunks(update, Chunk(Op.APPEND, [4], True)) == Chunk(Op.UPDATE, [1, 2, 3, 4], True)
    assert merge_chunks(append, Chunk(Op.APPEND, [9], False)) == Chunk(Op.APPEND, [7, 8, 9], False)
    assert merge_chunks(append, update) == update  # an update carries the whole prompt


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
