"""Contract tests for every vLLM internal that stream2llm relies on (core/vllm_compat/).

They run vLLM's real scheduler and KV block manager on a synthetic setup (no model), so a vLLM
upgrade that moves or changes one of these internals fails here, by name, not as corrupt KV.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import random
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import vllm
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from stream2llm.core import vllm_compat
from stream2llm.core.protocol import CONFIG_KEY, token_digest
from stream2llm.core.scheduler import StreamScheduler
from stream2llm.core.stats_board import StatsBoard
from tests.unit.synthetic import (
    blocks_of,
    make_request,
    make_scheduler,
    run_until_idle,
    step,
    step_with_outputs,
)

BS = 16


@pytest.fixture
def scheduler(tiny_model):
    return make_scheduler(str(tiny_model.path), block_size=BS)


def park(scheduler, rid: str, ids: list[int]):
    request = make_request(scheduler, rid, ids)
    scheduler.add_request(request)
    run_until_idle(scheduler)
    assert request.status.name == "WAITING_FOR_STREAMING_REQ"
    return request


def test_pinned_vllm_version():
    assert vllm.__version__.startswith(vllm_compat.VLLM_API)


def test_external_request_id_undoes_the_input_processors_suffix():
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.input_processor import InputProcessor

    fields = inspect.signature(EngineCoreRequest).parameters
    request = EngineCoreRequest(**{name: None for name in fields if fields[name].default is inspect._empty})
    request.request_id = "crawler-00007@0126d639#2"
    InputProcessor.assign_request_id(request)
    assert request.request_id != "crawler-00007@0126d639#2"
    assert vllm_compat.external_request_id(request.request_id) == "crawler-00007@0126d639#2"


def test_private_hooks_exist_with_expected_signatures():
    for name, params in {
        "_update_request_as_session": ["self", "session", "update"],
        "_free_request": ["self", "request", "delay_free_blocks"],
    }.items():
        assert name in vars(Scheduler), f"vLLM Scheduler lost {name}"
        assert list(inspect.signature(getattr(Scheduler, name)).parameters) == params


def test_scheduler_internals_present(scheduler):
    (manager,) = scheduler.kv_cache_manager.coordinator.single_type_managers
    assert type(manager) is FullAttentionManager
    for attr in ("req_to_blocks", "num_cached_block", "block_size", "_apply_cow"):
        assert hasattr(manager, attr), attr
    pool = scheduler.kv_cache_manager.block_pool
    for attr in ("defer_block_free", "deferred_frees", "sched_step_seq", "num_waiting_for_streaming_input"):
        assert hasattr(scheduler, attr), attr
    for attr in ("is_block_writable", "_maybe_evict_cached_block", "get_new_blocks", "free_blocks"):
        assert callable(getattr(pool, attr)), attr
    request = make_request(scheduler, "r", list(range(40)))
    assert request._all_token_ids == list(range(40))


def test_update_cut_inside_hashed_block_drops_hash_and_frees_tail(scheduler):
    old = list(range(100, 200))  # 100 tokens: 6 full hashed blocks + a partial one
    request = park(scheduler, "a", old)
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    cut_block = blocks_of(scheduler, "a")[50 // BS]
    assert cut_block.block_hash is not None  # full and cached: must not be written as it is

    new = old[:50] + [1] * 30
    scheduler.add_request(make_request(scheduler, "a", new, op="update"))

    assert request.num_computed_tokens == 50 and request.num_prompt_tokens == 80
    assert request._all_token_ids == new
    assert len(blocks_of(scheduler, "a")) == 4  # cdiv(50, 16)
    assert pool.get_num_free_blocks() == free_before + 3
    assert cut_block.block_hash is None and pool.is_block_writable(cut_block)
    record = scheduler.accounting.counters("a").updates[-1]
    assert (record.lcp, record.kept, record.recomputed, record.tail) == (50, 50, 30, "unhashed")

    outputs = run_until_idle(scheduler)
    assert outputs[0].num_scheduled_tokens == {"a": 30}  # only past the LCP
    fresh = make_request(scheduler, "fresh", new)
    assert request.block_hashes == fresh.block_hashes  # hashes recomputed from the cut


def test_update_cut_inside_shared_block_copies_on_write(scheduler):
    old = list(range(300, 400))
    park(scheduler, "a", old)
    other = make_request(scheduler, "b", old[:64] + [9] * 10, max_tokens=5)
    scheduler.add_request(other)
    step(scheduler)  # b hits a's cached blocks 0..3 and holds them while it decodes
    shared = blocks_of(scheduler, "a")[40 // BS]
    assert shared.ref_cnt == 2

    scheduler.add_request(make_request(scheduler, "a", old[:40] + [2] * 8, op="update"))
    assert scheduler.accounting.counters("a").updates[-1].tail == "copied"
    copy = blocks_of(scheduler, "a")[40 // BS]
    assert copy is not shared and shared.block_hash is not None  # the shared block stays intact
    out = step(scheduler)
    assert (shared.block_id, copy.block_id) in [
        (c.src_block_id, c.dst_block_id) for c in out.kv_cache_block_copies
    ]


def test_update_on_block_boundary_is_aligned(scheduler):
    old = list(range(500, 600))
    request = park(scheduler, "a", old)
    scheduler.add_request(make_request(scheduler, "a", old[:48] + [3] * 5, op="update"))
    assert scheduler.accounting.counters("a").updates[-1].tail == "aligned"
    assert request.num_computed_tokens == 48 and len(blocks_of(scheduler, "a")) == 3


def test_new_context_that_is_a_prefix_keeps_all_but_one_token(scheduler):
    old = list(range(700, 800))
    request = park(scheduler, "a", old)
    scheduler.add_request(make_request(scheduler, "a", old[:60], op="update"))
    record = scheduler.accounting.counters("a").updates[-1]
    assert (record.lcp, record.kept, record.recomputed) == (60, 59, 1)
    assert request.num_computed_tokens == 59


def test_an_update_that_keeps_nothing_may_then_hit_the_prefix_cache(scheduler):
    """An update sharing no token with what a session holds cuts it to nothing; its new prompt may
    start with blocks another request cached. vLLM looks such a request up in the prefix cache and
    asserts (``get_num_blocks_to_allocate``) that a request it still tracks has no hits, so the cut
    must untrack it as vLLM's own free does."""
    park(scheduler, "a", list(range(1, 41)))
    cached = list(range(500, 548))  # three full blocks, left in the prefix cache when "b" ends
    scheduler.add_request(make_request(scheduler, "b", cached, resumable=False))
    run_until_idle(scheduler)
    scheduler.add_request(make_request(scheduler, "a", [*cached, 7, 8, 9], op="update"))
    out = step(scheduler)  # raised AssertionError in vLLM before the cut untracked the request
    assert scheduler.accounting.counters("a").updates[-1].kept == 0
    assert out.num_scheduled_tokens["a"] == 3  # the three cached blocks were hits: 51 - 48 tokens


