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
   those whose next chunk is expected furthest in the future first (their KV would sit idle the
   longest), and among those the ones that free the most blocks; then partial streams waiting
   for blocks, lowest-ranked first; a complete stream only as a last resort (it is on the TTFT
   clock, but a memory full of waiting streams would otherwise deadlock).
3. Mode per victim: offload when the cost model says moving its bytes out and back is cheaper than
   recomputing its tokens and the engine can offload; else recompute. An evicted parked session
   keeps its prefix-cache hashes, so if its blocks are not reused before it returns, "recompute"
   costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

RECOMPUTE, OFFLOAD = "recompute", "offload"


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a policy may know about one request."""

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


@dataclass(frozen=True)
class Costs:
    """Cost estimates a policy may consult (seconds)."""

    recompute_s: Callable[[int], float] = lambda tokens: tokens * 2e-5
    offload_roundtrip_s: Callable[[int], float] | None = None  # tokens -> seconds; None: cannot offload


@dataclass
class Decision:
    order: list[str]  # requests that want compute, best first
    victims: list[tuple[str, str]] = field(default_factory=list)  # (request_id, mode)


def _holding(views: Sequence[RequestView]) -> list[RequestView]:
    return [v for v in views if v.blocks_held > 0]


def _victims_in_reverse_rank(
    ranked: Sequence[RequestView], views: Sequence[RequestView], blocks_needed: int
) -> list[tuple[str, str]]:
    """Published rule: lowest-ranked requests holding KV first, until enough blocks are free."""
    position = {v.request_id: i for i, v in enumerate(ranked)}
    holders = sorted(_holding(views), key=lambda v: -position.get(v.request_id, len(ranked) + 1))
    out, freed = [], 0
    for v in holders:
        if freed >= blocks_needed:
            break
        out.append((v.request_id, RECOMPUTE))
        freed += v.blocks_held
    return out


class Policy:
    """Ranks the requests that want compute and names victims when KV is short; side-effect free,
    so the engine's broker and the simulator apply the same decisions."""

    def rank(self, views: Sequence[RequestView]) -> list[RequestView]:
        raise NotImplementedError

    def victims(
        self, ranked: Sequence[RequestView], views: Sequence[RequestView], blocks_needed: int, now: float
    ) -> list[tuple[str, str]]:
        return _victims_in_reverse_rank(ranked, views, blocks_needed)

    def decide(self, views: Sequence[RequestView], blocks_needed: int = 0, now: float = 0.0) -> Decision:
        active = [v for v in views if not v.parked]
        ranked = self.rank(active)
        victims = self.victims(ranked, views, blocks_needed, now) if blocks_needed > 0 else []
        return Decision([v.request_id for v in ranked], victims)


class VllmPolicy(Policy):
    def rank(self, views: Sequence[RequestView]) -> list[RequestView]:
        return list(views)  # keep vLLM's own order

    def victims(
        self, ranked: Sequence[RequestView], views: Sequence[RequestView], blocks_needed: int, now: float
    ) -> list[tuple[str, str]]:
        return []  # stock vLLM never preempts a parked session


class FcfsPolicy(Policy):
    def rank(self, views: Sequence[RequestView]) -> list[RequestView]:
        return sorted(views, key=lambda v: (not v.complete, v.arrival))


class LcasPolicy(Policy):
    def rank(self, views: Sequence[RequestView]) -> list[RequestView]:
        return sorted(views, key=lambda v: (not v.complete, v.last_chunk_arrival))


class McpsPolicy(Policy):
    def rank(self, views: Sequence[RequestView]) -> list[RequestView]:
        return sorted(views, key=lambda v: (-v.tokens_computed, v.arrival))


class Stream2llmPolicy(Policy):
    def __init__(self, costs: Costs | None = None) -> None:
        self.costs = costs or Costs()

    def rank(self, views: Sequence[RequestView]) -> list[RequestView]:
        return sorted(
            views,
            key=lambda v: (
                (0, v.tokens_pending + v.tokens_queued, v.last_chunk_arrival)
                if v.complete
                else (1, v.tokens_pending + v.tokens_queued, v.arrival)
            ),
        )

    def victims(
        self, ranked: Sequence[RequestView], views: Sequence[RequestView], blocks_needed: int, now: float
    ) -> list[tuple[str, str]]:
        parked = [v for v in views if v.parked and v.blocks_held > 0]
        # furthest next chunk first; then the most blocks (fewest victims)
        parked.sort(key=lambda v: (-(v.next_chunk_eta - now), -v.blocks_held))
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
            out.append((v.request_id, self.mode(v)))
            freed += v.blocks_held
        return out

    def mode(self, view: RequestView) -> str:
        offload = self.costs.offload_roundtrip_s
        if offload is not None and offload(view.tokens_computed) < self.costs.recompute_s(
            view.tokens_computed
        ):
            return OFFLOAD
        return RECOMPUTE


POLICIES: dict[str, Callable[[], Policy]] = {
    "vllm": VllmPolicy,
    "fcfs": FcfsPolicy,
    "lcas": LcasPolicy,
    "mcps": McpsPolicy,
    "stream2llm": Stream2llmPolicy,
}


def make_policy(name: str, costs: Costs | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return Stream2llmPolicy(costs) if name == "stream2llm" else POLICIES[name]()
