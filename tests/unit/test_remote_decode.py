"""What the prefill instance sends its decode instance (engine.remote_decode), without engines:
the prompt rebuilt from a session's chunks, prefill-only chunks, the decode request's body, and
the answer's events read back."""

from __future__ import annotations

import asyncio

from vllm import SamplingParams
from vllm.engine.protocol import StreamingInput

from stream2llm.context.events import Op
from stream2llm.core.protocol import CONFIG_KEY, ChunkMeta
from stream2llm.engine.remote_decode import (
    KV_PARAMS_KEY,
    _PromptTracker,
    _token_logprobs,
    _usage_counts,
    completion_body,
    foreign_params,
    prefill_only,
)
from stream2llm.engine.sampling import chunk_params

CALLER = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[2], logprobs=2, seed=5)


def _chunks(*chunks: tuple[Op, list[int], bool]):
    async def stream():
        for op, ids, final in chunks:
            yield StreamingInput(
                {"prompt_token_ids": ids, "cache_salt": "t1"}, chunk_params(CALLER, ChunkMeta(op, final))
            )

    return stream()


async def _tap(tracker, chunks, pulls_kv=False):
    return [chunk async for chunk in tracker.tap(chunks, pulls_kv)]


def test_the_tracker_rebuilds_the_prompt_and_makes_the_final_chunk_prefill_only():
    tracker = _PromptTracker()
    sent = asyncio.run(
        _tap(
            tracker,
            _chunks(
                (Op.APPEND, [1, 2, 3], False),
                (Op.APPEND, [4], False),
                (Op.UPDATE, [1, 2, 9, 9], False),
                (Op.APPEND, [7, 8], True),
            ),
        )
    )
    assert tracker.ids == [1, 2, 9, 9, 7, 8] and tracker.cache_salt == "t1"
    assert [c.prompt["prompt_token_ids"] for c in sent] == [[1, 2, 3], [4], [1, 2, 9, 9], [7, 8]]
    final = sent[-1].sampling_params
    assert final.max_tokens == 1 and final.stop_token_ids == [] and ChunkMeta.of(final).final
    assert final.logprobs == 2  # the throw-away tokens' logprob lists stay the shape vLLM sized
    assert CALLER.max_tokens == 12  # the caller's parameters are not touched
    assert "kv_transfer_params" not in (sent[0].sampling_params.extra_args or {})


def test_a_pulling_decode_instance_gets_vllms_pd_flag_on_every_chunk_and_the_prefills_params():
    tracker = _PromptTracker()
    sent = asyncio.run(
        _tap(tracker, _chunks((Op.APPEND, [1, 2], False), (Op.APPEND, [3], True)), pulls_kv=True)
    )
    for chunk in sent:
        assert chunk.sampling_params.extra_args["kv_transfer_params"] == {"do_remote_decode": True}
    assert prefill_only(CALLER, True).extra_args["kv_transfer_params"] == {"do_remote_decode": True}
    nixl = {"do_remote_prefill": True, "remote_block_ids": [3, 4], "remote_engine_id": "e"}
    forwarded = foreign_params(
        {CONFIG_KEY: {"tokens_prefilled": 3}, KV_PARAMS_KEY: {"blocks_saved": 0}, **nixl}
    )
    assert forwarded == nixl
    body = completion_body("decode", [1, 2, 3], CALLER, "t1", forwarded)
    assert body["kv_transfer_params"] == nixl
    assert "kv_transfer_params" not in completion_body("decode", [1], CALLER, None, {})


def test_the_decode_body_carries_the_callers_sampling():
    body = completion_body("decode", [5, 6], CALLER, "salt")
    assert body["prompt"] == [5, 6] and body["model"] == "decode" and body["cache_salt"] == "salt"
    assert (body["max_tokens"], body["temperature"], body["seed"], body["logprobs"]) == (12, 0, 5, 2)
    assert body["stop_token_ids"] == [2] and body["stream"] and body["return_token_ids"]
    assert body["return_tokens_as_token_ids"] and body["stream_options"] == {"include_usage": True}


def test_the_answers_logprobs_and_usage_are_read_back():
    raw = {"top_logprobs": [{"token_id:7": -0.25, "token_id:9": -1.5}, {"token_id:3": -0.125}]}
    got = _token_logprobs(raw)
    assert [{t: lp.logprob for t, lp in d.items()} for d in got] == [{7: -0.25, 9: -1.5}, {3: -0.125}]
    assert _token_logprobs(None) == []
    usage = {"prompt_tokens": 1538, "prompt_tokens_details": {"cached_tokens": 1536}}
    assert _usage_counts(usage) == {"decode_prompt_tokens": 1538, "decode_cached_tokens": 1536,
                                    "decode_prefilled_tokens": 2}  # fmt: skip
    assert _usage_counts({"prompt_tokens": 4})["decode_prefilled_tokens"] == 4
    assert _usage_counts(None) == {}
