"""The broker's incremental policy step against the straightforward one, on vLLM's real scheduler.

Before each step the broker keeps its views between steps (``core/view_book.py``) and reorders
vLLM's queues reading only their front (``vllm_compat.rank_queues``). Here random runs of the
synthetic scheduler (sessions opening, chunks appended or updated, finals, one-shot requests,
aborts, policy switches, KV pressure, sync and async scheduling) check at every step that its
views, ranking, blocks short, victims, deferrals and queue order are exactly what building every
view from scratch and sorting everything gives (the implementation before the book, kept here).
"""

from __future__ import annotations

import random
from collections import deque
from types import SimpleNamespace

import pytest

from stream2llm.core import vllm_compat as compat
from stream2llm.core.broker import Broker, Plan
from stream2llm.core.policies import Policy, RequestView
from stream2llm.core.protocol import CONFIG_KEY
from stream2llm.core.streams import StreamState
from stream2llm.core.view_book import queued_tokens
from stream2llm.tokens import ceil_div
from tests.unit.synthetic import (
    finish_step,
    has_work,
    make_request,
    make_scheduler,
    run_until_idle,
    schedule_step,
)

POLICIES = ("stream2llm", "fcfs", "lcas", "mcps", "vllm")


# -- the straightforward step: every view built, everything sorted ------------------------------------


def reference_view(broker: Broker, request: compat.Request, now: float) -> RequestView:
    rid = request.request_id
    state = broker._streams.get(rid) or StreamState(now, now, True)
    parked = compat.is_parked(request)
    pending = 0 if parked else max(compat.tokens_to_compute(request), 1)
    return RequestView(
        rid,
        state.arrival,
        state.last_chunk,
        state.complete,
        parked,
        compat.computed_tokens(request),
        pending,
        compat.blocks_held(broker._scheduler, rid),
        state.next_chunk_eta(),
        queued_tokens(request),
    )


def reference_short(broker: Broker, views: list[RequestView], order: list[str]) -> int:
    scheduler = broker._scheduler
    by_id = {v.request_id: v for v in views}
    running = compat.running_ids(scheduler)
    whole = compat.admits_whole_prompts(scheduler)
    budget, want = compat.token_budget(scheduler), 0
    for rid in order:
        v = by_id[rid]
        if rid in running or budget <= 0:
            continue
        take = min(v.tokens_pending, budget)
        budget -= take
        admitted = v.tokens_pending if whole else take
        want += max(ceil_div(v.tokens_computed + admitted, compat.block_size(scheduler)) - v.blocks_held, 0)
    short = want - compat.free_block_count(scheduler)
    parked_blocks = sum(v.blocks_held for v in views if v.parked)
    over_cap = parked_blocks - int(broker.parked_kv_cap * compat.total_block_count(scheduler))
    return max(short, over_cap, 0)


def reference_deferrals(broker: Broker, rank: dict[str, int]) -> list[str]:
    scheduler = broker._scheduler
    running = compat.running_ids(scheduler)

    def wants_tokens(rid: str) -> bool:
        request = compat.find_request(scheduler, rid)
        return request is not None and not compat.is_parked(request) and compat.tokens_to_compute(request) > 0

    top = min((rank[rid] for rid in rank if rid not in running and wants_tokens(rid)), default=None)
    if top is None or not broker._streams.is_complete(next(r for r in rank if rank[r] == top)):
        return []
    return [
        r.request_id
        for r in compat.running_requests(scheduler)
        if not broker._streams.is_complete(r.request_id)
        and compat.is_prefilling(r)
        and rank.get(r.request_id, 0) > top
    ]


def reference_plan(broker: Broker, policy: Policy, now: float) -> tuple[Plan, dict[str, RequestView]]:
    views = [reference_view(broker, r, now) for r in compat.live_requests(broker._scheduler)]
    order = policy.rank([v for v in views if not v.parked])
    ids = [v.request_id for v in order]
    short = reference_short(broker, views, ids)
    victims = policy.victims(order, views, short, now) if short > 0 else []
    deferred = reference_deferrals(broker, {rid: i for i, rid in enumerate(ids)})
    return Plan(ids, short, victims, deferred), {v.request_id: v for v in views}


# -- the check, at every step -------------------------------------------------------------------------


class Checked:
    """Wraps a scheduler's broker so that each policy step is checked against the reference."""

    def __init__(self, scheduler, monkeypatch) -> None:
        self.broker, self.steps = scheduler.broker, 0
        plan, rank_queues = self.broker.plan, compat.rank_queues

        def checked_plan(policy: Policy, now: float) -> Plan:
            expected, views = reference_plan(self.broker, policy, now)
            got = plan(policy, now)
            assert self.broker.book.views == views
            assert got == expected
            self.steps += 1
            return got

        def checked_rank_queues(scheduler, rank, memo=None) -> None:
            copy = SimpleNamespace(
                running=list(scheduler.running),
                kv_holding_waiting=deque(scheduler.kv_holding_waiting),
                waiting=deque(scheduler.waiting),
            )
            compat.sort_queues(copy, key=lambda r: rank.get(r.request_id, len(rank)))
            rank_queues(scheduler, rank, memo)
            for name in ("running", "kv_holding_waiting", "waiting"):
                assert [r.request_id for r in getattr(scheduler, name)] == [
                    r.request_id for r in getattr(copy, name)
                ], name

        self.broker.plan = checked_plan
        monkeypatch.setattr(compat, "rank_queues", checked_rank_queues)