def test_abort_frees_everything_and_board_shows_it(tiny_model, tmp_path):
    path = str(tmp_path / "board")
    board = StatsBoard(path, create=True)
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS, stats_path=path)
    park(scheduler, "a", list(range(100)))
    park(scheduler, "b", list(range(1000, 1070)))
    stats = board.read()
    assert stats.parked == 2 and stats.kv_usage > 0 and stats.requests == 2
    assert stats.tokens_prefilled == 170
    scheduler.finish_requests(["a", "b"], vllm_compat.RequestStatus.FINISHED_ABORTED)
    stats = board.read()
    assert (stats.parked, stats.requests, stats.kv_usage) == (0, 0, 0.0)


def test_last_chunk_finishes_the_session_and_drops_the_late_end_marker(scheduler):
    request = park(scheduler, "a", list(range(50)))
    scheduler.add_request(make_request(scheduler, "a", [5, 6, 7], max_tokens=2, final=True))
    outputs = run_until_idle(scheduler)
    assert request.is_finished() and "a" not in scheduler.requests
    assert scheduler.kv_cache_manager.usage == 0.0
    # vLLM's end-of-input marker (a non-resumable [0] request) arrives after the session ended
    marker = list(vllm_compat.END_OF_INPUT_PROMPT)
    scheduler.add_request(make_request(scheduler, "a", marker, resumable=False))
    assert "a" not in scheduler.requests and not scheduler.waiting
    assert outputs  # the session's last step produced output (which carries its counters)
    # AsyncLLM sends that marker (read from its source: importing it takes seconds)
    source = Path(importlib.util.find_spec("vllm.v1.engine.async_llm").origin).read_text()
    assert f"prompt=TokensPrompt(prompt_token_ids={marker})," in source


