"""Policies on synthetic request views (no model, no vLLM)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from stream2llm.core.policies import (
    OFFLOAD,
    POLICIES,
    RECOMPUTE,
    Costs,
    RequestView,
    Stream2llmPolicy,
    make_policy,
)


def view(
    rid,
    arrival,
    *,
    last=None,
    complete=False,
    parked=False,
    computed=0,
    pending=10,
    blocks=1,
    eta=math.inf,
    queued=0,
):
    last = arrival if last is None else last
    return RequestView(rid, arrival, last, complete, parked, computed, pending, blocks, eta, queued)


VIEWS = [
    view("a", 1.0, last=5.0, complete=False, computed=500),
    view("b", 2.0, last=3.0, complete=True, computed=100),
    view("c", 3.0, last=4.0, complete=True, computed=900),
    view("d", 0.5, last=6.0, complete=False, computed=50),
    view("p", 0.1, parked=True, pending=0, blocks=8, eta=10.0),
]


@pytest.mark.parametrize(
    ("name", "order"),
    [
        ("vllm", ["a", "b", "c", "d"]),  # vLLM's own order is kept
        ("fcfs", ["b", "c", "d", "a"]),  # complete first, then partial, each by arrival
        ("lcas", ["b", "c", "a", "d"]),  # complete first, then partial, by latest chunk
        ("mcps", ["c", "a", "b", "d"]),  # most computed first
        ("stream2llm", ["b", "c", "d", "a"]),  # least pending first, complete then partial
    ],
)
def test_ranking(name, order):
    assert make_policy(name).decide(VIEWS).order == order


def test_stream2llm_serves_a_new_streams_opening_chunk_before_an_older_streams_big_chunk():
    """Ranked by arrival, a new session's 40-token opening chunk waited behind every older partial
    stream's backlog (seconds under load), and its front end held all its context meanwhile."""
    views = [
        view("old-big", 1.0, complete=False, pending=8000),
        view("old-queued", 1.5, complete=False, pending=20, queued=3000),
        view("new-opening", 9.0, complete=False, pending=40),
        view("final", 5.0, complete=True, pending=900),
    ]
    order = make_policy("stream2llm").decide(views).order
    assert order == ["final", "new-opening", "old-queued", "old-big"]
    assert make_policy("fcfs").decide(views).order == ["final", "old-big", "old-queued", "new-opening"]


def test_parked_sessions_are_never_ranked_and_vllm_never_evicts_them():
    assert "p" not in make_policy("fcfs").decide(VIEWS).order
    assert make_policy("vllm").decide(VIEWS, blocks_needed=100).victims == []


def test_published_victims_are_lowest_ranked_holders_first():
    victims = make_policy("fcfs").decide(VIEWS, blocks_needed=9).victims
    assert victims[0] == ("p", RECOMPUTE)  # parked: not ranked at all, so lowest
    assert [rid for rid, _ in victims] == ["p", "a"]  # 8 blocks + 1 block >= 9


def test_stream2llm_evicts_parked_with_the_furthest_next_chunk_first():
    now = 100.0
    views = [
        view("soon", 0, parked=True, pending=0, computed=512, blocks=4, eta=now + 0.1),
        view("late", 0, parked=True, pending=0, computed=256, blocks=2, eta=now + 9.0),
        view("later-big", 0, parked=True, pending=0, computed=768, blocks=6, eta=now + 9.0),
        view("run", 0, complete=True, blocks=3),
        view("partial", 0, complete=False, blocks=5),
    ]
    policy = Stream2llmPolicy()
    assert [r for r, _ in policy.decide(views, blocks_needed=7, now=now).victims] == ["later-big", "late"]
    everything = [r for r, _ in policy.decide(views, blocks_needed=100, now=now).victims]
    # then partial streams; a complete stream only as the last resort (a full memory would deadlock)
    assert everything == ["later-big", "late", "soon", "partial", "run"]
    assert "run" not in [r for r, _ in policy.decide(views, blocks_needed=17, now=now).victims]


def test_parked_victims_go_cheapest_to_lose_per_block_and_idle_second_first():
    """Same next chunk, same blocks: the one whose KV is cheaper to bring back goes first; a far
    next chunk outweighs a dearer context (its blocks would sit idle that much longer)."""
    now = 0.0
    quadratic = Costs(recompute_s=lambda t: 1e-9 * t * t)
    short = view("short", 0, parked=True, pending=0, computed=1_000, blocks=8, eta=5.0)
    long = view("long", 0, parked=True, pending=0, computed=8_000, blocks=8, eta=5.0)
    policy = Stream2llmPolicy(quadratic)
    assert [r for r, _ in policy.decide([long, short], blocks_needed=8, now=now).victims] == ["short"]
    far_long = view("long", 0, parked=True, pending=0, computed=8_000, blocks=8, eta=500.0)
    assert [r for r, _ in policy.decide([far_long, short], blocks_needed=8, now=now).victims] == ["long"]


