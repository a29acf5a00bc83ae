"""StreamScheduler under async scheduling (vLLM's default on GPU), on vLLM's real AsyncScheduler.

vLLM's engine core then schedules step N+1 before step N's output came back. These tests drive our
scheduler that way (schedule, schedule again, then the first step's output, ...) on a synthetic
setup (real scheduler and KV manager, no model) and check the token counts, computed tokens, blocks
and request states of appends, updates, chunks taken over, deferrals and evictions.
"""

from __future__ import annotations

import inspect

import pytest
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from stream2llm.core import vllm_compat
from stream2llm.core.protocol import CONFIG_KEY, token_digest
from stream2llm.core.scheduler import AsyncStreamScheduler, StreamScheduler
from tests.unit.synthetic import (
    SAMPLED,
    blocks_of,
    finish_step,
    finish_step_outputs,
    make_request,
    make_scheduler,
    run_pipelined,
    schedule_step,
)

BS = 16


def async_scheduler(tiny_model, **kwargs):
    return make_scheduler(str(tiny_model.path), block_size=BS, async_scheduling=True, **kwargs)


def with_policy(request, policy: str = "stream2llm"):
    request.sampling_params.extra_args[CONFIG_KEY]["policy"] = policy
    return request


def test_async_scheduling_builds_the_variant_on_vllms_async_scheduler(tiny_model):
    scheduler = async_scheduler(tiny_model)
    assert type(scheduler) is AsyncStreamScheduler and isinstance(scheduler, StreamScheduler)
    mro = type(scheduler).__mro__
    # our hooks first, then vLLM's placeholders, then vLLM's Scheduler
    assert mro.index(vllm_compat.HookedScheduler) < mro.index(AsyncScheduler) < mro.index(Scheduler)
    sync = make_scheduler(str(tiny_model.path), block_size=BS)
    assert type(sync) is StreamScheduler and not isinstance(sync, AsyncScheduler)


def test_vllm_uses_our_class_whatever_the_flag_and_overlaps_two_steps(tiny_model):
    """Why the class picks its variant itself: vLLM returns a custom ``scheduler_cls`` as it is;
    and why one step at most is in flight when ``schedule()`` runs: the batch queue holds two."""
    scheduler = async_scheduler(tiny_model)
    config = scheduler.vllm_config
    config.scheduler_config.scheduler_cls = StreamScheduler
    assert config.scheduler_config.get_scheduler_cls() is StreamScheduler
    assert config.max_concurrent_batches == 2
    for name in ("_update_after_schedule", "_update_request_with_output"):
        assert name in vars(AsyncScheduler), f"vLLM's AsyncScheduler no longer overrides {name}"
    request = make_request(scheduler, "r", list(range(40)))
    assert request.num_in_flight_tokens == 0 and request.num_output_placeholders == 0
    assert list(inspect.signature(Scheduler._free_request_blocks).parameters) == ["self", "request"]


def test_append_chunks_with_the_next_step_scheduled_before_the_last_output(tiny_model):
    scheduler = async_scheduler(tiny_model, max_num_batched_tokens=64)
    old = list(range(1000, 1100))
    a = make_request(scheduler, "a", old)
    scheduler.add_request(a)
    first = schedule_step(scheduler)
    second = schedule_step(scheduler)  # step 1 still in flight
    assert first[0].num_scheduled_tokens == {"a": 64} and second[0].num_scheduled_tokens == {"a": 36}
    assert (a.num_computed_tokens, vllm_compat.tokens_in_flight(a)) == (100, 100)
    assert vllm_compat.sample_in_flight(a) and len(blocks_of(scheduler, "a")) == 7
    finish_step(scheduler, first)
    third = schedule_step(scheduler)
    assert third[0].num_scheduled_tokens == {}  # its one throw-away token is already in flight
    finish_step(scheduler, second)
    assert vllm_compat.is_parked(a) and a.num_computed_tokens == 100
    assert not vllm_compat.step_in_flight(a) and not vllm_compat.sample_in_flight(a)

    scheduler.add_request(make_request(scheduler, "a", [5] * 20))  # while step 3 is in flight
    finish_step(scheduler, third)
    steps = run_pipelined(scheduler)
    assert sum(o.num_scheduled_tokens.get("a", 0) for o in steps) == 20
    assert vllm_compat.is_parked(a) and a.num_computed_tokens == 120 and len(blocks_of(scheduler, "a")) == 8

    scheduler.add_request(make_request(scheduler, "a", [6] * 3, max_tokens=4, final=True))
    finished: dict = {}
    in_flight = [schedule_step(scheduler), schedule_step(scheduler)]
    while in_flight:
        finished.update(finish_step(scheduler, in_flight.pop(0)))
        if vllm_compat.find_request(scheduler, "a") is not None:
            in_flight.append(schedule_step(scheduler))
    assert a.is_finished() and list(a.output_token_ids) == [SAMPLED] * 4
    counters = finished["a"][CONFIG_KEY]
    assert counters["tokens_prefilled"] == 123 and counters["computed_prompt_len"] == 123
    assert counters["computed_prompt_digest"] == token_digest(old + [5] * 20 + [6] * 3)