def _prefilling(tiny_model, queued_op: str):
    """A 300-token chunk one 64-token step in, with a chunk queued behind it."""
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS, max_num_batched_tokens=64)
    ids = list(range(1000, 1300))
    request = make_request(scheduler, "r", ids)
    scheduler.add_request(request)
    step(scheduler)
    assert request.status.name == "RUNNING" and request.num_computed_tokens == 64
    queued = ids[:50] + [5, 6] if queued_op == "update" else [5, 6]
    scheduler.updates._superseded.clear()  # the test drives the take-over itself
    scheduler.add_request(make_request(scheduler, "r", queued, op=queued_op))
    scheduler.updates._superseded.clear()
    assert [vllm_compat.chunk_ids(u) for u in vllm_compat.queued_chunks(request)] == [queued]
    assert vllm_compat.next_queued_chunk(request) is not None
    return scheduler, request, ids


def test_an_update_takes_over_a_prefilling_chunk_through_vllms_session_update(tiny_model):
    scheduler, request, ids = _prefilling(tiny_model, "update")
    assert vllm_compat.take_over_ready(request)
    client, ended = vllm_compat.take_over_chunk(scheduler, request, keep_rest=False)
    # the superseded chunk ends as a sampled chunk would: one token, finish_reason length
    assert client == request.client_index and ended.request_id == "r"
    assert ended.new_token_ids == [ids[-1]] and ended.finish_reason.name == "LENGTH"
    assert request.status.name == "WAITING" and request not in scheduler.running  # its KV stays
    assert not vllm_compat.queued_chunks(request)
    assert request.prompt_token_ids == ids[:50] + [5, 6] == request._all_token_ids
    assert request.num_computed_tokens == 50 and len(blocks_of(scheduler, "r")) == 4  # cut by our hook
    assert request.num_prompt_tokens == 52 and len(request.block_hashes) == 52 // BS
    out = step(scheduler)
    assert out.num_scheduled_tokens == {"r": 2}  # straight to the update's tail: no one-token step
    assert vllm_compat.sent_prompts(out) == {"r": ids[:50] + [5, 6]}  # the worker takes it anew


def test_an_append_extends_a_prefilling_chunk_in_place(tiny_model):
    scheduler, request, ids = _prefilling(tiny_model, "append")
    assert vllm_compat.take_over_ready(request)
    _, ended = vllm_compat.take_over_chunk(scheduler, request, keep_rest=True)
    assert ended.new_token_ids == [ids[-1]] and ended.finish_reason.name == "LENGTH"
    assert request.prompt_token_ids == ids + [5, 6] == request._all_token_ids
    assert request.num_computed_tokens == 64 and len(blocks_of(scheduler, "r")) == 4
    assert request.num_prompt_tokens == 302 and len(request.block_hashes) == 302 // BS
    out = step(scheduler)
    assert out.num_scheduled_tokens == {"r": 64} and request.num_computed_tokens == 128


def test_a_chunk_that_sampled_or_is_parked_is_not_taken_over(tiny_model):
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS, max_num_batched_tokens=64)
    request = park(scheduler, "p", list(range(40)))
    assert not vllm_compat.take_over_ready(request)  # parked: vLLM applies chunks itself
    scheduler.add_request(make_request(scheduler, "p", [1, 2], final=True, max_tokens=5))
    step(scheduler)
    assert request.num_output_tokens == 1 and request.status.name == "RUNNING"  # decoding its answer
    request.streaming_queue.append(make_streaming_update([3, 4]))
    assert not vllm_compat.take_over_ready(request)  # it sampled: vLLM moves on by itself
    request.streaming_queue.clear()
    request.streaming_queue.append(None)  # vLLM's end-of-input marker
    assert vllm_compat.next_queued_chunk(request) is None


def make_streaming_update(ids):
    from vllm.v1.request import StreamingUpdate

    return StreamingUpdate(
        mm_features=None, prompt_token_ids=ids, max_tokens=1, arrival_time=0.0, sampling_params=None
    )