TIER_CHEAP = Costs(recompute_s=lambda t: t * 1e-4, save_s=lambda t: t * 1e-6, load_s=lambda t: t * 4e-6)
TIER_DEAR = Costs(recompute_s=lambda t: t * 1e-6, save_s=lambda t: t * 1e-3, load_s=lambda t: t * 1e-3)


def test_mode_offloads_only_when_cheaper_and_a_tier_exists():
    big = view("x", 0, parked=True, pending=0, computed=10_000, blocks=80, eta=50)
    assert Stream2llmPolicy().mode(big) == RECOMPUTE  # no tier
    assert Stream2llmPolicy(TIER_CHEAP).mode(big) == OFFLOAD
    assert Stream2llmPolicy(TIER_DEAR).mode(big) == RECOMPUTE


def test_preemption_setting_overrides_the_cost_model_but_not_a_missing_tier():
    big = view("x", 0, parked=True, pending=0, computed=10_000, blocks=80, eta=50)
    assert make_policy("stream2llm", TIER_CHEAP, "recompute").mode(big) == RECOMPUTE
    assert make_policy("stream2llm", TIER_DEAR, "offload").mode(big) == OFFLOAD
    assert make_policy("stream2llm", None, "offload").mode(big) == RECOMPUTE  # nowhere to offload to
    with pytest.raises(ValueError, match="unknown preemption 'swap'"):
        make_policy("stream2llm", TIER_CHEAP, "swap")


def test_a_session_not_expected_back_within_its_ttl_is_not_saved():
    costs = Costs(TIER_CHEAP.recompute_s, TIER_CHEAP.save_s, TIER_CHEAP.load_s, horizon_s=60.0)
    soon = view("x", 0, parked=True, pending=0, computed=10_000, blocks=80, eta=50)
    never = view("y", 0, parked=True, pending=0, computed=10_000, blocks=80, eta=500)
    assert Stream2llmPolicy(costs).mode(soon) == OFFLOAD
    assert Stream2llmPolicy(costs).mode(never) == RECOMPUTE  # saving it would be wasted work


def test_the_cost_model_recomputes_short_contexts_and_offloads_long_ones():
    """A tier with a fixed cost per transfer against attention that grows with context: the
    decision crosses over at the context length where the two curves meet."""
    costs = Costs(
        recompute_s=lambda t: 2e-5 * t + 5e-9 * t * t,
        save_s=lambda t: 0.02 + 1e-6 * t,
        load_s=lambda t: 0.02 + 1e-6 * t,
    )
    policy = Stream2llmPolicy(costs)
    modes = {t: policy.mode(view("x", 0, parked=True, pending=0, computed=t, eta=1.0)) for t in (256, 8192)}
    assert modes == {256: RECOMPUTE, 8192: OFFLOAD}


def test_published_policies_take_the_same_mode_decision():
    victims = (
        make_policy("fcfs", TIER_CHEAP)
        .decide([view("p", 0, parked=True, pending=0, computed=10_000, blocks=8)], blocks_needed=8)
        .victims
    )
    assert victims == [("p", OFFLOAD)]


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="unknown policy 'lifo'"):
        make_policy("lifo")


def test_stream2llm_serves_the_shortest_final_chunk_first():
    views = [
        view("big", 0.0, last=1.0, complete=True, pending=3000),
        view("small", 5.0, last=2.0, complete=True, pending=40),
        view("small-later", 6.0, last=3.0, complete=True, pending=40),
        view("partial", 0.0, complete=False, pending=10),
    ]
    assert make_policy("stream2llm").decide(views).order == ["small", "small-later", "big", "partial"]
    assert make_policy("fcfs").decide(views).order == ["big", "small", "small-later", "partial"]


def test_stream2llm_counts_chunks_queued_behind_the_one_in_work():
    """A final chunk that waits in the engine behind a chunk still in work is part of what is
    left: ranking by the chunk in work alone put such streams ahead of shorter ones."""
    views = [
        dataclasses.replace(view("late", 0.0, last=1.0, complete=True, pending=100), tokens_queued=2000),
        view("short", 5.0, last=2.0, complete=True, pending=400),
    ]
    assert make_policy("stream2llm").decide(views).order == ["short", "late"]


def _other(value, rng: random.Random):
    """Another value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.randrange(1, 5000)
    if isinstance(value, float):
        return rng.random() * 10
    return value + "-other"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_policys_key_reads_only_its_key_fields(name):
    """The broker keeps a running request's key while only fields outside ``key_fields`` change;
    a field the key reads but does not declare would keep a stale key (and a wrong ranking)."""
    policy, rng = make_policy(name), random.Random(name)
    for _ in range(200):
        base = view(
            "r", rng.random(), last=rng.random(), complete=rng.random() < 0.5, pending=rng.randrange(1, 99)
        )
        names = [f.name for f in dataclasses.fields(RequestView) if f.name not in policy.key_fields]
        changed = {name: _other(getattr(base, name), rng) for name in names}
        assert policy.key(dataclasses.replace(base, **changed)) == policy.key(base)