def test_an_update_behind_a_partial_prefill_in_flight_takes_it_over_at_once(tiny_model):
    """The step in flight prefills part of the chunk and samples nothing, so the update takes over
    at the next ``schedule()``: cut to the LCP of what was computed (the step in flight
    included), no sampled token, no park; that step's output later changes nothing."""
    scheduler = async_scheduler(tiny_model, max_num_batched_tokens=64)
    old = list(range(1000, 1100))
    a = make_request(scheduler, "a", old)
    scheduler.add_request(a)
    first = schedule_step(scheduler)
    new = old[:40] + [2] * 8
    scheduler.add_request(make_request(scheduler, "a", new, op="update", final=True))
    second = schedule_step(scheduler)
    assert scheduler.updates.chunks_taken_over == 1
    (record,) = scheduler.accounting.counters("a").updates
    assert (record.old_len, record.lcp, record.kept, record.discarded) == (64, 40, 40, 24)
    assert record.tail == "unhashed"
    assert second[0].num_scheduled_tokens == {"a": 8}
    assert vllm_compat.sent_prompts(second[0]) == {"a": new}
    assert second[0].scheduled_new_reqs[0].num_computed_tokens == 40
    assert (a.num_computed_tokens, vllm_compat.tokens_in_flight(a)) == (48, 72)
    assert len(blocks_of(scheduler, "a")) == 3
    ended = finish_step_outputs(scheduler, first)  # the next outputs end the superseded chunk
    assert [(o.request_id, len(o.new_token_ids), o.finish_reason.name) for o in ended] == [("a", 1, "LENGTH")]
    assert (a.num_computed_tokens, vllm_compat.tokens_in_flight(a), len(a.output_token_ids)) == (48, 8, 0)
    counters = finish_step(scheduler, second)["a"][CONFIG_KEY]
    assert counters["tokens_prefilled"] == 64 + 8
    assert (counters["tokens_recomputed"], counters["tokens_discarded"]) == (8, 24)  # positions 40-47 again
    assert counters["computed_prompt_digest"] == token_digest(new)


def test_a_chunk_whose_last_step_is_in_flight_is_not_taken_over(tiny_model):
    scheduler = async_scheduler(tiny_model, max_num_batched_tokens=64)
    old = list(range(1000, 1100))
    a = make_request(scheduler, "a", old)
    scheduler.add_request(a)
    first, second = schedule_step(scheduler), schedule_step(scheduler)  # 64 + the last 36
    scheduler.add_request(make_request(scheduler, "a", old[:70] + [3] * 5, op="update"))
    third = schedule_step(scheduler)
    assert scheduler.updates.chunks_taken_over == 0 and third[0].num_scheduled_tokens == {}
    assert a.num_prompt_tokens == 100 and a.num_computed_tokens == 100
    finish_step(scheduler, first)
    finish_step(scheduler, second)
    (record,) = scheduler.accounting.counters("a").updates
    assert (record.old_len, record.kept, record.tail) == (100, 70, "unhashed")
    assert (a.num_computed_tokens, a.num_prompt_tokens, len(blocks_of(scheduler, "a"))) == (70, 75, 5)
    finish_step(scheduler, third)
    steps = run_pipelined(scheduler)
    assert sum(o.num_scheduled_tokens.get("a", 0) for o in steps) == 5
    assert vllm_compat.is_parked(a) and a.num_computed_tokens == 75


