"""Scheduling policies: pure functions from request views to a decision. No vLLM imports here.

A policy ranks the requests that want compute (best first) and, when KV memory is short, names
victims with a preemption mode. The broker in ``broker.py`` applies the decision through vLLM's
own levers (order of the running list and of the waiting queues, eviction of parked sessions);
vLLM's allocator then preempts from the end of the ranked running list if it still runs short.

Published policies (Stream2LLM, MLSys 2026), reproduced for comparison:

- ``vllm``: stock order (running first in admission order, then waiting FIFO); parked sessions are
  never preempted.
- ``fcfs``: complete streams first, by query arrival; then partial streams by arrival. Victims:
  the lowest-ranked requests holding KV.
- ``lcas``: as fcfs, keyed on the arrival of each request's latest chunk.
- ``mcps``: most tokens already computed first, ties by arrival; ignores complete/partial.

``stream2llm`` (ours) is cost-aware and arrival-aware:

1. Rank: complete streams first (they are on the TTFT clock), shortest remaining prefill first
   (what is left is the final chunk plus any backlog: the chunk in work and those queued behind
   it; serving the short ones first minimizes the median and the mean wait), ties by the hand-off
   of the final chunk; then partial streams, also shortest remaining first (ties by query
   arrival): a new session's short opening chunk or a small next chunk is not left behind an
   older stream's large backlog (ranked by arrival, openings waited seconds under load while the
   session's front end held all of its context, so the stream degenerated to one-shot).
2. Victims, only when the top-ranked work cannot get the blocks it needs: parked sessions first,
   cheapest first by what losing their KV is expected to cost per block freed and per second
   until their next chunk (KV that would sit idle longest and is cheapest to bring back goes
   first; a session with no expected next chunk goes before any); then partial streams waiting
   for blocks, lowest-ranked first; a complete stream only as a last resort (it is on the TTFT
   clock, but a memory full of waiting streams would otherwise deadlock).
3. Mode per victim (every policy, ``Policy.mode``): with a KV tier, offload when the cost model
   expects saving its KV now and loading it on return to cost less than recomputing it on return
   (each weighted by the chance it returns within its TTL); else recompute. An evicted session
   keeps its prefix-cache hashes, so blocks nobody reused before it returns come back for free
   either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from stream2llm.core.cost_profile import CostProfile

RECOMPUTE, OFFLOAD = "recompute", "offload"


@dataclass(slots=True)
class RequestView:
    """What a policy may know about one request; read only by convention (policies are pure).
    Not frozen: a frozen dataclass took 1.9 us to build and the broker builds one for every
    request that changed before each step; a slotted one takes 0.3 us and keeps attribute reads
    as fast (a named tuple's are twice as slow in Python 3.11, and policies read them in sorts)."""

    request_id: str
    arrival: float  # query arrival (its first chunk)
    last_chunk_arrival: float
    complete: bool  # the final chunk has been received
    parked: bool  # waiting for its next chunk, holding KV
    tokens_computed: int
    tokens_pending: int  # tokens to prefill now (1 when decoding, 0 when parked)
    blocks_held: int
    next_chunk_eta: float = math.inf  # expected arrival of the next chunk (same clock); inf if unknown
    tokens_queued: int = 0  # chunks that wait in the engine behind the one in work (a final, say)


PREEMPTIONS = ("recompute", "offload", "cost")  # how a victim's KV is given back (``Policy.mode``)


@dataclass(frozen=True)
class Costs:
    """What giving a victim's KV back costs (seconds for n tokens): recomputing it when the session
    returns, and, where the engine has a KV tier, saving it there now and loading it back then.
    ``horizon_s`` is how long a session may stay away (its TTL): one not expected back within it
    is not worth saving."""

    recompute_s: Callable[[int], float] = lambda tokens: tokens * 2e-5
    save_s: Callable[[int], float] | None = None  # None: no tier, every victim recomputes
    load_s: Callable[[int], float] | None = None
    horizon_s: float = math.inf

    @classmethod
    def from_profile(
        cls, profile: CostProfile, kv_bytes_per_token: int | None = None, horizon_s: float = math.inf
    ) -> Costs:
        """A cost profile's curves at this engine's KV geometry (the profile's when not given).
        Recomputing a victim costs its tokens' share of the steps that compute them
        (``chunk_s``, attention included), not a step's fixed cost: those steps run anyway."""
        recompute = lambda tokens: profile.chunk_s(tokens, 0)  # noqa: E731
        if not profile.offload:
            return cls(recompute, horizon_s=horizon_s)
        return cls(
            recompute,
            lambda tokens: profile.save_s(tokens, kv_bytes_per_token),
            lambda tokens: profile.load_s(tokens, kv_bytes_per_token),
            horizon_s,
        )

    @property
    def can_offload(self) -> bool:
        return self.save_s is not None and self.load_s is not None

    def return_chance(self, view: RequestView, now: float) -> float:
        """The chance the session comes back for its KV: 0 when its next chunk is expected past
        the horizon (it would be aborted first), else 1 (a session's chunks keep coming)."""
        return 0.0 if view.next_chunk_eta - now > self.horizon_s else 1.0

    def expected_s(self, view: RequestView, mode: str, now: float) -> float:
        """Expected seconds the engine spends on a victim's KV: saving now and loading on return
        (offload), or recomputing on return (recompute), each weighted by the return chance."""
        tokens, back = view.tokens_computed, self.return_chance(view, now)
        if mode == OFFLOAD:
            assert self.save_s is not None and self.load_s is not None
            return self.save_s(tokens) + back * self.load_s(tokens)
        return back * self.recompute_s(tokens)


@dataclass
class Decision:
    order: list[str]  # requests that want compute, best first
    victims: list[tuple[str, str]] = field(default_factory=list)  # (request_id, mode)


def _holding(views: Sequence[RequestView]) -> list[RequestView]:
    return [v for v in views if v.blocks_held > 0]


def _victims_in_reverse_rank(
    ranked: Sequence[RequestView],
    views: Sequence[RequestView],
    blocks_needed: int,
    mode: Callable[[RequestView], str],
) -> list[tuple[str, str]]:
    """Published rule: lowest-ranked requests holding KV first, until enough blocks are free."""
    position = {v.request_id: i for i, v in enumerate(ranked)}
    holders = sorted(_holding(views), key=lambda v: -position.get(v.request_id, len(ranked) + 1))
    out, freed = [], 0
    for v in holders:
        if freed >= blocks_needed:
            break
        out.append((v.request_id, mode(v)))
        freed += v.blocks_held
    return out


class Policy:
    """Ranks the requests that want compute and names victims when KV is short, each with the way
    its KV is given back (``preemption``: always recompute, always offload to the tier, or by
    ``costs``); side-effect free, so the engine's broker and the simulator apply the same
    decisions."""

    def __init__(
        self, costs: Costs | None = None, preemption: str = "cost", has_tier: bool | None = None
    ) -> None:
        if preemption not in PREEMPTIONS:
            raise ValueError(f"unknown preemption {preemption!r}; known: {', '.join(PREEMPTIONS)}")
        self.costs = costs or Costs()
        self.preemption = preemption
        self.has_tier = self.costs.can_offload if has_tier is None else has_tier  # somewhere to offload to

    # A session whose updates threw away more than this share of the tokens prefilled for it stops
    # speculating (``core.speculation``); None: never (the published policies).
    speculation_gate: float | None = None

    # The view fields ``key`` reads: the broker skips rebuilding a running request's view and key
    # while only fields outside them change (a decoding request's tokens and blocks each step).
    key_fields: frozenset[str] = frozenset(f.name for f in fields(RequestView))

    def key(self, view: RequestView) -> Any:
        """The ranking's sort key of one request (smallest first; ties keep the given order):
        a function of the view's ``key_fields`` alone, so the broker keeps it until they change."""
        raise NotImplementedError

    def rank(self, views: Sequence[RequestView]) -> list[RequestView]:
        return sorted(views, key=self.key)

    def victims(
        self, ranked: Sequence[RequestView], views: Sequence[RequestView], blocks_needed: int, now: float
    ) -> list[tuple[str, str]]:
        return _victims_in_reverse_rank(ranked, views, blocks_needed, lambda v: self.mode(v, now))

    def mode(self, view: RequestView, now: float = 0.0) -> str:
        """Offload or recompute one victim: recompute where there is no tier or the engine is told
        to; offload where told to; else whichever the cost model expects to cost less (recompute
        where the model knows no tier costs)."""
        if self.preemption == RECOMPUTE or not self.has_tier:
            return RECOMPUTE
        if self.preemption == OFFLOAD:
            return OFFLOAD
        if not self.costs.can_offload:
            return RECOMPUTE
        offload = self.costs.expected_s(view, OFFLOAD, now)
        return OFFLOAD if offload < self.costs.expected_s(view, RECOMPUTE, now) else RECOMPUTE

    def give_back_s(self, view: RequestView, now: float) -> float:
        """Expected seconds giving this victim's KV back costs, the way ``mode`` would."""
        return self.costs.expected_s(view, self.mode(view, now), now)

    def decide(self, views: Sequence[RequestView], blocks_needed: int = 0, now: float = 0.0) -> Decision:
        active = [v for v in views if not v.parked]
        ranked = self.rank(active)
        victims = self.victims(ranked, views, blocks_needed, now) if blocks_needed > 0 else []
        return Decision([v.request_id for v in ranked], victims)


class VllmPolicy(Policy):
    key_fields = frozenset()

    def key(self, view: RequestView) -> Any:
        return 0  # keep vLLM's own order

    def rank(self, views: Sequence[RequestView]) -> list[RequestView]:
        return list(views)

    def victims(
        self, ranked: Sequence[RequestView], views: Sequence[RequestView], blocks_needed: int, now: float
    ) -> list[tuple[str, str]]:
        return []  # stock vLLM never preempts a parked session


class FcfsPolicy(Policy):
    key_fields = frozenset({"complete", "arrival"})

    def key(self, view: RequestView) -> Any:
        return (not view.complete, view.arrival)


class LcasPolicy(Policy):
    key_fields = frozenset({"complete", "last_chunk_arrival"})

    def key(self, view: RequestView) -> Any:
        return (not view.complete, view.last_chunk_arrival)


class McpsPolicy(Policy):
    key_fields = frozenset({"tokens_computed", "arrival"})

    def key(self, view: RequestView) -> Any:
        return (-view.tokens_computed, view.arrival)


class Stream2llmPolicy(Policy):
    key_fields = frozenset({"complete", "tokens_pending", "tokens_queued", "last_chunk_arrival", "arrival"})
    # a speculated token saves its prefill at the final if kept, and costs as much compute if
    # thrown away, which a loaded engine takes from someone's final: it pays while more is kept
    # than thrown away
    speculation_gate = 0.5

    def key(self, view: RequestView) -> Any:
        if view.complete:
            return (0, view.tokens_pending + view.tokens_queued, view.last_chunk_arrival)
        return (1, view.tokens_pending + view.tokens_queued, view.arrival)

    def victims(
        self, ranked: Sequence[RequestView], views: Sequence[RequestView], blocks_needed: int, now: float
    ) -> list[tuple[str, str]]:
        parked = [v for v in views if v.parked and v.blocks_held > 0]
        parked.sort(key=lambda v: (self._parked_cost(v, now), -(v.next_chunk_eta - now), -v.blocks_held))
        position = {v.request_id: i for i, v in enumerate(ranked)}
        holding = sorted(
            (v for v in views if not v.parked and v.blocks_held > 0),
            key=lambda v: -position.get(v.request_id, 0),
        )
        partial = [v for v in holding if not v.complete]
        complete = [v for v in holding if v.complete]  # last resort: only to break a deadlock
        out, freed = [], 0
        for v in [*parked, *partial, *complete]:
            if freed >= blocks_needed:
                break
            out.append((v.request_id, self.mode(v, now)))
            freed += v.blocks_held
        return out

    def _parked_cost(self, view: RequestView, now: float) -> float:
        """A parked victim's price: the expected seconds to give its KV back, per block it frees,
        per second until its next chunk (the KV would sit idle that long): the cheapest KV to
        lose, held the longest for nothing, goes first; one not expected back at all costs 0."""
        idle_s = view.next_chunk_eta - now
        if math.isinf(idle_s):
            return 0.0
        per_block = self.give_back_s(view, now) / max(view.blocks_held, 1)
        return per_block / max(idle_s, 1e-3)


POLICIES: dict[str, Callable[[Costs | None, str, bool | None], Policy]] = {
    "vllm": VllmPolicy,
    "fcfs": FcfsPolicy,
    "lcas": LcasPolicy,
    "mcps": McpsPolicy,
    "stream2llm": Stream2llmPolicy,
}


def make_policy(
    name: str, costs: Costs | None = None, preemption: str = "cost", has_tier: bool | None = None
) -> Policy:
    """A policy by name; ``has_tier`` says whether the engine can offload (default: whether
    ``costs`` knows a tier's costs)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name](costs, preemption, has_tier)
