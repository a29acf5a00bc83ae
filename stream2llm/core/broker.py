"""The broker: applies a policy's decision through vLLM's own levers before each step.

A policy (``policies.py``, pure) ranks the requests that want compute and, when KV is short, names
victims and how each gives its KV back. The broker builds the policy's view of each request,
orders vLLM's running list and waiting queues by the ranking, evicts the KV of waiting victims
(parked sessions first; their blocks queued for the KV tier first where the policy chose to
offload), and defers a partial stream's running prefill that ranks below a waiting complete
stream. ``super().schedule()`` then allocates as usual; vLLM's allocator preempts from the end of
the ranked running list if it still runs short.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from stream2llm.core import vllm_compat as compat
from stream2llm.core.policies import OFFLOAD, Costs, Policy, VllmPolicy, make_policy
from stream2llm.core.step_log import Eviction
from stream2llm.core.streams import StreamTracker
from stream2llm.core.view_book import ViewBook
from stream2llm.tokens import ceil_div


@dataclass
class Plan:
    """What the broker does before one step."""

    order: list[str]  # requests that want compute, best first
    short: int = 0  # blocks the top-ranked work lacks (``Broker._blocks_short``)
    victims: list[tuple[str, str]] = field(default_factory=list)  # (request_id, mode)
    deferred: list[str] = field(default_factory=list)  # running prefills that wait a step
    rank: dict[str, int] = field(default_factory=dict, compare=False, repr=False)  # place in order


class Broker:
    """Applies the current policy to the scheduler it serves; counts what it did."""

    def __init__(
        self,
        scheduler: compat.Scheduler,
        streams: StreamTracker,
        policy: str,
        parked_kv_cap: float,
        costs: Costs | None = None,
        preemption: str = "recompute",
    ) -> None:
        self._scheduler = scheduler
        self._streams = streams
        self.policy_name = policy
        self.preemption = preemption
        self.parked_kv_cap = parked_kv_cap  # fraction of KV blocks parked sessions may hold
        self._costs = costs
        self._tier = compat.kv_tier(scheduler)  # the engine's connector, where it can offload
        self._policies: dict[tuple[str, str], Policy] = {}
        self.book = ViewBook(scheduler, streams)  # every request's view, kept between steps
        self._queues = compat.QueueMemo()  # how the last step left vLLM's queues
        self.evictions = 0
        self.offloads = 0
        self.evicted_last: list[Eviction] = []  # before the last step: id, tokens, blocks, how
        self.short_last = 0  # blocks the top-ranked work lacked before the last step
        self.evictions_waited = 0  # victims left for a step because a step of theirs was in flight
        self.deferrals = 0

    def follow_chunk_policy(self, name: str | None, preemption: str | None = None) -> None:
        """The front end names a policy and a way to give KV back in each chunk's metadata
        (``ChunkMeta``) and the engine's one global policy switches to it. Kept as it is for now:
        both belong in the engine's configuration, not in every chunk."""
        if name:
            self.policy_name = name
        if preemption:
            self.preemption = preemption

    def policy(self) -> Policy:
        key = (self.policy_name, self.preemption)
        if key not in self._policies:
            try:
                self._policies[key] = make_policy(key[0], self._costs, key[1], self._tier is not None)
            except ValueError:  # never take the engine down over a name; the front end validates
                self._policies[key] = VllmPolicy()
        return self._policies[key]

    def touch(self, request_ids: Iterable[str]) -> None:
        """These requests may have changed since the last step (the scheduler's hooks say so)."""
        self.book.touch(request_ids)

    def apply(self) -> None:
        """Before a step: rank, reorder vLLM's queues, defer and evict as the policy decides."""
        scheduler = self._scheduler
        policy = self.policy()
        self.evicted_last, self.short_last = [], 0
        if isinstance(policy, VllmPolicy) or not compat.num_requests(scheduler):
            return
        plan = self.plan(policy, time.monotonic())
        self.short_last = plan.short
        if plan.deferred:
            for request in compat.running_requests(scheduler):
                if request.request_id in plan.deferred:
                    compat.defer_running_prefill(scheduler, request)
                    self.deferrals += 1
            self.book.touch(plan.deferred)
        compat.rank_queues(scheduler, plan.rank, self._queues)
        if plan.victims:
            self._evict_waiting(plan.victims, plan.order[0] if plan.order else None)

    def plan(self, policy: Policy, now: float) -> Plan:
        """The policy's decision on the book's views: ranking, blocks short, victims, deferrals.
        Nothing here changes the scheduler, so a test may compare it with one from scratch."""
        book, running = self.book, compat.running_ids(self._scheduler)
        book.refresh(policy, now, running)
        order, rank = book.ranking.order(), book.ranking.rank()
        waiting = [rid for rid in order if rid not in running]  # ranked, not running
        short = self._blocks_short(waiting)
        victims = []
        if short > 0:
            views = book.views
            victims = policy.victims([views[rid] for rid in order], book.in_vllm_order(), short, now)
        return Plan(order, short, victims, self._outranked_prefills(waiting, rank), rank)

    def _evict_waiting(self, victims: list[tuple[str, str]], first: str | None) -> None:
        """Free the KV of victims that are not running, their blocks first queued for the KV tier
        where the policy chose to offload them (else they recompute when they resume); running
        victims are left to vLLM's allocator, which preempts (recomputes) from the end of the
        ranked list. The top-ranked request is never a victim. A victim with a step still in
        flight (async scheduling: a prefill deferred this step) waits for that step's output; the
        next step evicts it if it is still a victim."""
        running = compat.running_ids(self._scheduler)
        for rid, mode in victims:
            request = compat.find_request(self._scheduler, rid)
            if request is None or rid in running or rid == first:
                continue
            if compat.step_in_flight(request):
                self.evictions_waited += 1
                continue
            tokens = compat.computed_tokens(request)
            offloaded = mode == OFFLOAD and self._tier is not None
            if offloaded:
                self._tier.offload(request)
                self.offloads += 1
            blocks = compat.evict_waiting_kv(self._scheduler, request)
            self.book.touch((rid,))
            kind = OFFLOAD if offloaded else "recompute"
            self.evicted_last.append((compat.external_request_id(rid), tokens, blocks, kind))
            self.evictions += 1

    def _blocks_short(self, waiting: list[str]) -> int:
        """Blocks the top-ranked waiting work of one step needs beyond what is free, or the
        excess of parked KV over its cap, whichever is larger. A waiting request needs blocks
        for its whole prompt, not this step's chunk, where vLLM admits only whole prompts
        (``admits_whole_prompts``): counting the chunk freed nothing for a long final that vLLM
        then refused, and the engine idled for seconds while parked sessions held the KV."""
        scheduler = self._scheduler
        by_id = self.book.current  # waiting requests' views are up to date there
        whole = compat.admits_whole_prompts(scheduler)
        budget, want = compat.token_budget(scheduler), 0
        block_size = compat.block_size(scheduler)
        for rid in waiting:
            if budget <= 0:
                break  # nothing further takes a token
            v = by_id[rid]
            take = min(v.tokens_pending, budget)
            budget -= take
            admitted = v.tokens_pending if whole else take
            want += max(ceil_div(v.tokens_computed + admitted, block_size) - v.blocks_held, 0)
        short = want - compat.free_block_count(scheduler)
        over_cap = self.book.parked_blocks - int(self.parked_kv_cap * compat.total_block_count(scheduler))
        return max(short, over_cap, 0)

    def _outranked_prefills(self, waiting: list[str], rank: dict[str, int]) -> list[str]:
        """vLLM gives this step's tokens to running requests before waiting ones; a partial
        stream's prefill that ranks below a waiting complete stream (a final chunk on the TTFT
        clock) waits a step instead. Complete streams are not preempted for one another: the
        churn (deferring and resuming) cost more at the median than reordering them gained."""
        to_compute = self.book.to_compute
        top = next((rid for rid in waiting if to_compute[rid] > 0), None)
        if top is None or not self._streams.is_complete(top):
            return []
        place = rank[top]
        return [
            r.request_id
            for r in compat.running_requests(self._scheduler)
            if rank.get(r.request_id, 0) > place
            and not self._streams.is_complete(r.request_id)
            and compat.is_prefilling(r)
        ]
