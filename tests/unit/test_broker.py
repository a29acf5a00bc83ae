"""The broker on vLLM's real scheduler (synthetic setup, no model): parked-session eviction,
resume after eviction, update after eviction, and stock vLLM's stall for contrast."""

from __future__ import annotations

import math

from stream2llm.core import vllm_compat
from stream2llm.core.step_log import read_step_log
from stream2llm.core.streams import DEFAULT_GAP_S, StreamTracker
from tests.unit.synthetic import (
    blocks_of,
    finish_step_outputs,
    make_request,
    make_scheduler,
    run_until_idle,
    schedule_step,
    step,
)

BS = 16


def park(scheduler, rid, ids, policy):
    request = make_request(scheduler, rid, ids)
    request.sampling_params.extra_args["stream2llm"]["policy"] = policy
    scheduler.add_request(request)
    run_until_idle(scheduler)
    assert request.status.name == "WAITING_FOR_STREAMING_REQ"
    return request


def pressure(tiny_model, policy, **options):
    """Two parked sessions hold 17 of 19 blocks; a new request needs 7."""
    scheduler = make_scheduler(str(tiny_model.path), num_blocks=20, block_size=BS, policy=policy, **options)
    a = park(scheduler, "a", list(range(1000, 1150)), policy)  # 10 blocks
    b = park(scheduler, "b", list(range(2000, 2100)), policy)  # 7 blocks
    c = make_request(scheduler, "c", list(range(3000, 3100)), max_tokens=3, final=True, resumable=False)
    c.sampling_params.extra_args["stream2llm"]["policy"] = policy
    scheduler.add_request(c)
    return scheduler, a, b, c


def test_stock_vllm_stalls_behind_parked_sessions(tiny_model):
    scheduler, a, b, _ = pressure(tiny_model, "vllm")
    for _ in range(5):
        out = step(scheduler)
        assert "c" not in out.num_scheduled_tokens  # no blocks: it waits as long as they stay parked
    assert a.num_computed_tokens == 150 and b.num_computed_tokens == 100


def test_stream2llm_evicts_parked_session_and_admits_new_work(tiny_model):
    scheduler, a, b, c = pressure(tiny_model, "stream2llm")
    out = step(scheduler)
    assert out.num_scheduled_tokens.get("c") == 100
    evicted = [r for r in (a, b) if r.num_computed_tokens == 0]
    assert len(evicted) == 1 and not blocks_of(scheduler, evicted[0].request_id)
    assert scheduler.broker.evictions == 1
    run_until_idle(scheduler)
    assert c.is_finished()


