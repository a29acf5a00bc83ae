"""A discrete-event model of the engine, driven by the same policies and a cost profile.

It evaluates GPU-scale settings in seconds. The model: an engine step takes ``step_s`` plus the
prefill cost of every chunk it schedules (``CostProfile.chunk_s``: linear in tokens, attention
growing with the context) plus the engine's bookkeeping per chunk and per request it holds
(``CostProfile.step_overhead_s``); each step has a token budget
(``max_num_batched_tokens``) and KV memory is ``kv_capacity_tokens`` in blocks. The front end
delays each chunk by its tokenizing and a fixed trip in, and the token by a trip out (profile
fields ``frontend_in_s``, ``tokenize_token_s``, ``frontend_out_s``). Requests arrive as
a Poisson process and replay their trace events: ``stream`` policies get each chunk on arrival,
``nonstream`` gets the whole prompt after the last event. Our sessions' chunks take over the chunk
in work in place (``core.updates``): an update replaces it at the next step, cut to what both
share of what was computed, and an append extends it. ``hold_in_flight`` models the engine before
that (for runs recorded then): one chunk in the engine, the appends that come meanwhile held and
sent, merged, once the front end has seen the chunk in work finish (its output's trip out, then
the trip in); an update and the final go in at once, the update ending the chunk in work after
the tokens already scheduled and one more step for the token it must sample. stream2llm's
speculation gate parks a session (where its chunk in work is) and holds its partial chunks until
its final once its updates threw away more than they kept (``core.speculation``). Stock vLLM
queues appends in the engine core and applies them one per round; its update aborts the request
and resubmits the whole prompt (the prefix cache keeps the whole blocks it shares). Parked sessions
hold their blocks; ``vllm`` never evicts them (work waits for memory), the other policies evict by
their own rule, each victim giving its KV back as the policy's ``mode`` decides (``preemption``):
recomputed when its next chunk comes, or offloaded to the host tier the profile describes
(``kv_save`` charged to the step that evicts it, ``kv_load`` to the step that resumes it; the tier
is unbounded here). One generated token, as in the published runs.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stream2llm.core.policies import OFFLOAD, Costs, RequestView, VllmPolicy, make_policy
from stream2llm.tokens import ceil_div
from stream2llm.workloads.arrivals import poisson_arrivals
from stream2llm.workloads.bench_policies import bench_policy
from stream2llm.workloads.metrics import summary
from stream2llm.workloads.simulate.cost_model import CostProfile
from stream2llm.workloads.simulate.trace_chunks import TEMPLATE_TOKENS, Chunk, trace_chunks

__all__ = ["TEMPLATE_TOKENS", "SimResult", "Simulator"]
from stream2llm.workloads.trace import TraceRequest


@dataclass
class _Req:
    id: str
    arrival: float
    chunks: list[Chunk]
    next_chunk: int = 0
    target: int = 0  # prompt tokens known so far
    computed: int = 0
    complete: bool = False
    last_chunk_at: float = 0.0
    final_at: float = 0.0  # the final event: TTFT counts from here
    first_token_at: float | None = None
    blocks: int = 0
    evictions: int = 0
    stored: int = 0  # tokens of its KV the host tier holds since it was offloaded
    lost: int = 0  # tokens it had computed before its last eviction (computing them again is recompute)
    waiting_chunk: bool = False  # prefilled what it has; waits for its next chunk
    releasing: bool = False  # its held chunks are on their way in (our sessions)
    parked_at: float = 0.0  # when its last chunk finished
    core_queue: list[Chunk] = field(default_factory=list)  # in the engine core behind the chunk in work
    backlog: list[Chunk] = field(default_factory=list)  # held by the front end (stock: queued in vLLM)
    queued_at: float = 0.0  # its place in vLLM's waiting queue: when it entered, resumed or parked
    running_since: float | None = None  # in vLLM's running list (mid-prefill) since
    prefilled: int = 0  # tokens prefilled for it so far
    discarded: int = 0  # of those, thrown away by its updates
    updated: bool = False  # an update was applied (the speculation gate's evidence)
    gated: list[Chunk] = field(default_factory=list)  # partial chunks the speculation gate holds

    @property
    def parked(self) -> bool:
        return self.waiting_chunk and self.blocks > 0

    @property
    def pending(self) -> int:
        return max(self.target - self.computed, 0)


@dataclass
class SimResult:
    policy: str
    qps: float
    ttft_by_request: dict[str, float] = field(default_factory=dict)  # in the order they finished
    completion_s: float = 0.0
    evictions: int = 0
    offloads: int = 0  # evictions whose KV went to the tier
    tokens_loaded: int = 0  # brought back from the tier instead of recomputed
    tokens_recomputed: int = 0  # computed again after an eviction
    tokens_prefilled: int = 0

    @property
    def ttft_final(self) -> list[float]:
        return list(self.ttft_by_request.values())

    def to_json(self) -> dict:
        return {
            "policy": self.policy,
            "qps": self.qps,
            "ttft_final_s": summary(self.ttft_final),
            # the model's replay is never late: its final events come when the trace says they are
            # due, so TTFT from the final event and from its due time (the bench's ttft_due_s) agree
            "ttft_due_s": summary(self.ttft_final),
            "completion_s": self.completion_s,
            "evictions": self.evictions,
            "offloads": self.offloads,
            "tokens_loaded": self.tokens_loaded,
            "tokens_recomputed": self.tokens_recomputed,
            "tokens_prefilled": self.tokens_prefilled,
        }


class Simulator:
    def __init__(
        self,
        profile: CostProfile,
        block_size: int = 16,
        *,
        hold_in_flight: bool = False,
        speed: Callable[[float], float] | None = None,
        preemption: str = "cost",
    ) -> None:
        self.profile = profile
        self.preemption = preemption  # how victims give KV back (the tier is the profile's kv_save/kv_load)
        self.hold_in_flight = hold_in_flight  # the engine before chunks took over in place
        # the machine's slowness over the run's time (a factor on each step's engine cost): a
        # measured run's, to tell the model's errors from a CPU whose speed drifts
        self.speed = speed
        self.block_size = block_size
        self.capacity = profile.kv_capacity_tokens // block_size

    def run(
        self,
        requests: Sequence[TraceRequest],
        policy: str,
        qps: float,
        *,
        scale: float = 1.0,
        delay_multiplier: float = 1.0,
        seed: int = 42,
        max_model_len: int = 131072,
    ) -> SimResult:
        arrivals = poisson_arrivals(len(requests), qps, seed)
        reqs = [
            _Req(
                r.id,
                a,
                trace_chunks(r, a, scale, delay_multiplier, max_model_len - 1, self.profile.handoff_s),
                final_at=a + r.events[-1].t * delay_multiplier,
            )
            for r, a in zip(requests, arrivals)
        ]
        if bench_policy(policy).mode == "nonstream":  # the whole prompt once the last event is in
            for r in reqs:
                r.chunks = [r.chunks[-1]]
        return _Run(self, reqs, policy, SimResult(policy, qps)).run()


def _queued_tokens(r: _Req) -> int:
    """What the broker sees queued in the engine core (``view_book.queued_tokens``): an update's whole
    prompt (its shared prefix is found only when it is applied), replacing what was queued before
    it; appends' new tokens."""
    total, length = 0, r.target
    for chunk in r.core_queue:
        if chunk.replaces:
            total, length = chunk.target, chunk.target
        else:
            total, length = total + max(chunk.target - length, 0), max(chunk.target, length)
    return total


