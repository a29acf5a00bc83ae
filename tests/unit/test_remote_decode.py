"""The decode backends as handover uses them (engine.decode, engine.remote_decode), without
engines: what each chunk samples with, what counts as throw-away, what the decode instance is sent,
and its answer read back."""

from __future__ import annotations

import asyncio

from vllm import SamplingParams

from stream2llm.core.protocol import (
    CONFIG_KEY,
    KV_PARAMS_KEY,
    ChunkMeta,
    ChunkOp,
    split_transfer_params,
    throwaway_tokens,
)
from stream2llm.engine.decode import FinalPrompt, LocalDecode
from stream2llm.engine.handover import chunk_params
from stream2llm.engine.remote_decode import (
    RemoteDecode,
    _token_logprobs,
    _usage_counts,
    completion_body,
    prefill_only,
)

CALLER = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[2], logprobs=2, seed=5)


def _sampled(backend, op: ChunkOp, final: bool):
    meta = ChunkMeta(op, final)
    return backend.chunk_sampling(chunk_params(CALLER, meta), meta)


def test_a_remote_backend_makes_the_final_chunk_prefill_only():
    remote = RemoteDecode("http://decode", "decode")
    final = _sampled(remote, ChunkOp.APPEND, True)
    assert final.max_tokens == 1 and final.stop_token_ids == [] and ChunkMeta.of(final).final
    assert final.logprobs == 2  # the throw-away tokens' logprob lists stay the shape vLLM sized
    middle = _sampled(remote, ChunkOp.UPDATE, False)
    assert middle.max_tokens == 1 and ChunkMeta.of(middle) == ChunkMeta(ChunkOp.UPDATE, False)
    assert "kv_transfer_params" not in (middle.extra_args or {})
    assert CALLER.max_tokens == 12  # the caller's parameters are not touched


def test_the_local_backend_answers_with_the_callers_parameters():
    local = LocalDecode()
    final = _sampled(local, ChunkOp.APPEND, True)
    assert local.answers_here and final.max_tokens == 12 and final.stop_token_ids == [2]
    assert _sampled(local, ChunkOp.APPEND, False).max_tokens == 1


def test_one_throw_away_token_per_chunk_but_the_one_that_answers():
    assert throwaway_tokens(1, answered_here=True) == 0  # a one-shot request
    assert throwaway_tokens(4, answered_here=True) == 3
    assert throwaway_tokens(4, answered_here=False) == 4  # the final chunk only prefilled here


def test_a_pulling_decode_instance_gets_vllms_pd_flag_on_every_chunk_and_the_prefills_params():
    remote = RemoteDecode("http://decode", "decode", pulls_kv=True)
    for op, final in ((ChunkOp.APPEND, False), (ChunkOp.UPDATE, False), (ChunkOp.APPEND, True)):
        assert _sampled(remote, op, final).extra_args["kv_transfer_params"] == {"do_remote_decode": True}
    assert prefill_only(CALLER, True).extra_args["kv_transfer_params"] == {"do_remote_decode": True}
    nixl = {"do_remote_prefill": True, "remote_block_ids": [3, 4], "remote_engine_id": "e"}
    ours, foreign = split_transfer_params(
        {CONFIG_KEY: {"tokens_prefilled": 3}, KV_PARAMS_KEY: {"blocks_saved": 0}, **nixl}
    )
    assert foreign == nixl and ours == {
        CONFIG_KEY: {"tokens_prefilled": 3},
        KV_PARAMS_KEY: {"blocks_saved": 0},
    }
    assert split_transfer_params(None) == ({}, {})
    body = completion_body("decode", [1, 2, 3], CALLER, "t1", foreign)
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
    assert _token_logprobs(raw) == [{7: -0.25, 9: -1.5}, {3: -0.125}]
    assert _token_logprobs(None) == []
    usage = {"prompt_tokens": 1538, "prompt_tokens_details": {"cached_tokens": 1536}}
    assert _usage_counts(usage) == {"decode_prompt_tokens": 1538, "decode_cached_tokens": 1536,
                                    "decode_prefilled_tokens": 2}  # fmt: skip
    assert _usage_counts({"prompt_tokens": 4})["decode_prefilled_tokens"] == 4
    assert _usage_counts(None) == {}


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_decode_instances_events_become_the_cumulative_answer():
    """RemoteDecode.decode reads the decode server's stream (here: its parsed events) into
    Generated: cumulative ids and logprobs, then the finish reason and what it computed itself."""
    events = [
        {"choices": [{"token_ids": [7], "logprobs": {"top_logprobs": [{"token_id:7": -0.5}]}}]},
        {"choices": [{"token_ids": [8], "finish_reason": "length", "logprobs": None}]},
        {"usage": {"prompt_tokens": 130, "prompt_tokens_details": {"cached_tokens": 129}}},
    ]
    remote = RemoteDecode("http://decode", "decode")

    async def fake_events(body, headers):
        assert body["prompt"] == [1, 2, 3] and headers == {"traceparent": TRACEPARENT}
        for event in events:
            yield event

    remote._events = fake_events  # the HTTP part is tested against a real server in tests/process
    prompt = FinalPrompt([1, 2, 3], trace_headers={"traceparent": TRACEPARENT})

    async def collect():
        return [g async for g in remote.decode(prompt, CALLER)]

    got = asyncio.run(collect())
    assert [g.token_ids for g in got] == [[7], [7, 8]]
    assert got[0].finish_reason is None and got[-1].finish_reason == "length"
    assert got[-1].logprobs == [{7: -0.5}]
    assert got[-1].counters == {"kv_transfer": _usage_counts(events[-1]["usage"])}