def test_ended_chunks_come_first_in_a_steps_outputs():
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

    step_outputs = {0: EngineCoreOutputs(outputs=[EngineCoreOutput("b", [9])])}
    vllm_compat.add_ended_chunks(
        step_outputs, [(0, EngineCoreOutput("a", [1])), (1, EngineCoreOutput("c", [2]))]
    )
    assert [o.request_id for o in step_outputs[0].outputs] == ["a", "b"]
    assert [o.request_id for o in step_outputs[1].outputs] == ["c"]


def test_waiting_queues_drain_kv_holders_first_and_sort_queues_merges_them(scheduler):
    """vLLM serves its KV-holding waiting queue before the other; ``sort_queues`` puts both in one
    rank order, and vLLM schedules and finishes a request without KV from the first queue."""
    park(scheduler, "held", list(range(100, 150)))
    scheduler.add_request(make_request(scheduler, "held", list(range(500, 520))))  # its next chunk
    new = make_request(scheduler, "new", list(range(900, 930)), max_tokens=1, final=True, resumable=False)
    scheduler.add_request(new)
    assert [r.request_id for r in scheduler.kv_holding_waiting] == ["held"]
    assert [r.request_id for r in scheduler.waiting] == ["new"]
    vllm_compat.sort_queues(scheduler, key=lambda r: 0 if r.request_id == "new" else 1)
    assert [r.request_id for r in scheduler.kv_holding_waiting] == ["new", "held"]
    assert not scheduler.waiting
    run_until_idle(scheduler)
    assert new.is_finished() and "new" not in scheduler.requests
    assert [r.request_id for r in scheduler.kv_holding_waiting] == ["held"]  # parked again
    assert vllm_compat.is_parked(scheduler.requests["held"])


def test_public_override_points_and_request_fields_exist():
    """StreamScheduler overrides these Scheduler methods and calls them through super(); a
    request's id and sampling parameters, and a chunk's, are read directly."""
    for name, params in {
        "add_request": ["self", "request"],
        "schedule": ["self", "throttle_prefills"],
        "update_from_output": ["self", "scheduler_output", "model_runner_output"],
        "finish_requests": ["self", "request_ids", "finished_status"],
        "reset_prefix_cache": ["self", "reset_running_requests", "reset_connector"],
    }.items():
        assert list(inspect.signature(getattr(Scheduler, name)).parameters) == params, name
    source = inspect.getsource(Scheduler)
    for ours in ("streams", "accounting", "broker", "updates", "gate", "_kv_audit"):  # StreamScheduler's own
        assert f"self.{ours} " not in source and f"self.{ours}:" not in source, f"vLLM now uses {ours}"
    fields = {f.name for f in dataclasses.fields(vllm_compat.StreamingUpdate)}
    assert {"prompt_token_ids", "sampling_params"} <= fields
    assert "request_id" in inspect.signature(vllm_compat.Request).parameters