def test_an_update_cuts_a_parked_session_while_another_step_is_in_flight(tiny_model):
    """The copy of a shared block goes to the worker with the next step, not the one in flight."""
    scheduler = async_scheduler(tiny_model)
    old = list(range(300, 400))
    a = make_request(scheduler, "a", old)
    scheduler.add_request(a)
    run_pipelined(scheduler)
    scheduler.add_request(make_request(scheduler, "b", old[:64] + [9] * 10, max_tokens=50))
    in_flight = schedule_step(scheduler)
    assert in_flight[0].num_scheduled_tokens == {"b": 10}  # 64 from a's cached blocks
    shared = blocks_of(scheduler, "a")[40 // BS]
    assert shared.ref_cnt == 2
    free = vllm_compat.free_block_count(scheduler)
    scheduler.add_request(make_request(scheduler, "a", old[:40] + [2] * 8, op="update"))
    assert scheduler.accounting.counters("a").updates[-1].tail == "copied"
    copy = blocks_of(scheduler, "a")[40 // BS]
    assert copy is not shared and shared.block_hash is not None and len(blocks_of(scheduler, "a")) == 3
    assert vllm_compat.free_block_count(scheduler) == free + 3 - 1  # 4..6 freed (b holds 3), one copy
    following = schedule_step(scheduler)
    assert following[0].num_scheduled_tokens == {"b": 1, "a": 8}
    copies = [(c.src_block_id, c.dst_block_id) for c in following[0].kv_cache_block_copies]
    assert (shared.block_id, copy.block_id) in copies
    assert not in_flight[0].kv_cache_block_copies
    finish_step(scheduler, in_flight)
    finish_step(scheduler, following)
    assert vllm_compat.is_parked(a) and a.num_computed_tokens == 48


@pytest.fixture
def deferred_with_step_in_flight(tiny_model):
    """A partial stream "p" (288 tokens, 18 of 19 blocks) has a 256-token step in flight when a
    complete request "c" (100 tokens, 7 blocks) arrives: the broker defers p and names it victim."""
    scheduler = async_scheduler(tiny_model, num_blocks=20, policy="stream2llm", max_num_batched_tokens=256)
    p = with_policy(make_request(scheduler, "p", list(range(5000, 5288))))
    scheduler.add_request(p)
    first = schedule_step(scheduler)
    assert first[0].num_scheduled_tokens == {"p": 256} and vllm_compat.free_block_count(scheduler) == 3
    c = make_request(scheduler, "c", list(range(3000, 3100)), max_tokens=3, final=True, resumable=False)
    with_policy(c)
    scheduler.add_request(c)
    return scheduler, p, c, first


def test_a_prefill_deferred_with_its_step_in_flight_keeps_its_kv(deferred_with_step_in_flight):
    scheduler, p, _, first = deferred_with_step_in_flight
    second = schedule_step(scheduler)
    assert scheduler.broker.deferrals == 1 and p.status.name == "WAITING"
    assert p not in scheduler.running and p.num_computed_tokens == 256
    assert vllm_compat.tokens_in_flight(p) == 256 and len(blocks_of(scheduler, "p")) == 16
    finish_step(scheduler, first)  # the partial prefill's output changes nothing
    assert p.status.name == "WAITING" and p.num_computed_tokens == 256 and not p.output_token_ids
    assert not vllm_compat.step_in_flight(p)
    finish_step(scheduler, second)


def test_eviction_waits_for_the_victims_step_in_flight(deferred_with_step_in_flight):
    scheduler, p, c, first = deferred_with_step_in_flight
    second = schedule_step(scheduler)
    assert (scheduler.broker.evictions, scheduler.broker.evictions_waited) == (0, 1)
    assert len(blocks_of(scheduler, "p")) == 16 and second[0].num_scheduled_tokens == {}  # c: no blocks yet
    finish_step(scheduler, first)
    third = schedule_step(scheduler)  # p's step came back: now it is evicted
    assert scheduler.broker.evictions == 1 and not blocks_of(scheduler, "p") and p.num_computed_tokens == 0
    assert third[0].num_scheduled_tokens == {"c": 100}
    finish_step(scheduler, second)
    finish_step(scheduler, third)
    steps = run_pipelined(scheduler)
    assert c.is_finished() and vllm_compat.is_parked(p) and p.num_computed_tokens == 288
    # p recomputes what the prefix cache lost to c: 288 - 192 still cached
    assert sum(o.num_scheduled_tokens.get("p", 0) for o in steps) == 96
    assert scheduler.accounting.counters("p").tokens_prefilled == 256 + 96


def test_the_step_log_pairs_each_step_with_its_own_output(tiny_model, tmp_path):
    """Two steps are open at once: each line holds its own prefill and both of its times."""
    from stream2llm.core.step_log import read_step_log

    path = tmp_path / "steps.jsonl"
    scheduler = async_scheduler(tiny_model, max_num_batched_tokens=64, step_log=str(path))
    scheduler.add_request(make_request(scheduler, "a", list(range(1000, 1100))))
    first, second = schedule_step(scheduler), schedule_step(scheduler)
    finish_step(scheduler, first)
    third = schedule_step(scheduler)
    finish_step(scheduler, second)
    finish_step(scheduler, third)
    steps = read_step_log(path)
    assert [[item[:2] for item in s["prefill"]] for s in steps] == [[[64, 0]], [[36, 64]], []]
    assert all(s["t0"] <= s["t1"] <= s["t2"] for s in steps)
    assert steps[1]["t1"] < steps[0]["t2"]  # the second step was scheduled before the first came back
