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
    continuation,
    first_token_only,
    generate_body,
)

CALLER = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[2], logprobs=2, seed=5)


def _sampled(backend, op: ChunkOp, final: bool):
    meta = ChunkMeta(op, final)
    return backend.chunk_sampling(chunk_params(CALLER, meta), meta)


def test_a_remote_backend_samples_the_first_token_here_with_the_callers_parameters():
    remote = RemoteDecode("http://decode", "decode")
    final = _sampled(remote, ChunkOp.APPEND, True)
    assert final.max_tokens == 1 and ChunkMeta.of(final).final
    assert (final.stop_token_ids, final.seed, final.logprobs) == ([2], 5, 2)  # the caller's, for one token
    middle = _sampled(remote, ChunkOp.UPDATE, False)
    assert middle.max_tokens == 1 and ChunkMeta.of(middle) == ChunkMeta(ChunkOp.UPDATE, False)
    assert "kv_transfer_params" not in (middle.extra_args or {})
    assert CALLER.max_tokens == 12  # the caller's parameters are not touched
    wants_more = CALLER.clone()
    wants_more.min_tokens = 3
    assert first_token_only(wants_more).min_tokens == 1  # vLLM needs min_tokens <= max_tokens
    rest = continuation(wants_more)
    assert (rest.max_tokens, rest.min_tokens, rest.seed) == (11, 2, 5)


def test_only_a_stop_or_a_one_token_answer_ends_on_the_prefill_instance():
    remote, one = RemoteDecode("http://decode", "decode"), CALLER.clone()
    one.max_tokens = 1
    assert not remote.ends_here("length", CALLER)  # the one-token cap: the decode instance goes on
    assert remote.ends_here("stop", CALLER) and remote.ends_here("length", one)
    assert LocalDecode().ends_here("length", CALLER)


def test_the_local_backend_answers_with_the_callers_parameters():
    local = LocalDecode()
    final = _sampled(local, ChunkOp.APPEND, True)
    assert final.max_tokens == 12 and final.stop_token_ids == [2]
    assert _sampled(local, ChunkOp.APPEND, False).max_tokens == 1


def test_one_throw_away_token_per_chunk_but_the_one_that_answers():
    assert throwaway_tokens(1) == 0  # a one-shot request
    assert throwaway_tokens(4) == 3


def test_a_pulling_decode_instance_gets_vllms_pd_flag_on_every_chunk_and_the_prefills_params():
    remote = RemoteDecode("http://decode", "decode", pulls_kv=True)
    for op, final in ((ChunkOp.APPEND, False), (ChunkOp.UPDATE, False), (ChunkOp.APPEND, True)):
        assert _sampled(remote, op, final).extra_args["kv_transfer_params"] == {"do_remote_decode": True}
    assert first_token_only(CALLER, True).extra_args["kv_transfer_params"] == {"do_remote_decode": True}
    nixl = {"do_remote_prefill": True, "remote_block_ids": [3, 4], "remote_engine_id": "e"}
    ours, foreign = split_transfer_params(
        {CONFIG_KEY: {"tokens_prefilled": 3}, KV_PARAMS_KEY: {"blocks_saved": 0}, **nixl}
    )
    assert foreign == nixl and ours == {
        CONFIG_KEY: {"tokens_prefilled": 3},
        KV_PARAMS_KEY: {"blocks_saved": 0},
    }
    assert split_transfer_params(None) == ({}, {})
    body = generate_body("decode", [1, 2, 3], CALLER, "t1", foreign)
    assert body["kv_transfer_params"] == nixl
    assert "kv_transfer_params" not in generate_body("decode", [1], CALLER, None, {})


def test_the_decode_body_carries_the_callers_sampling():
    body = generate_body("decode", [5, 6], CALLER, "salt")
    assert body["token_ids"] == [5, 6] and body["model"] == "decode" and body["cache_salt"] == "salt"
    params = body["sampling_params"]
    assert (params["max_tokens"], params["temperature"], params["seed"], params["logprobs"]) == (12, 0, 5, 2)
    assert params["stop_token_ids"] == [2] and not params["detokenize"]  # token ids out, no text
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    from vllm import SamplingParams as VllmSampling

    assert VllmSampling(**params).max_tokens == 12  # every field is one of vLLM's own


def _lp(token: int, logprob: float) -> dict:
    return {"token_id": token, "logprob": logprob}