def test_cached_block_keys_are_the_requests_block_hashes_and_a_reset_is_published_at_once(
    tiny_model, tmp_path
):
    """The prefix cache's keys read as KV events carry them; vLLM publishes a step's events in
    update_from_output, so a reset on an idle engine is published by ``publish_kv_events``."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import AllBlocksCleared, KVEventBatch
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    endpoint = f"ipc://{tmp_path / 'kv.sock'}"
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.setsockopt(zmq.RCVTIMEO, 5000)
    subscriber.connect(endpoint)
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS, kv_events={"endpoint": endpoint})
    time.sleep(0.5)  # the subscriber's connection completes once the publisher has bound
    try:
        request = make_request(scheduler, "r", list(range(100, 100 + 5 * BS + 3)), max_tokens=1, final=True)
        scheduler.add_request(request)
        run_until_idle(scheduler)
        expected = {(0, maybe_convert_block_hash(h)) for h in request.block_hashes[:5]}
        assert set(vllm_compat.cached_block_keys(scheduler)) == expected
        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        while True:  # the stores, published with the steps
            batch = decoder.decode(subscriber.recv_multipart()[2])
            if any(type(e).__name__ == "BlockStored" for e in batch.events):
                break
        assert scheduler.reset_prefix_cache()
        assert vllm_compat.cached_block_keys(scheduler) == []
        batch = decoder.decode(subscriber.recv_multipart()[2])  # no step ran: published by the reset
        assert [type(e) for e in batch.events] == [AllBlocksCleared]
    finally:
        scheduler.shutdown()
        subscriber.close(linger=0)


def test_additional_config_carries_the_engines_options(tiny_model):
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS, policy="fcfs", parked_kv_cap=0.5)
    assert vllm_compat.additional_config(scheduler)[CONFIG_KEY] == {"policy": "fcfs", "parked_kv_cap": 0.5}
    assert scheduler.broker.policy_name == "fcfs" and scheduler.broker.parked_kv_cap == 0.5


def test_scheduler_size_readers(tiny_model):
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS, max_num_batched_tokens=64)
    assert isinstance(scheduler, StreamScheduler)
    assert vllm_compat.token_budget(scheduler) == 64
    assert vllm_compat.block_size(scheduler) == BS


def prefilling_and_parked(tiny_model):
    """ "a" parked with 50 tokens; "b" (a plain request of 100) one 64-token step into its prefill."""
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS, max_num_batched_tokens=64)
    a = park(scheduler, "a", list(range(100, 150)))
    b = make_request(scheduler, "b", list(range(900, 1000)), max_tokens=3, resumable=False)
    scheduler.add_request(b)
    return scheduler, a, b, step(scheduler)


def test_request_lookup_and_counts(tiny_model):
    scheduler, _, b, _ = prefilling_and_parked(tiny_model)
    assert vllm_compat.find_request(scheduler, "b") is b and vllm_compat.find_request(scheduler, "x") is None
    assert vllm_compat.num_requests(scheduler) == 2
    assert {r.request_id for r in vllm_compat.live_requests(scheduler)} == {"a", "b"}
    assert vllm_compat.running_ids(scheduler) == {"b"}
    running = vllm_compat.running_requests(scheduler)
    assert running == [b] and running is not scheduler.running  # a copy: safe to change the list
    assert vllm_compat.request_counts(scheduler) == (1, 1)  # the parked session counts as waiting
    assert vllm_compat.parked_count(scheduler) == 1
    run_until_idle(scheduler)
    assert vllm_compat.find_request(scheduler, "b") is None and b.is_finished()
    assert [r.request_id for r in vllm_compat.live_requests(scheduler)] == ["a"]
    assert vllm_compat.request_counts(scheduler) == (0, 1)


def test_kv_usage_is_the_fraction_of_blocks_in_use(tiny_model):
    scheduler, *_ = prefilling_and_parked(tiny_model)
    used = len(blocks_of(scheduler, "a")) + len(blocks_of(scheduler, "b"))
    assert used == 4 + 4
    assert vllm_compat.kv_usage(scheduler) == pytest.approx(used / vllm_compat.total_block_count(scheduler))
    assert vllm_compat.free_block_count(scheduler) == vllm_compat.total_block_count(scheduler) - used


def test_request_token_readers(tiny_model):
    scheduler, a, b, out = prefilling_and_parked(tiny_model)
    assert vllm_compat.scheduled_tokens(out) == {"b": 64}
    assert vllm_compat.computed_tokens(b) == 64  # schedule() already counts the step it scheduled
    assert vllm_compat.prompt_length(b) == 100 and vllm_compat.tokens_to_compute(b) == 36
    # a parked session holds its chunk's throw-away sample, whose KV is never computed
    assert vllm_compat.tokens_to_compute(a) == 1 and vllm_compat.prompt_length(a) == 50
    assert vllm_compat.is_stream_chunk(a) and not vllm_compat.is_stream_chunk(b)
    ids = vllm_compat.prompt_ids(a)
    assert ids == list(range(100, 150))
    ids.append(1)
    assert vllm_compat.prompt_length(a) == 50 and len(a.prompt_token_ids) == 50  # a copy
    run_until_idle(scheduler)
    assert vllm_compat.computed_tokens(b) == 102 and vllm_compat.tokens_to_compute(b) == 1  # last sample


def test_evicting_a_parked_session_frees_its_kv_and_marks_it_evicted(scheduler):
    request = park(scheduler, "a", list(range(100, 150)))
    assert vllm_compat.is_parked(request) and not vllm_compat.was_evicted(request)
    assert vllm_compat.blocks_held(scheduler, "a") == len(blocks_of(scheduler, "a")) == 4
    free = vllm_compat.free_block_count(scheduler)
    assert vllm_compat.evict_waiting_kv(scheduler, request) == 4
    assert (
        vllm_compat.blocks_held(scheduler, "a") == 0 and vllm_compat.free_block_count(scheduler) == free + 4
    )
    assert vllm_compat.was_evicted(request) and vllm_compat.computed_tokens(request) == 0
    assert vllm_compat.is_parked(request)  # still waiting for its next chunk


def test_deferring_a_running_prefill_keeps_its_kv(tiny_model):
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS, max_num_batched_tokens=64)
    request = make_request(scheduler, "r", list(range(1000, 1200)))
    scheduler.add_request(request)
    step(scheduler)
    assert vllm_compat.is_prefilling(request)
    vllm_compat.defer_running_prefill(scheduler, request)
    assert not vllm_compat.is_prefilling(request) and request.status.name == "WAITING"
    assert vllm_compat.running_ids(scheduler) == set() and len(blocks_of(scheduler, "r")) == 4
    out = step(scheduler)
    assert vllm_compat.scheduled_tokens(out) == {"r": 64}  # resumed where it stopped
    assert vllm_compat.computed_tokens(request) == 128


def test_computed_token_ids_and_with_prompt(scheduler):
    request = park(scheduler, "a", list(range(100, 130)))
    assert request.num_tokens == 31  # the chunk's throw-away sample is held, its KV never computed
    assert vllm_compat.computed_token_ids(request) == list(range(100, 130))
    update = vllm_compat.StreamingUpdate.from_request(make_request(scheduler, "a", [1, 2, 3]))
    rewritten = vllm_compat.with_prompt(update, [9, 9])
    assert rewritten.prompt_token_ids == [9, 9] and vllm_compat.chunk_ids(update) == [1, 2, 3]
    assert rewritten.sampling_params is update.sampling_params


def _finish(scheduler, max_steps: int = 20) -> dict:
    """Step until requests finish; their counters (what goes back to the front end) by id."""
    finished: dict = {}
    for _ in range(max_steps):
        finished.update(step_with_outputs(scheduler)[1])
    return {rid: (params or {}).get(CONFIG_KEY) for rid, params in finished.items()}


def test_sent_prompts_is_what_the_runner_gets_and_the_digest_follows_the_cut(scheduler):
    old = list(range(300, 400))
    request = make_request(scheduler, "a", old)
    scheduler.add_request(request)
    out = step(scheduler)
    assert vllm_compat.sent_prompts(out) == {"a": old}
    assert vllm_compat.token_ids_at(request, 98, 101) == [398, 399, 7]  # prompt, then the sample
    run_until_idle(scheduler)
    new = old[:40] + [2] * 8
    scheduler.add_request(make_request(scheduler, "a", new, op="update", final=True))
    out, finished = step_with_outputs(scheduler)  # the resumed session is re-sent as new
    assert vllm_compat.sent_prompts(out) == {"a": new}
    assert out.scheduled_new_reqs[0].num_computed_tokens == 40
    counters = finished["a"][CONFIG_KEY]
    assert counters["computed_prompt_len"] == 48
    assert counters["computed_prompt_digest"] == token_digest(new)
    assert counters["computed_prompt_digest"] != token_digest(old[:41] + [2] * 7)


def test_cut_with_no_free_block_for_the_copy_falls_back_to_the_block_boundary(tiny_model):
    """Copy-on-write of a shared tail block needs a free block; with none, the cut keeps whole
    blocks only and recomputes the rest, and what was computed is still exactly the new prompt."""
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS, num_blocks=32)
    old = list(range(300, 400))
    park(scheduler, "a", old)
    scheduler.add_request(make_request(scheduler, "b", old[:64] + [9] * 10, max_tokens=1000))
    step(scheduler)  # b decodes on, holding a's blocks 0..3
    n = 0
    while vllm_compat.free_block_count(scheduler) > 0:
        scheduler.add_request(make_request(scheduler, f"fill{n}", [1000 + 20 * n + i for i in range(15)]))
        step(scheduler)
        n += 1
    assert blocks_of(scheduler, "a")[40 // BS].ref_cnt == 2 and vllm_compat.free_block_count(scheduler) == 0
    new = old[:40] + [2] * 8
    scheduler.add_request(make_request(scheduler, "a", new, op="update", final=True))
    record = scheduler.accounting.counters("a").updates[-1]
    assert (record.lcp, record.kept, record.tail) == (40, 32, "aligned")
    assert record.recomputed == 16
    counters = _finish(scheduler)["a"]
    assert counters["tokens_recomputed"] == 16
    assert counters["computed_prompt_len"] == 48
    assert counters["computed_prompt_digest"] == token_digest(new)


def test_preempted_ids_are_the_requests_vllms_allocator_preempted(tiny_model):
    """Two decoding requests outgrow 9 usable blocks: vLLM preempts the later one (recompute) and
    says so in the step's output, which is where the step log reads it."""
    scheduler = make_scheduler(str(tiny_model.path), num_blocks=10, block_size=16)
    for rid, base in (("x", 100), ("y", 300)):
        request = make_request(scheduler, rid, list(range(base, base + 64)), max_tokens=40, final=True)
        request.resumable = False
        scheduler.add_request(request)
    seen: list[str] = []
    for _ in range(40):
        out = step(scheduler)
        assert vllm_compat.preempted_ids(out) == sorted(out.preempted_req_ids or ())
        seen += vllm_compat.preempted_ids(out)
        if seen:
            break
    assert seen == ["y"] and scheduler.requests["y"].num_computed_tokens == 0