def random_run(scheduler, rng: random.Random, ops: int, pipelined: bool) -> None:
    """Sessions and requests come, get chunks, are aborted; steps run in between."""
    in_flight: deque = deque()
    sessions: list[str] = []
    for i in range(ops):
        op = rng.random()
        if op < 0.45:
            if has_work(scheduler):
                in_flight.append(schedule_step(scheduler))
            if in_flight and (not pipelined or len(in_flight) == 2 or not has_work(scheduler)):
                finish_step(scheduler, in_flight.popleft())
        elif op < 0.65 or not sessions:
            rid = f"s{i}"
            sessions.append(rid)
            add(scheduler, rng, rid, rng.randrange(8, 120), final=rng.random() < 0.2)
        elif op < 0.85:
            rid = rng.choice(sessions)
            held = compat.find_request(scheduler, rid)
            if (
                held is not None
                and not scheduler.streams.is_complete(rid)
                and len(held.prompt_token_ids) < 600
            ):
                update = rng.random() < 0.3
                n = len(held.prompt_token_ids) if update else 0
                ids = [*held.prompt_token_ids[: rng.randrange(n + 1)], *range(rng.randrange(1, 80))]
                add(scheduler, rng, rid, ids, final=rng.random() < 0.25, op="update" if update else "append")
        elif op < 0.93:
            ids = list(range(rng.randrange(4, 90)))
            one_shot = make_request(scheduler, f"o{i}", ids, max_tokens=3, final=True, resumable=False)
            scheduler.add_request(with_policy(one_shot, rng))
        elif sessions:
            scheduler.finish_requests(rng.choice(sessions), compat.RequestStatus.FINISHED_ABORTED)
    while in_flight:
        finish_step(scheduler, in_flight.popleft())


def add(scheduler, rng: random.Random, rid: str, ids, final: bool, op: str = "append") -> None:
    if isinstance(ids, int):
        ids = [rng.randrange(1, 500) for _ in range(ids)]
    request = make_request(scheduler, rid, ids or [1], op=op, final=final)
    scheduler.add_request(with_policy(request, rng))


def with_policy(request, rng: random.Random):
    """One chunk in ten switches the engine's policy (``Broker.follow_chunk_policy``)."""
    if rng.random() < 0.1:
        request.sampling_params.extra_args[CONFIG_KEY]["policy"] = rng.choice(POLICIES)
    return request


@pytest.mark.parametrize("seed", range(0, 7))
@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "async"])
def test_the_incremental_step_decides_as_the_straightforward_one(tiny_model, monkeypatch, seed, pipelined):
    rng = random.Random(seed)
    scheduler = make_scheduler(
        str(tiny_model.path),
        num_blocks=rng.choice([24, 48, 200]),
        policy="stream2llm",
        max_num_batched_tokens=64,
        async_scheduling=pipelined,
        parked_kv_cap=rng.choice([0.3, 1.0]),
    )
    checked = Checked(scheduler, monkeypatch)
    random_run(scheduler, rng, 250, pipelined)
    assert checked.steps > 20
    assert scheduler.broker.book.rebuilds == 0  # every change reached the book through a hook


def test_the_book_catches_up_with_a_change_no_hook_reported(tiny_model, monkeypatch):
    """A parked session vLLM holds but the book never heard of: the parked count disagrees, so
    the book reads every request again and still decides as the reference."""
    scheduler = make_scheduler(str(tiny_model.path), policy="stream2llm", max_num_batched_tokens=64)
    checked = Checked(scheduler, monkeypatch)
    for rid in ("a", "b"):
        scheduler.add_request(make_request(scheduler, rid, list(range(100, 140))))
    run_until_idle(scheduler)
    assert compat.parked_count(scheduler) == 2 and scheduler.broker.book.rebuilds == 0
    scheduler.broker.book.forget("a")
    scheduler.add_request(make_request(scheduler, "late", list(range(30)), final=True, resumable=False))
    schedule_step(scheduler)
    assert scheduler.broker.book.rebuilds == 1 and checked.steps > 1


def test_a_prefix_cache_reset_that_preempts_the_running_requests_reaches_the_book(tiny_model, monkeypatch):
    """vLLM preempts every running request there and names them only in its next step's output,
    after the broker's step: the scheduler tells the book itself."""
    scheduler = make_scheduler(str(tiny_model.path), policy="stream2llm", max_num_batched_tokens=256)
    checked = Checked(scheduler, monkeypatch)
    for rid, n in (("long", 300), ("short", 90)):
        request = make_request(scheduler, rid, list(range(n)), max_tokens=5, final=True, resumable=False)
        scheduler.add_request(request)
    finish_step(scheduler, schedule_step(scheduler))
    assert compat.running_ids(scheduler) == {"long", "short"}
    broker = scheduler.broker
    broker.plan(broker.policy(), 0.0)  # the book is up to date
    assert scheduler.reset_prefix_cache(reset_running_requests=True)
    assert compat.computed_tokens(scheduler.requests["long"]) == 0
    broker.plan(broker.policy(), 0.0)
    assert checked.steps == 3