class _Run:
    """One simulated run: the event queue (chunks arriving, held chunks released), KV blocks free,
    the requests admitted and the clock."""

    def __init__(self, sim: Simulator, reqs: list[_Req], policy: str, result: SimResult) -> None:
        self.reqs, self.result = reqs, result
        self.profile, self.block_size, self.speed = sim.profile, sim.block_size, sim.speed
        spec = bench_policy(policy)
        # stock vLLM applies a session's queued chunks one per round; our sessions merge them
        self.one_chunk_a_round = spec.mode == "vllm"
        self.stream = spec.mode == "stream"
        self.held = self.stream and sim.hold_in_flight
        self.policy = make_policy(spec.scheduler, Costs.from_profile(self.profile), sim.preemption)
        self.saving_s = 0.0  # the tier's copies this step (before its forward pass, as in the engine)
        self.events = [(r.chunks[0].at, i, False) for i, r in enumerate(reqs)]  # (time, request, release)
        heapq.heapify(self.events)
        self.index_of = {r.id: i for i, r in enumerate(reqs)}
        self.release_delay = self.profile.frontend_out_s + self.profile.frontend_in_s
        self.now, self.free, self.done = 0.0, sim.capacity, 0
        self.admitted: list[_Req] = []  # admission order (vLLM's own order)

    def run(self) -> SimResult:
        while self.done < len(self.reqs):
            self._deliver_due()
            active = [r for r in self.admitted if r.first_token_at is None]
            work = [r for r in active if r.pending > 0 and not r.waiting_chunk]
            duration = self._step(work, active) if work else None
            if duration is None:  # nothing could run: wait for the next chunk
                if not self.events:
                    break
                self.now = self.events[0][0]
                continue
            self.now += duration * (self.speed(self.now) if self.speed else 1.0)
            for r in work:
                self._after_step(r)
        self.result.completion_s = self.now
        self.result.evictions = sum(r.evictions for r in self.reqs)
        self.result.tokens_prefilled = sum(r.prefilled for r in self.reqs)
        return self.result

    # -- chunks reaching the engine ---------------------------------------------------------------

    def _deliver_due(self) -> None:
        """Every chunk that has arrived by now reaches the engine, or is held or queued."""
        while self.events and self.events[0][0] <= self.now:
            _, i, release = heapq.heappop(self.events)
            r = self.reqs[i]
            if release:
                self._release(r)
                continue
            chunk = r.chunks[r.next_chunk]
            r.next_chunk += 1
            if r.next_chunk < len(r.chunks):
                heapq.heappush(self.events, (r.chunks[r.next_chunk].at, i, False))
            if r not in self.admitted:
                self.admitted.append(r)
            if self._gate_holds(r, chunk):
                r.gated.append(chunk)
                r.waiting_chunk = True  # a chunk in work parks where it is
                continue
            self._release_gated(r, chunk)
            if self.held and (chunk.replaces or chunk.final):
                self._send_at_once(r, chunk)
            elif self.one_chunk_a_round and chunk.replaces:
                self._resubmit(r, chunk)
            else:
                self._append(r, i, chunk)

    def _release_gated(self, r: _Req, final: Chunk) -> None:
        """The final goes in with what the gate held, as one chunk: only the last update among
        them counts (an update replaces what came before it), kept as far as the trace says it
        shares with the event before it (the engine cuts to the LCP with the KV it holds)."""
        chunks = [*r.gated, final]
        last = max((i for i, c in enumerate(chunks) if c.replaces), default=None)
        for held in r.gated[last or 0 :]:
            self._apply_chunk(r, held)
        r.gated.clear()

    def _gate_holds(self, r: _Req, chunk: Chunk) -> bool:
        """The speculation gate (``core.speculation``): a parked session whose updates threw away
        more than the policy's share of what was prefilled for it keeps its partial chunks until
        its final."""
        gate = self.policy.speculation_gate
        if gate is None or not self.stream or chunk.final:
            return False
        return bool(r.gated) or (r.updated and r.discarded > gate * r.prefilled)

    def _send_at_once(self, r: _Req, chunk: Chunk) -> None:
        """Our sessions send the final (with what they held) into the engine core at once, where it
        waits behind the chunk in work; and an update, which replaces what they held: into the
        engine core behind the chunk in work, which the core then ends after the one token it must
        sample (a step of its own). With an update already queued there the front end holds a
        non-final one until the chunk in work is done; the final goes anyway."""
        in_work = r.pending > 0 and not r.waiting_chunk
        if chunk.replaces:
            r.backlog.clear()
        r.backlog.append(chunk)
        r.releasing = False
        if not in_work:
            self._merge_held(r)
        elif not chunk.replaces:
            r.core_queue += r.backlog
            r.backlog.clear()
            r.complete = True  # the broker sees it on arrival
        elif not r.core_queue or chunk.final:
            r.backlog.clear()
            r.core_queue.append(chunk)
            r.complete = r.complete or chunk.final
            self._end_chunk_early(r)
        # else: a non-final update stays held in the front end (r.backlog) until the chunk in work is done

    def _resubmit(self, r: _Req, chunk: Chunk) -> None:
        """Stock vLLM's update: the request is aborted and the whole new prompt resubmitted, at the
        back of the queue; vLLM's prefix cache keeps the whole blocks it shares."""
        r.backlog.clear()
        kept = min(chunk.keep, r.computed) // self.block_size * self.block_size
        self._apply_chunk(r, chunk._replace(keep=kept))
        r.queued_at = chunk.at

    def _append(self, r: _Req, i: int, chunk: Chunk) -> None:
        """An append: queued (stock vLLM) or held (our sessions) behind the chunk in flight, else
        applied. One that came while the step that just ended ran the chunk in work is held until
        the front end sees that chunk finish."""
        in_work = r.pending > 0 and not r.waiting_chunk
        came_in_work = self.held and r.waiting_chunk and chunk.at < r.parked_at
        if came_in_work and not r.releasing:
            r.releasing = True
            heapq.heappush(self.events, (r.parked_at + self.release_delay, i, True))
        if ((self.one_chunk_a_round or self.held) and in_work) or r.releasing:
            r.backlog.append(chunk)
            r.complete = r.complete or chunk.final  # the broker sees it on arrival
            return
        if not r.waiting_chunk:  # new to the queue; a parked session keeps its place
            r.queued_at = chunk.at
        self._apply_chunk(r, chunk)

    def _release(self, r: _Req) -> None:
        """The front end sends what it held once it has seen the chunk in work finish."""
        r.releasing = False
        if r.backlog and r.backlog[-1].replaces:  # a held update: as if it came now
            self._send_at_once(r, r.backlog.pop())
        else:
            self._merge_held(r)

    def _merge_held(self, r: _Req) -> None:
        """Our session's held chunks (or its final, or an update) reach the engine as one."""
        for chunk in r.backlog:
            self._apply_chunk(r, chunk)
        r.backlog.clear()
        r.releasing = False

    def _resume_from_core(self, r: _Req) -> None:
        """The engine core resumes a session with what waits there: a final append with the appends
        merged into it, or the next update, itself cut short when another waits behind it."""
        if r.core_queue[0].replaces:
            self._apply_chunk(r, r.core_queue.pop(0))
            if r.core_queue:
                self._end_chunk_early(r)
        else:
            for chunk in r.core_queue:
                self._apply_chunk(r, chunk)
            r.core_queue.clear()

    @staticmethod
    def _end_chunk_early(r: _Req) -> None:
        """An update waits behind the chunk in work: the engine core ends that chunk after the
        tokens already computed and the one it must sample (``vllm_compat.end_chunk_early``)."""
        r.target = r.computed + 1

    def _apply_chunk(self, r: _Req, chunk: Chunk) -> None:
        """The request's prompt becomes the chunk's; KV past what the chunk keeps is freed."""
        r.target, r.last_chunk_at, r.waiting_chunk = max(chunk.target, 1), chunk.at, False
        before = r.computed
        r.computed = min(r.computed, chunk.keep, r.target - 1)  # one token always yields logits
        if chunk.replaces:
            r.discarded += before - r.computed
            r.updated = True
        r.stored = min(r.stored, chunk.keep)  # the tier's copy is valid up to what the update keeps
        r.lost = min(r.lost, chunk.keep)
        kept_blocks = ceil_div(r.computed, self.block_size)
        self.free += max(r.blocks - kept_blocks, 0)
        r.blocks = min(r.blocks, kept_blocks)
        r.complete = r.complete or chunk.final
        r.running_since = None

    # -- engine steps ------------------------------------------------------------------------------

    def _step(self, work: list[_Req], active: list[_Req]) -> float | None:
        """Schedule one step in the engine's order within its token budget and KV (evicting by the
        policy's rule); its duration, or None if nothing could run."""
        views = {r.id: self._view(r) for r in active}
        by_id = {r.id: r for r in active}
        stock = isinstance(self.policy, VllmPolicy)
        ranked = self.policy.rank([views[r.id] for r in (self._stock_order(work) if stock else work)])
        if not stock:
            ranked = self._engine_order(ranked, by_id)
        budget, cost, chunks = self.profile.max_num_batched_tokens, 0.0, 0
        self.saving_s = 0.0
        for view in ranked:
            r = by_id[view.request_id]
            restored = min(r.stored, r.target - 1) if r.computed == 0 else 0
            take = min(r.target - r.computed - restored, budget)
            if take <= 0:
                continue
            need = ceil_div(r.computed + restored + take, self.block_size) - r.blocks
            if need > self.free:
                self._evict_for(r, need - self.free, ranked, list(views.values()), by_id)
                if need > self.free:
                    continue
            self.free -= need
            r.blocks += need
            cost += self._restore(r, restored)
            cost += self.profile.chunk_s(take, r.computed)
            self.result.tokens_recomputed += max(0, min(r.lost, r.computed + take) - r.computed)
            r.computed += take
            r.prefilled += take
            if r.running_since is None and r.pending > 0:
                r.running_since = self.now
            budget -= take
            chunks += 1
            if budget <= 0:
                break
        if not chunks:
            return None
        return cost + self.saving_s + self.profile.step_overhead_s(chunks, len(active))

    def _restore(self, r: _Req, tokens: int) -> float:
        """Load a resumed victim's stored KV back from the tier; the seconds it takes."""
        if not tokens:
            return 0.0
        r.computed, r.stored = tokens, 0
        self.result.tokens_loaded += tokens
        return self.profile.load_s(tokens)

    def _evict_for(self, r: _Req, short: int, ranked: list, views: list, by_id: dict[str, _Req]) -> None:
        for rid, mode in self.policy.victims(ranked, views, short, self.now):
            victim = by_id[rid]
            if victim.blocks and victim is not r:
                if mode == OFFLOAD:  # its full blocks go to the tier before they are reused
                    victim.stored = victim.computed - victim.computed % self.block_size
                    self.saving_s += self.profile.save_s(victim.stored)
                    self.result.offloads += 1
                victim.lost = max(victim.lost, victim.computed)
                self.free += victim.blocks
                victim.blocks, victim.computed = 0, 0
                victim.evictions += 1

    @staticmethod
    def _view(r: _Req) -> RequestView:
        return RequestView(
            r.id,
            r.arrival,
            r.last_chunk_at,
            r.complete,
            r.parked,
            r.computed,
            r.pending,
            r.blocks,
            math.inf if r.complete else r.last_chunk_at + 0.7,
            _queued_tokens(r),
        )

    @staticmethod
    def _stock_order(work: list[_Req]) -> list[_Req]:
        """vLLM's own order: its running list first (requests mid-prefill, oldest first), then the
        waiting requests that hold KV, then the others, each in the order they entered the queue
        (a stream re-enters it with every chunk)."""

        def key(r: _Req) -> tuple[int, float, float]:
            if r.running_since is not None:
                return (0, r.running_since, 0.0)
            return (1 if r.blocks else 2, r.queued_at, r.arrival)

        return sorted(work, key=key)

    @staticmethod
    def _engine_order(ranked: list[RequestView], by_id: dict[str, _Req]) -> list[RequestView]:
        """How the broker's ranking reaches vLLM: its running list (sorted by rank) is served
        before any waiting request, except partial streams mid-prefill that rank below the top
        waiting complete stream (deferred); complete streams are not preempted for one another."""
        position = {v.request_id: i for i, v in enumerate(ranked)}
        running = [v for v in ranked if by_id[v.request_id].running_since is not None]
        waiting = [v for v in ranked if by_id[v.request_id].running_since is None]
        if waiting and waiting[0].complete:
            top = position[waiting[0].request_id]
            deferred = [v for v in running if not v.complete and position[v.request_id] > top]
            for v in deferred:
                by_id[v.request_id].running_since = None  # back to the waiting queue
            running = [v for v in running if v not in deferred]
            waiting = sorted(waiting + deferred, key=lambda v: position[v.request_id])
        return running + waiting

    # -- after a step ------------------------------------------------------------------------------

    def _after_step(self, r: _Req) -> None:
        """A request the step just ran: done with its chunk, it takes the next one, parks, or
        answers."""
        if r.computed < r.target:
            return
        if r.core_queue or r.backlog or not r.complete:
            r.queued_at = self.now  # resumed with a queued chunk, or parked: back of the queue
        if r.core_queue:
            self._resume_from_core(r)
        if r.backlog and self.held:
            if not r.releasing:  # the front end sends what it held once it sees the chunk done
                r.releasing = True
                heapq.heappush(self.events, (self.now + self.release_delay, self.index_of[r.id], True))
        elif r.backlog:  # stock vLLM: the next queued chunk, one per round
            self._apply_chunk(r, r.backlog.pop(0))
        elif r.computed < r.target:
            return  # resumed from the engine core
        elif not r.complete:
            r.waiting_chunk, r.parked_at = True, self.now
        elif r.first_token_at is None:
            r.first_token_at = self.now + self.profile.frontend_out_s
            self.result.ttft_by_request[r.id] = r.first_token_at - r.final_at
            self.free += r.blocks
            r.blocks = 0
            self.done += 1