def test_admits_whole_prompts_reads_vllms_admission_gate(tiny_model):
    """On by default (vLLM admits a waiting request only if its whole prompt fits); the broker
    sizes what it frees by it."""
    scheduler = make_scheduler(str(tiny_model.path), block_size=BS)
    assert vllm_compat.admits_whole_prompts(scheduler) is True
    scheduler.scheduler_reserve_full_isl = False
    assert vllm_compat.admits_whole_prompts(scheduler) is False


def test_request_facts_and_step_request_ids_read_what_the_single_readers_read(tiny_model):
    """The broker's one-call reader of a request agrees with the readers it stands for."""
    scheduler, a, b, out = prefilling_and_parked(tiny_model)
    tables = vllm_compat.block_tables(scheduler)  # vLLM's own maps: read once, they stay current
    requests = vllm_compat.request_table(scheduler)
    assert requests == {"a": a, "b": b} and sum(len(t.get("a", ())) for t in tables) == 4
    for request in (a, b):
        assert vllm_compat.request_facts(request, tables) == (
            vllm_compat.is_parked(request),
            vllm_compat.computed_tokens(request),
            vllm_compat.tokens_to_compute(request),
            vllm_compat.blocks_held(scheduler, request.request_id),
            bool(vllm_compat.queued_chunks(request)),
        )
    assert vllm_compat.request_facts(a, tables)[:4] == (True, 50, 1, 4)
    scheduler.add_request(make_request(scheduler, "a", [3, 4]))  # taken at once: no longer parked
    scheduler.add_request(make_request(scheduler, "a", [5, 6]))  # queued behind it
    assert vllm_compat.request_facts(a, tables) == (False, 50, vllm_compat.tokens_to_compute(a), 4, True)
    assert vllm_compat.step_request_ids(out) == ["b"]
    run_until_idle(scheduler)
    assert b.is_finished() and vllm_compat.request_facts(b, tables) is None
    assert "b" not in requests and vllm_compat.request_table(scheduler) is requests