def test_resume_after_eviction_recomputes_the_whole_prompt(tiny_model):
    scheduler, a, b, _ = pressure(tiny_model, "stream2llm")
    run_until_idle(scheduler)  # c runs and finishes; one parked session was evicted
    (victim,) = [r for r in (a, b) if r.num_computed_tokens == 0]
    old = list(victim.prompt_token_ids)
    scheduler.add_request(make_request(scheduler, victim.request_id, [7, 8, 9]))
    run_until_idle(scheduler)
    assert victim.status.name == "WAITING_FOR_STREAMING_REQ"
    assert list(victim.prompt_token_ids) == old + [7, 8, 9]
    assert victim.num_computed_tokens == len(old) + 3
    assert len(blocks_of(scheduler, victim.request_id)) == -(-(len(old) + 3) // BS)


def test_a_final_whose_whole_prompt_does_not_fit_gets_blocks_from_parked_sessions(tiny_model):
    """vLLM admits a waiting request only if its whole prompt fits (scheduler_reserve_full_isl),
    not just the chunk it would schedule now. Parked sessions hold 50 of 63 blocks; a final
    needs 20 for its prompt but 4 for its first 64-token chunk: counting the chunk, the broker
    evicted nothing and vLLM refused the final step after step while the engine idled."""
    scheduler = make_scheduler(
        str(tiny_model.path), num_blocks=64, block_size=BS, policy="stream2llm", max_num_batched_tokens=64
    )
    assert vllm_compat.admits_whole_prompts(scheduler)
    a = park(scheduler, "a", list(range(1000, 1400)), "stream2llm")  # 25 blocks
    b = park(scheduler, "b", list(range(2000, 2400)), "stream2llm")  # 25 blocks
    c = make_request(scheduler, "c", list(range(3000, 3320)), max_tokens=2, final=True, resumable=False)
    scheduler.add_request(c)
    out = step(scheduler)
    assert out.num_scheduled_tokens.get("c") == 64  # admitted at once
    assert scheduler.broker.evictions == 1 and 0 in (a.num_computed_tokens, b.num_computed_tokens)
    run_until_idle(scheduler)
    assert c.is_finished()


def test_an_eviction_is_logged_and_what_it_costs_is_counted_as_recomputed(tiny_model, tmp_path):
    """The step log says who gave KV back before a step (tokens, blocks), and the tokens a victim
    computes again after resuming count as recomputed, in its counters and in the log."""
    log = tmp_path / "steps.jsonl"
    scheduler, a, b, _ = pressure(tiny_model, "stream2llm", step_log=str(log))
    run_until_idle(scheduler)
    (victim,) = [r for r in (a, b) if r.num_computed_tokens == 0]
    old = len(victim.prompt_token_ids)
    scheduler.add_request(make_request(scheduler, victim.request_id, [7, 8, 9]))
    run_until_idle(scheduler)
    steps = read_step_log(log)
    evicted = [e for s in steps for e in s.get("evicted", ())]
    assert evicted == [[victim.request_id, old, -(-old // BS), "recompute"]]
    again = sum(n for s in steps for rid, n in s.get("recomputed", ()) if rid == victim.request_id)
    resumed = [item for s in steps for item in s["prefill"] if item[3] == victim.request_id][-1]
    assert again == old - resumed[1] > 0  # computed again: from the prefix-cache hit to its old end
    assert scheduler.accounting.counters(victim.request_id).tokens_recomputed == again


def test_update_after_eviction_keeps_nothing_and_recomputes_everything(tiny_model):
    scheduler, a, b, _ = pressure(tiny_model, "stream2llm")
    run_until_idle(scheduler)
    (victim,) = [r for r in (a, b) if r.num_computed_tokens == 0]
    new = list(victim.prompt_token_ids[:40]) + [5] * 20
    scheduler.add_request(make_request(scheduler, victim.request_id, new, op="update"))
    record = scheduler.accounting.counters(victim.request_id).updates[-1]
    assert (record.old_len, record.kept, record.recomputed) == (0, 0, 60)
    run_until_idle(scheduler)
    assert list(victim.prompt_token_ids) == new and victim.num_computed_tokens == 60


def test_a_final_chunk_outranks_a_running_partial_prefill(tiny_model):
    """vLLM serves running requests first; the broker defers a partial prefill (keeping its KV)
    so that a session's final chunk, on the TTFT clock, gets the step."""
    scheduler = make_scheduler(
        str(tiny_model.path), num_blocks=200, block_size=BS, policy="stream2llm", max_num_batched_tokens=64
    )
    final = park(scheduler, "final", list(range(100, 150)), "stream2llm")
    partial = make_request(scheduler, "partial", list(range(5000, 5600)))
    partial.sampling_params.extra_args["stream2llm"]["policy"] = "stream2llm"
    scheduler.add_request(partial)
    step(scheduler)
    assert partial.status.name == "RUNNING" and 0 < partial.num_computed_tokens < 600
    scheduler.add_request(make_request(scheduler, "final", list(range(40)), final=True))
    out = step(scheduler)
    assert out.num_scheduled_tokens.get("final") == 40  # the final chunk first
    assert scheduler.broker.deferrals >= 1
    held = blocks_of(scheduler, "partial")
    assert held  # the deferred prefill kept its KV
    run_until_idle(scheduler)
    assert partial.num_computed_tokens == 600 and final.is_finished()


def test_the_ranking_holds_across_vllms_two_waiting_queues(tiny_model):
    """vLLM drains waiting requests that hold KV first; a complete request without KV (new or
    evicted) still goes before a partial stream's next chunk when it ranks higher."""
    scheduler = make_scheduler(
        str(tiny_model.path), num_blocks=200, block_size=BS, policy="stream2llm", max_num_batched_tokens=64
    )
    park(scheduler, "partial", list(range(100, 150)), "stream2llm")
    scheduler.add_request(make_request(scheduler, "partial", list(range(5000, 5600))))  # holds KV
    complete = make_request(scheduler, "complete", list(range(3000, 3040)), final=True, resumable=False)
    complete.sampling_params.extra_args["stream2llm"]["policy"] = "stream2llm"
    scheduler.add_request(complete)
    out = step(scheduler)
    assert out.num_scheduled_tokens.get("complete") == 40
    assert out.num_scheduled_tokens.get("partial") == 24  # the rest of the step
    run_until_idle(scheduler)
    assert complete.is_finished()


def test_parked_sessions_are_capped_to_their_share_of_kv(tiny_model):
    scheduler = make_scheduler(
        str(tiny_model.path), num_blocks=20, block_size=BS, policy="stream2llm", parked_kv_cap=0.3
    )
    park(scheduler, "a", list(range(1000, 1150)), "stream2llm")  # 10 blocks, over the cap of 5
    step(scheduler)
    held = len(blocks_of(scheduler, "a"))
    assert held == 0 and scheduler.broker.evictions == 1
    small = park(scheduler, "b", list(range(2000, 2060)), "stream2llm")  # 4 blocks: under the cap
    step(scheduler)
    assert small.num_computed_tokens == 60 and scheduler.broker.evictions == 1


def prefilling_update(tiny_model, policy="stream2llm"):
    """A parked session takes a 600-token update; 64-token steps: one step in, it is mid-prefill."""
    scheduler = make_scheduler(
        str(tiny_model.path), num_blocks=200, block_size=BS, policy=policy, max_num_batched_tokens=64
    )
    session = park(scheduler, "s", list(range(100, 150)), policy)
    first = list(range(100, 140)) + list(range(5000, 5560))
    scheduler.add_request(make_request(scheduler, "s", first, op="update"))
    step(scheduler)
    assert session.status.name == "RUNNING" and session.num_computed_tokens == 40 + 64
    return scheduler, session


def test_an_update_queued_behind_a_prefilling_update_takes_it_over_in_place(tiny_model):
    """An ANN pipeline refines faster than a long update prefills: the newer update takes over the
    chunk in work at the next step (cut to what both share of what was computed), with no step
    that samples the superseded chunk's throw-away token, no park and no resume; the superseded
    chunk ends with one placeholder token, first in that step's outputs."""
    scheduler, session = prefilling_update(tiny_model)
    second = list(range(100, 140)) + list(range(5000, 5100)) + [7] * 50
    scheduler.add_request(make_request(scheduler, "s", second, op="update"))
    pending = schedule_step(scheduler)
    assert pending[0].num_scheduled_tokens.get("s") == 64  # the new tail at once
    assert scheduler.updates.chunks_taken_over == 1 and list(session.prompt_token_ids) == second
    first_output, *_ = finish_step_outputs(scheduler, pending)
    assert (first_output.request_id, len(first_output.new_token_ids)) == ("s", 1)
    assert first_output.finish_reason.name == "LENGTH"
    run_until_idle(scheduler)
    assert session.num_computed_tokens == len(second) and vllm_compat.is_parked(session)
    first, applied = scheduler.accounting.counters("s").updates
    assert (first.old_len, first.kept, first.discarded) == (50, 40, 10)
    assert (applied.old_len, applied.kept, applied.discarded) == (104, 104, 0)  # all of it stays
    # 50 parked + 64 of the first update + the 86 the second adds; 660 without the take-over
    assert scheduler.accounting.counters("s").tokens_prefilled == 50 + 64 + 86


def test_an_append_queued_behind_a_prefilling_chunk_extends_it_in_place(tiny_model):
    scheduler, session = prefilling_update(tiny_model)
    scheduler.add_request(make_request(scheduler, "s", [9] * 10))
    steps = run_until_idle(scheduler)
    assert scheduler.updates.chunks_taken_over == 1
    assert [o.num_scheduled_tokens.get("s") for o in steps] == [64] * 7 + [58]  # 506 in 64-token steps
    assert session.num_computed_tokens == 600 + 10 and vllm_compat.is_parked(session)


def test_stock_vllm_chunks_wait_their_turn_behind_the_chunk_in_work(tiny_model):
    scheduler, session = prefilling_update(tiny_model)
    scheduler.add_request(make_request(scheduler, "s", [9] * 10, in_place=False))
    steps = run_until_idle(scheduler)
    assert scheduler.updates.chunks_taken_over == 0
    assert [o.num_scheduled_tokens.get("s") for o in steps] == [64] * 7 + [48, 10]  # a round each
    assert session.num_computed_tokens == 600 + 10


def views_of(scheduler):
    """The broker's views before the next step (its book brought up to date)."""
    scheduler.broker.plan(scheduler.broker.policy(), 0.0)
    return scheduler.broker.book.views


def test_the_broker_sees_chunks_queued_behind_the_one_in_work(tiny_model):
    scheduler, _ = prefilling_update(tiny_model)
    scheduler.add_request(make_request(scheduler, "s", [9] * 10, final=True))
    (view,) = views_of(scheduler).values()
    assert view.complete and view.tokens_queued == 10
    assert view.tokens_pending == 600 - 104  # the chunk in work


def test_queued_updates_count_once_the_last_one_replaces_the_rest(tiny_model):
    """Two refinements queued behind the chunk in work: the later replaces the earlier, so the
    broker counts its whole prompt once (counting both ranked the session behind longer finals)."""
    scheduler, _ = prefilling_update(tiny_model)
    second = list(range(100, 140)) + list(range(6000, 6300))
    third = list(range(100, 140)) + list(range(7000, 7200))
    scheduler.add_request(make_request(scheduler, "s", second, op="update"))
    scheduler.add_request(make_request(scheduler, "s", third, op="update"))
    scheduler.add_request(make_request(scheduler, "s", [9] * 10, final=True))
    (view,) = views_of(scheduler).values()
    assert view.tokens_queued == len(third) + 10


def test_stream_tracker_expects_the_next_chunk_after_the_smoothed_gap():
    streams = StreamTracker()
    assert not streams.chunk_arrived("s", 10.0, final=False, is_stream_chunk=True)  # a new stream
    streams.admitted("s", 10.0, complete=False)
    assert streams.get("s").next_chunk_eta() == 10.0 + DEFAULT_GAP_S  # no gap observed yet
    assert streams.chunk_arrived("s", 11.0, final=False, is_stream_chunk=True)
    assert streams.chunk_arrived("s", 14.0, final=False, is_stream_chunk=True)
    assert streams.get("s").next_chunk_eta() == 14.0 + (0.5 * 1.0 + 0.5 * 3.0)
    streams.admitted("s", 20.0, complete=True)  # already known: its arrival stays
    assert streams.get("s").arrival == 10.0 and not streams.is_complete("s")
    streams.chunk_arrived("s", 15.0, final=True, is_stream_chunk=True)
    assert streams.is_complete("s") and streams.get("s").next_chunk_eta() == math.inf
    streams.forget("s")
    assert streams.get("s") is None and not streams.is_complete("s")


def wasteful_session(tiny_model, policy="stream2llm"):
    """A parked session whose one update threw away 160 of the 250 tokens prefilled for it."""
    scheduler = make_scheduler(str(tiny_model.path), num_blocks=200, block_size=BS, policy=policy)
    session = park(scheduler, "s", list(range(100, 300)), policy)
    scheduler.add_request(make_request(scheduler, "s", list(range(100, 140)) + [7] * 10, op="update"))
    run_until_idle(scheduler)
    counters = scheduler.accounting.counters("s")
    assert (counters.tokens_discarded, counters.tokens_prefilled) == (160, 210)
    assert vllm_compat.is_parked(session)
    return scheduler, session


def test_a_session_whose_updates_threw_away_most_stops_speculating_until_its_final(tiny_model):
    """Its next partial chunks are held in the engine core, unscheduled; the final goes in with
    them as one chunk (an update replaces what came before it, appends extend it), only that is
    prefilled past the KV the session holds, and each held chunk ends with a placeholder token
    first in the final's outputs, as a chunk taken over does."""
    scheduler, session = wasteful_session(tiny_model)
    update = list(range(100, 140)) + [8] * 30
    scheduler.add_request(make_request(scheduler, "s", update, op="update"))
    scheduler.add_request(make_request(scheduler, "s", [9] * 5))
    assert scheduler.gate.chunks_held == 2 and scheduler.gate.sessions_gated == 1
    assert not run_until_idle(scheduler) and vllm_compat.is_parked(session)  # nothing speculated
    assert len(scheduler.accounting.counters("s").updates) == 1
    scheduler.add_request(make_request(scheduler, "s", [6] * 3, final=True))
    assert not scheduler.gate.held
    pending = schedule_step(scheduler)
    assert pending[0].num_scheduled_tokens == {"s": 38}  # past the 40 tokens both share
    outputs = finish_step_outputs(scheduler, pending)
    assert [(o.request_id, len(o.new_token_ids)) for o in outputs[:2]] == [("s", 1), ("s", 1)]
    assert all(o.finish_reason.name == "LENGTH" for o in outputs[:2])
    assert list(session.prompt_token_ids) == update + [9] * 5 + [6] * 3
    counters = outputs[-1].kv_transfer_params["stream2llm"]  # the final answered: its counters
    assert [(u["kept"], u["recomputed"]) for u in counters["updates"]][-1] == (40, 38)
    assert counters["tokens_prefilled"] == 210 + 38


def test_a_session_whose_updates_keep_most_keeps_speculating(tiny_model):
    scheduler = make_scheduler(str(tiny_model.path), num_blocks=200, block_size=BS, policy="stream2llm")
    park(scheduler, "s", list(range(100, 300)), "stream2llm")
    scheduler.add_request(make_request(scheduler, "s", list(range(100, 290)) + [7] * 10, op="update"))
    run_until_idle(scheduler)
    scheduler.add_request(make_request(scheduler, "s", list(range(100, 290)) + [8] * 30, op="update"))
    assert scheduler.gate.chunks_held == 0 and step(scheduler).num_scheduled_tokens == {"s": 30}


def test_published_policies_never_gate(tiny_model):
    scheduler, _ = wasteful_session(tiny_model, policy="fcfs")
    scheduler.add_request(make_request(scheduler, "s", list(range(100, 140)) + [8] * 30, op="update"))
    assert scheduler.gate.chunks_held == 0 and step(scheduler).num_scheduled_tokens == {"s": 30}


def test_a_gated_sessions_chunk_in_work_parks_where_it_is(tiny_model):
    """The gate closes while an update is mid-prefill: when the next partial chunk comes, that
    update parks with the 104 tokens it computed (ending as a chunk taken over does), the new
    chunk is held, and the final goes in with it."""
    scheduler = make_scheduler(
        str(tiny_model.path), num_blocks=200, block_size=BS, policy="stream2llm", max_num_batched_tokens=64
    )
    session = park(scheduler, "s", list(range(100, 300)), "stream2llm")
    first = list(range(100, 140)) + list(range(5000, 5300))
    scheduler.add_request(make_request(scheduler, "s", first, op="update"))  # throws 160 of 200 away
    step(scheduler)
    assert session.status.name == "RUNNING" and session.num_computed_tokens == 104
    second = list(range(100, 140)) + list(range(5000, 5050)) + [8] * 20
    scheduler.add_request(make_request(scheduler, "s", second, op="update"))
    assert vllm_compat.is_parked(session) and list(session.prompt_token_ids) == first[:104]
    assert scheduler.gate.chunks_held == 1 and not run_until_idle(scheduler)
    scheduler.add_request(make_request(scheduler, "s", [6] * 3, final=True))
    pending = schedule_step(scheduler)
    assert pending[0].num_scheduled_tokens == {"s": 23}  # past the 90 tokens second shares with it
    ended, *rest = finish_step_outputs(scheduler, pending)
    assert (ended.new_token_ids, ended.finish_reason.name) == ([first[-1]], "LENGTH")  # the parked chunk
    assert [len(o.new_token_ids) for o in rest] == [1, 1]  # the held chunk's end, then the answer
    assert list(session.prompt_token_ids) == second + [6] * 3


def test_an_append_held_by_the_gate_carries_what_the_parked_chunk_had_not_computed(tiny_model):
    scheduler = make_scheduler(
        str(tiny_model.path), num_blocks=200, block_size=BS, policy="stream2llm", max_num_batched_tokens=64
    )
    session = park(scheduler, "s", list(range(100, 300)), "stream2llm")
    first = list(range(100, 140)) + list(range(5000, 5300))
    scheduler.add_request(make_request(scheduler, "s", first, op="update"))
    step(scheduler)
    scheduler.add_request(make_request(scheduler, "s", [9] * 4))
    assert vllm_compat.is_parked(session) and session.num_computed_tokens == 104
    scheduler.add_request(make_request(scheduler, "s", [6] * 3, final=True))
    run_until_idle(scheduler)
    assert list(session.prompt_token_ids) == first + [9] * 4 + [6] * 3
