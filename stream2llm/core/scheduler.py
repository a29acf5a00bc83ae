"""The engine-core side of stream2llm: a vLLM Scheduler subclass (``scheduler_cls``).

It adds what stock vLLM lacks for streamed context:

- **update mode**: a chunk whose ``SamplingParams.extra_args["stream2llm"]["op"] == "update"``
  carries the *whole* new prompt. The session is cut back to the token-exact longest common prefix
  (LCP) of the tokens it holds and the new ones; KV past it is freed, a kept block that carries a
  prefix-cache hash is never written (its hash is dropped, or it is copied on write when shared),
  block hashes are recomputed from the cut, and only the rest is prefilled again;
- **counters**: tokens prefilled and recomputed per request, returned to the front end with the
  request's final output, and live engine state on a shared-memory board (``stats_board``).

Everything that touches vLLM internals goes through ``vllm_compat``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from stream2llm.context.events import Op
from stream2llm.context.prompt import common_prefix_len
from stream2llm.core import vllm_compat as compat
from stream2llm.core.policies import Policy, RequestView, VllmPolicy, make_policy
from stream2llm.core.protocol import CONFIG_KEY, ChunkMeta, RequestCounters, UpdateRecord
from stream2llm.core.stats_board import EngineStats, StatsBoard
from stream2llm.core.step_log import PrefillItem, StepLog

DEFAULT_GAP_S = 0.7  # expected gap to a session's next chunk before any is observed (crawler median)


@dataclass
class StreamState:
    """What the broker tracks per request to build its policy view."""

    arrival: float
    last_chunk: float
    complete: bool
    gap_ewma: float | None = None

    def on_chunk(self, now: float, final: bool) -> None:
        gap = now - self.last_chunk
        self.gap_ewma = gap if self.gap_ewma is None else 0.5 * self.gap_ewma + 0.5 * gap
        self.last_chunk = now
        self.complete = self.complete or final

    def next_chunk_eta(self) -> float:
        if self.complete:
            return math.inf
        return self.last_chunk + (self.gap_ewma if self.gap_ewma is not None else DEFAULT_GAP_S)


class StreamScheduler(compat.HookedScheduler):
    """vLLM's scheduler plus update mode, per-request counters and a live stats board."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = (self.vllm_config.additional_config or {}).get(CONFIG_KEY, {})
        self.policy_name: str = options.get("policy", "vllm")
        board_path = options.get("stats_path")
        self._board = StatsBoard(board_path) if board_path else None
        self._step_log = StepLog(options["step_log"]) if options.get("step_log") else None
        self._counters: dict[str, RequestCounters] = {}
        self._totals = RequestCounters()
        self._streams: dict[str, StreamState] = {}
        self._policies: dict[str, Policy] = {}
        self.parked_kv_cap: float = float(options.get("parked_kv_cap", 1.0))
        self.evictions = 0
        self.deferrals = 0
        self._superseded: set[str] = set()  # sessions whose chunk in work an update will replace
        self.chunks_ended_early = 0
        self._publish()

    # -- admission ------------------------------------------------------------------------------

    def add_request(self, request: compat.Request) -> None:
        meta = ChunkMeta.of(request.sampling_params)
        if meta.policy:
            self.policy_name = meta.policy
        now = time.monotonic()
        rid = request.request_id
        state = self._streams.get(rid)
        if state is not None and request.resumable:
            # a known stream's next chunk, seen on arrival (vLLM may queue it behind the chunk in
            # flight): from now on the ranking knows when it came and whether the stream is complete
            state.on_chunk(now, meta.final)
        super().add_request(request)
        existing = self.requests.get(rid)
        if state is not None and existing is not None and meta.op is Op.UPDATE:
            self._mark_if_superseded(existing)
        if rid not in self._streams and rid in self.requests:
            final = meta.final or not request.resumable
            self._streams[rid] = StreamState(now, now, final)

    # -- update mode ----------------------------------------------------------------------------

    def before_session_update(self, session: compat.Request, update: compat.StreamingUpdate):
        if ChunkMeta.of(update.sampling_params).op is not Op.UPDATE:
            if not compat.was_evicted(session):
                return update
            # evicted while parked: resend the whole prompt; vLLM's prefix cache returns what survived
            new_ids = list(session.prompt_token_ids) + list(update.prompt_token_ids or ())
            compat.truncate_session_prompt(session, 0)
            return compat.with_prompt(update, new_ids)
        new_ids = list(update.prompt_token_ids or ())
        held = compat.computed_token_ids(session)
        lcp = common_prefix_len(held, new_ids)
        kept, tail = compat.cut_session_kv(self, session, min(lcp, len(new_ids) - 1))
        compat.truncate_session_prompt(session, kept)
        record = UpdateRecord(len(held), len(new_ids), lcp, kept, len(new_ids) - kept, len(held) - kept, tail)
        counters = self._counters_for(session.request_id)
        counters.updates.append(record)
        counters.tokens_recomputed += record.recomputed
        counters.tokens_discarded += record.discarded
        self._totals.tokens_recomputed += record.recomputed
        return compat.with_prompt(update, new_ids[kept:])

    def after_session_update(self, session: compat.Request, update: compat.StreamingUpdate) -> None:
        self._mark_if_superseded(session)  # an update may already wait behind the chunk just taken

    def _mark_if_superseded(self, request: compat.Request) -> None:
        """An update queued behind the chunk a session is working on replaces that chunk's context:
        prefilling the rest of it would be thrown away (an ANN pipeline refines faster than a
        long update prefills), so the chunk is ended early at the next step."""
        if any(ChunkMeta.of(u.sampling_params).op is Op.UPDATE for u in compat.queued_chunks(request)):
            self._superseded.add(request.request_id)

    def _end_superseded_chunks(self) -> None:
        for rid in self._superseded:
            request = self.requests.get(rid)
            if request is not None and compat.end_chunk_early(self, request):
                self.chunks_ended_early += 1
        self._superseded.clear()

    def is_last_chunk(self, request: compat.Request) -> bool:
        return ChunkMeta.of(request.sampling_params).final

    # -- counters and stats ---------------------------------------------------------------------

    def counters(self, request_id: str) -> RequestCounters | None:
        """Tokens prefilled and recomputed so far, and the updates applied, for a live request."""
        return self._counters.get(request_id)

    def _counters_for(self, request_id: str) -> RequestCounters:
        return self._counters.setdefault(request_id, RequestCounters())

    # -- the broker: apply the policy's decision through vLLM's own levers ---------------------

    def stream_policy(self) -> Policy:
        name = self.policy_name
        if name not in self._policies:
            try:
                self._policies[name] = make_policy(name)
            except ValueError:  # never take the engine down over a name; the front end validates
                self._policies[name] = VllmPolicy()
        return self._policies[name]

    def _view(self, request: compat.Request, now: float) -> RequestView:
        rid = request.request_id
        state = self._streams.get(rid) or StreamState(now, now, True)
        parked = compat.is_parked(request)
        pending = 0 if parked else max(request.num_tokens - request.num_computed_tokens, 1)
        return RequestView(
            rid,
            state.arrival,
            state.last_chunk,
            state.complete,
            parked,
            request.num_computed_tokens,
            pending,
            compat.blocks_held(self, rid),
            state.next_chunk_eta(),
            sum(len(u.prompt_token_ids or ()) for u in compat.queued_chunks(request)),
        )

    def _blocks_short(self, views: list[RequestView], order: list[str]) -> int:
        """Blocks the top-ranked waiting work of one step needs beyond what is free, or the
        excess of parked KV over its cap, whichever is larger."""
        by_id = {v.request_id: v for v in views}
        running = {r.request_id for r in self.running}
        budget, want = self.max_num_scheduled_tokens, 0
        for rid in order:
            v = by_id[rid]
            if rid in running or budget <= 0:
                continue
            take = min(v.tokens_pending, budget)
            budget -= take
            want += max(-(-(v.tokens_computed + take) // self.block_size) - v.blocks_held, 0)
        short = want - compat.free_block_count(self)
        parked_blocks = sum(v.blocks_held for v in views if v.parked)
        over_cap = parked_blocks - int(self.parked_kv_cap * compat.total_block_count(self))
        return max(short, over_cap, 0)

    def _apply_policy(self) -> None:
        policy = self.stream_policy()
        if isinstance(policy, VllmPolicy) or not self.requests:
            return
        now = time.monotonic()
        views = [self._view(r, now) for r in self.requests.values() if not r.is_finished()]
        order = policy.rank([v for v in views if not v.parked])
        ranked_ids = [v.request_id for v in order]
        short = self._blocks_short(views, ranked_ids)
        victims = policy.victims(order, views, short, now) if short > 0 else []
        rank = {rid: i for i, rid in enumerate(ranked_ids)}
        last = len(rank)
        self._defer_outranked_prefills(rank)
        compat.sort_queues(self, key=lambda r: rank.get(r.request_id, last))
        running = {r.request_id for r in self.running}
        first = ranked_ids[0] if ranked_ids else None
        for rid, _mode in victims:  # CPU: vLLM cannot offload here, so every mode recomputes
            request = self.requests.get(rid)
            if request is None or rid in running or rid == first:
                continue  # running victims: vLLM's allocator preempts from the end of the ranked list
            compat.evict_waiting_kv(self, request)
            self.evictions += 1

    def _defer_outranked_prefills(self, rank: dict[str, int]) -> None:
        """vLLM gives this step's tokens to running requests before waiting ones; a partial
        stream's prefill that ranks below a waiting complete stream (a final chunk on the TTFT
        clock) waits a step instead. Complete streams are not preempted for one another: the
        churn (deferring and resuming) cost more at the median than reordering them gained."""
        running = {r.request_id for r in self.running}
        top_waiting = min(
            (rank[rid] for rid in rank if rid not in running and self._wants_tokens(rid)), default=None
        )
        if top_waiting is None or not self._is_complete(next(r for r in rank if rank[r] == top_waiting)):
            return
        for request in list(self.running):
            if self._is_complete(request.request_id):
                continue
            if compat.is_prefilling(request) and rank.get(request.request_id, 0) > top_waiting:
                compat.defer_running_prefill(self, request)
                self.deferrals += 1

    def _is_complete(self, request_id: str) -> bool:
        state = self._streams.get(request_id)
        return state is not None and state.complete

    def _wants_tokens(self, request_id: str) -> bool:
        request = self.requests.get(request_id)
        return (
            request is not None
            and not compat.is_parked(request)
            and request.num_computed_tokens < request.num_tokens
        )

    def schedule(self, *args: Any, **kwargs: Any):
        t0 = time.monotonic()
        self._end_superseded_chunks()
        self._apply_policy()
        output = super().schedule(*args, **kwargs)
        logged: list[PrefillItem] = []
        for request_id, n in output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            computed_before = request.num_computed_tokens - n
            prompt_part = max(0, min(n, request.num_prompt_tokens - computed_before))
            if prompt_part:
                self._counters_for(request_id).tokens_prefilled += prompt_part
                self._totals.tokens_prefilled += prompt_part
                if self._step_log is not None:
                    submitted_as = compat.external_request_id(request_id)
                    logged.append((prompt_part, computed_before, self._is_complete(request_id), submitted_as))
        if self._step_log is not None:
            decodes = len(output.num_scheduled_tokens) - len(logged)  # requests past their prompt
            self._step_log.scheduled(self.policy_name, logged, decodes, len(self.requests), t0)
        self._publish()
        return output

    def on_request_freed(self, request: compat.Request, params: dict[str, Any] | None):
        self._streams.pop(request.request_id, None)
        counters = self._counters.pop(request.request_id, None)
        if counters is None:
            return params
        return {**(params or {}), CONFIG_KEY: counters.as_dict()}

    def update_from_output(self, *args: Any, **kwargs: Any):
        outputs = super().update_from_output(*args, **kwargs)
        if self._step_log is not None:
            self._step_log.finished()
        self._publish()  # requests finished here free their KV; the board must show it
        return outputs

    def finish_requests(self, request_ids: Any, finished_status: Any) -> list[compat.Request]:
        finished = super().finish_requests(request_ids, finished_status)
        self._publish()
        return finished

    def _publish(self) -> None:
        if self._board is None:
            return
        running, waiting = self.get_request_counts()
        parked = self.num_parked_sessions()
        self._board.publish(
            EngineStats(
                kv_usage=self.kv_usage(),
                running=running,
                waiting=max(waiting - parked, 0),
                parked=parked,
                requests=len(self.requests),
                tokens_prefilled=self._totals.tokens_prefilled,
                tokens_recomputed=self._totals.tokens_recomputed,
                preemptions=self.evictions,
            )
        )