def _queues_of(scheduler) -> list[list[str]]:
    return [
        [r.request_id for r in q]
        for q in (scheduler.running, scheduler.kv_holding_waiting, scheduler.waiting)
    ]


def test_rank_queues_orders_as_sort_queues_does(scheduler):
    """``rank_queues`` reads only the front of vLLM's KV-holding queue; whatever the queues
    hold (a session that took its next chunk behind parked ones, new requests in the other
    queue), the order it leaves is ``sort_queues``'s."""
    for i in range(6):
        park(scheduler, f"p{i}", list(range(100 * i + 1, 100 * i + 40)))
    scheduler.add_request(make_request(scheduler, "p3", [7, 8, 9]))  # behind p0..p2 in the queue
    for rid in ("n1", "n2"):
        scheduler.add_request(make_request(scheduler, rid, list(range(30)), final=True, resumable=False))
    rank = {"n2": 0, "p3": 1, "n1": 2}
    copy = SimpleNamespace(
        running=list(scheduler.running),
        kv_holding_waiting=deque(scheduler.kv_holding_waiting),
        waiting=deque(scheduler.waiting),
    )
    vllm_compat.sort_queues(copy, key=lambda r: rank.get(r.request_id, len(rank)))
    vllm_compat.rank_queues(scheduler, rank)
    assert _queues_of(scheduler) == _queues_of(copy)
    assert _queues_of(scheduler)[1] == ["n2", "p3", "n1", "p0", "p1", "p2", "p4", "p5"]
    out = step(scheduler)
    assert list(out.num_scheduled_tokens) == ["n2", "p3", "n1"]


