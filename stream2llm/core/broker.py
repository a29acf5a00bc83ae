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

from stream2llm.core import vllm_compat as compat
from stream2llm.core.policies import OFFLOAD, Costs, Policy, RequestView, VllmPolicy, make_policy
from stream2llm.core.protocol import ChunkMeta
from stream2llm.core.step_log import Eviction
from stream2llm.core.streams import StreamState, StreamTracker
from stream2llm.tokens import ceil_div


def queued_tokens(request: compat.Request) -> int:
    """Tokens the chunks queued behind the one in work will prefill, at most: an update carries the
    whole new prompt and replaces what was queued before it (its shared prefix is known only when
    it is applied); appends add theirs. Summing every queued update counted a refinement's context
    once per version and ranked the session behind far longer finals."""
    total = 0
    for chunk in compat.queued_chunks(request):
        n = len(compat.chunk_ids(chunk))
        total = n if ChunkMeta.of(chunk.sampling_params).replaces_prompt else total + n
    return total


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

    def view(self, request: compat.Request, now: float) -> RequestView:
        """What the policy may know about one request."""
        rid = request.request_id
        state = self._streams.get(rid) or StreamState(now, now, True)
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
            compat.blocks_held(self._scheduler, rid),
            state.next_chunk_eta(),
            queued_tokens(request),
        )

    def apply(self) -> None:
        """Before a step: rank, reorder vLLM's queues, defer and evict as the policy decides."""
        scheduler = self._scheduler
        policy = self.policy()
        self.evicted_last, self.short_last = [], 0
        if isinstance(policy, VllmPolicy) or not compat.num_requests(scheduler):
            return
        now = time.monotonic()
        views = [self.view(r, now) for r in compat.live_requests(scheduler)]
        order = policy.rank([v for v in views if not v.parked])
        ranked_ids = [v.request_id for v in order]
        short = self.short_last = self._blocks_short(views, ranked_ids)
        victims = policy.victims(order, views, short, now) if short > 0 else []
        rank = {rid: i for i, rid in enumerate(ranked_ids)}
        last = len(rank)
        self._defer_outranked_prefills(rank)
        compat.sort_queues(scheduler, key=lambda r: rank.get(r.request_id, last))
        self._evict_waiting(victims, ranked_ids[0] if ranked_ids else None)

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
            kind = OFFLOAD if offloaded else "recompute"
            self.evicted_last.append((compat.external_request_id(rid), tokens, blocks, kind))
            self.evictions += 1

    def _blocks_short(self, views: list[RequestView], order: list[str]) -> int:
        """Blocks the top-ranked waiting work of one step needs beyond what is free, or the
        excess of parked KV over its cap, whichever is larger. A waiting request needs blocks
        for its whole prompt, not this step's chunk, where vLLM admits only whole prompts
        (``admits_whole_prompts``): counting the chunk freed nothing for a long final that vLLM
        then refused, and the engine idled for seconds while parked sessions held the KV."""
        scheduler = self._scheduler
        by_id = {v.request_id: v for v in views}
        running = compat.running_ids(scheduler)
        whole = compat.admits_whole_prompts(scheduler)
        budget, want = compat.token_budget(scheduler), 0
        block_size = compat.block_size(scheduler)
        for rid in order:
            v = by_id[rid]
            if rid in running or budget <= 0:
                continue
            take = min(v.tokens_pending, budget)
            budget -= take
            admitted = v.tokens_pending if whole else take
            want += max(ceil_div(v.tokens_computed + admitted, block_size) - v.blocks_held, 0)
        short = want - compat.free_block_count(scheduler)
        parked_blocks = sum(v.blocks_held for v in views if v.parked)
        over_cap = parked_blocks - int(self.parked_kv_cap * compat.total_block_count(scheduler))
        return max(short, over_cap, 0)

    def _defer_outranked_prefills(self, rank: dict[str, int]) -> None:
        """vLLM gives this step's tokens to running requests before waiting ones; a partial
        stream's prefill that ranks below a waiting complete stream (a final chunk on the TTFT
        clock) waits a step instead. Complete streams are not preempted for one another: the
        churn (deferring and resuming) cost more at the median than reordering them gained."""
        running = compat.running_ids(self._scheduler)
        top_waiting = min(
            (rank[rid] for rid in rank if rid not in running and self._wants_tokens(rid)), default=None
        )
        if top_waiting is None or not self._streams.is_complete(
            next(r for r in rank if rank[r] == top_waiting)
        ):
            return
        for request in compat.running_requests(self._scheduler):
            if self._streams.is_complete(request.request_id):
                continue
            if compat.is_prefilling(request) and rank.get(request.request_id, 0) > top_waiting:
                compat.defer_running_prefill(self._scheduler, request)
                self.deferrals += 1

    def _wants_tokens(self, request_id: str) -> bool:
        request = compat.find_request(self._scheduler, request_id)
        return request is not None and not compat.is_parked(request) and compat.tokens_to_compute(request) > 0