def test_the_answers_logprobs_and_usage_are_read_back():
    raw = {
        "content": [
            {"token_id": 7, "logprob": -0.25, "top_logprobs": [_lp(7, -0.25), _lp(9, -1.5)]},
            {"token_id": 3, "logprob": -0.125, "top_logprobs": [_lp(3, -0.125)]},
        ]
    }
    assert _token_logprobs(raw) == [{7: -0.25, 9: -1.5}, {3: -0.125}]
    assert _token_logprobs(None) == []
    usage = {"prompt_tokens": 1538, "prompt_tokens_details": {"cached_tokens": 1536}}
    assert _usage_counts(usage) == {"decode_prompt_tokens": 1538, "decode_cached_tokens": 1536,
                                    "decode_prefilled_tokens": 2}  # fmt: skip
    assert _usage_counts({"prompt_tokens": 4})["decode_prefilled_tokens"] == 4
    assert _usage_counts(None) == {}


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _decoding(events: list[dict], sampling, first_token: int = 7) -> tuple[list, list[dict]]:
    """RemoteDecode.decode over a decode server's parsed events (the HTTP part is tested against a
    real server in tests/process): what it yields, and the bodies it sent."""
    remote, bodies = RemoteDecode("http://decode", "decode"), []

    async def fake_events(body, headers):
        assert headers == {"traceparent": TRACEPARENT}
        bodies.append(body)
        for event in events:
            yield event

    remote._events = fake_events
    prompt = FinalPrompt([1, 2, 3], trace_headers={"traceparent": TRACEPARENT})

    async def collect():
        return [g async for g in remote.decode(prompt, sampling, first_token)]

    return asyncio.run(collect()), bodies


EVENTS = [
    {
        "choices": [
            {"token_ids": [7], "logprobs": {"content": [{**_lp(7, -0.5), "top_logprobs": [_lp(7, -0.5)]}]}}
        ]
    },
    {
        "choices": [
            {"token_ids": [8], "logprobs": {"content": [{**_lp(8, -0.25), "top_logprobs": [_lp(8, -0.25)]}]}}
        ]
    },
    {"choices": [{"token_ids": [9], "finish_reason": "length", "logprobs": None}]},
    {"usage": {"prompt_tokens": 130, "prompt_tokens_details": {"cached_tokens": 129}}},
]


SEEDED = SamplingParams(temperature=1.0, max_tokens=12, stop_token_ids=[2], logprobs=2, seed=5)


def test_seeded_sampling_is_replayed_and_the_repeated_first_token_dropped():
    """The decode instance gets the prompt prefilled here and the caller's parameters, samples the
    first token again (its seeded generator then advances as on one instance) and goes on."""
    got, (body,) = _decoding(EVENTS, SEEDED)
    params = body["sampling_params"]
    assert (
        body["token_ids"] == [1, 2, 3] and params["max_tokens"] == SEEDED.max_tokens and params["seed"] == 5
    )
    assert [g.token_ids for g in got] == [[8], [8, 9]]
    assert got[0].finish_reason is None and got[-1].finish_reason == "length"
    assert got[-1].logprobs == [{8: -0.25}]
    assert got[-1].counters == {"kv_transfer": _usage_counts(EVENTS[-1]["usage"])}


def test_random_and_greedy_sampling_continue_after_the_first_token():
    """No replay where nothing needs a generator to advance as on one instance: the decode
    instance computes our first token's KV and samples the second (one step fewer)."""
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, logprobs=2)
    for sampling in (unseeded, CALLER):  # CALLER: temperature 0 (its seed changes nothing)
        got, (body,) = _decoding(EVENTS[1:], sampling)
        assert body["token_ids"] == [1, 2, 3, 7] and body["sampling_params"]["max_tokens"] == 11
        assert [g.token_ids for g in got] == [[8], [8, 9]]


def test_a_replayed_first_token_that_differs_falls_back_to_continuing_after_ours():
    got, bodies = _decoding(EVENTS, SEEDED, first_token=6)
    assert [b["token_ids"] for b in bodies] == [[1, 2, 3], [1, 2, 3, 6]]
    assert bodies[1]["sampling_params"]["max_tokens"] == SEEDED.max_tokens - 1
    assert got[-1].token_ids == [7, 8, 9]  # the continuation's own tokens, after ours


def test_a_decode_instance_that_never_answers_fails_the_session_with_a_clear_error():
    """A real HTTP server on loopback that takes the request and never answers."""
    import pytest
    from aiohttp import web

    from stream2llm.errors import StreamError

    async def run() -> None:
        released = asyncio.Event()

        async def silent(request: web.Request) -> web.Response:
            await released.wait()
            return web.Response()

        app = web.Application()
        app.router.add_post("/inference/v1/generate", silent)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        remote = RemoteDecode(f"http://127.0.0.1:{runner.addresses[0][1]}", "decode", silence_s=0.5)
        try:
            with pytest.raises(StreamError, match=r"sent nothing for 0.5 s"):
                async for _ in remote.decode(FinalPrompt([1, 2, 3]), CALLER, 7):
                    pass
        finally:
            released.set()
            await remote.close()
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(run(), 20))