@pytest.mark.parametrize("seed", range(40))
def test_rank_queues_equals_sort_queues_on_random_queues(seed):
    rng = random.Random(seed)
    requests = [SimpleNamespace(request_id=f"r{i}") for i in range(rng.randrange(0, 30))]
    rng.shuffle(requests)
    cut = sorted(rng.sample(range(len(requests) + 1), 2)) if len(requests) > 1 else [0, 0]
    ranked = rng.sample(requests, rng.randrange(len(requests) + 1))
    rank = {r.request_id: i for i, r in enumerate(ranked)}
    rank.update({f"gone{i}": len(rank) for i in range(rng.randrange(3))})  # ranked, in no queue

    def queues():
        return SimpleNamespace(
            running=requests[: cut[0]],
            kv_holding_waiting=deque(requests[cut[0] : cut[1]]),
            waiting=deque(requests[cut[1] :]),
        )

    expected, got, memo = queues(), queues(), vllm_compat.QueueMemo()

    def both() -> None:
        vllm_compat.sort_queues(expected, key=lambda r: rank.get(r.request_id, len(rank)))
        vllm_compat.rank_queues(got, rank, memo)
        assert _queues_of(got) == _queues_of(expected)

    both()
    taken = rng.randrange(len(got.kv_holding_waiting) + 1)  # vLLM scheduled these from the front
    for queues_ in (expected, got):
        queues_.running.extend(queues_.kv_holding_waiting.popleft() for _ in range(taken))
    both()  # the queue leads in order: nothing to move
    both()  # nothing changed since: the memo holds
    new = SimpleNamespace(request_id="new")  # unranked, in the other queue: the memo does not hold
    for queues_ in (expected, got):
        queues_.waiting.append(new)
    both()


def test_a_streaming_chunk_gets_a_generator_seeded_as_a_new_request():
    """vLLM's ``_update_streaming_request`` keeps a session's old generator (none after greedy
    chunks); patched, each chunk gets one seeded as a new request's, and none without a seed."""
    import torch
    from vllm import SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert vllm_compat.reseed_streaming_updates() and vllm_compat.reseed_streaming_updates()  # idempotent
    patched = GPUModelRunner._update_streaming_request
    assert "generator" not in inspect.getsource(patched.__wrapped__)  # still vLLM's behaviour to fix
    state = SimpleNamespace(generator=None, output_token_ids=[7])
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(remove_request=lambda req_id: None),
        requests={"s": state},
        late_interaction_runner=SimpleNamespace(register_request=lambda *args: None),
        uses_mrope=False,
        device=torch.device("cpu"),
    )

    def chunk(sampling):
        return SimpleNamespace(
            prompt_token_ids=[1, 2, 3], mm_features=[], prompt_embeds=None, sampling_params=sampling,
            pooling_params=None, block_ids=([0],), num_computed_tokens=2,
        )  # fmt: skip

    assert patched(runner, "s", chunk(SamplingParams(temperature=1.0, seed=5))) is state
    fresh = torch.Generator().manual_seed(5)
    assert torch.equal(torch.rand(4, generator=state.generator), torch.rand(4, generator=fresh))
    assert state.output_token_ids == [] and state.num_prompt_tokens == 3
    patched(runner, "s", chunk(SamplingParams(temperature=0.0)))
    assert state.generator is None
