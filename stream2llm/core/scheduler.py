"""The engine-core side of stream2llm: a vLLM Scheduler subclass (``scheduler_cls``).

It wires what stock vLLM lacks for streamed context into vLLM's scheduling loop:

- **update mode** (``updates.py``): a chunk that carries a session's whole new prompt cuts the
  session back to the longest common prefix and prefills only the rest;
- **the broker** (``broker.py``): before each step, the policy's ranking and victims are applied
  through vLLM's own levers (queue order, eviction of parked sessions, deferred prefills);
- **the speculation gate** (``speculation.py``): a session whose updates threw away most of what
  was prefilled for it stops speculating; its partial chunks wait for its final;
- **accounting** (``accounting.py``): tokens prefilled and recomputed per request, returned to
  the front end with the request's final output, live engine state on a shared-memory board, and
  the optional step log.

Everything that touches vLLM internals goes through ``vllm_compat``.

Under async scheduling (vLLM's default on GPU) the engine core schedules step N+1 before step N's
output came back; ``StreamScheduler`` then builds an ``AsyncStreamScheduler``: the same class with
vLLM's ``AsyncScheduler`` (output placeholders) between our hooks and vLLM's ``Scheduler``.
"""

from __future__ import annotations

import math
import time
from typing import Any

from stream2llm.core import vllm_compat as compat
from stream2llm.core.accounting import Accounting
from stream2llm.core.broker import Broker
from stream2llm.core.cost_profile import DEFAULT_PROFILE, CostProfile
from stream2llm.core.kv_audit import KvAudit
from stream2llm.core.policies import Costs
from stream2llm.core.protocol import CONFIG_KEY, ChunkMeta
from stream2llm.core.speculation import SpeculationGate, merge_chunks
from stream2llm.core.streams import StreamTracker
from stream2llm.core.updates import UpdateMode


class StreamScheduler(compat.HookedScheduler):
    """vLLM's scheduler plus update mode, a policy broker, per-request counters and a stats board."""

    def __new__(cls, *args: Any, **kwargs: Any) -> StreamScheduler:
        """vLLM picks its AsyncScheduler only when no ``scheduler_cls`` is given; a synchronous
        subclass under async scheduling would run every step without overlap. So the engine's
        flag picks the variant here, where the finished config is first seen."""
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is StreamScheduler and vllm_config is not None and compat.async_scheduling(vllm_config):
            cls = AsyncStreamScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = compat.additional_config(self).get(CONFIG_KEY, {})
        self.streams = StreamTracker()
        self.accounting = Accounting(self, options.get("stats_path"), options.get("step_log"))
        self._tier = compat.kv_tier(self)  # the engine's connector where it is a KV tier; fixed at start
        self.broker = Broker(
            self,
            self.streams,
            options.get("policy", "vllm"),
            float(options.get("parked_kv_cap", 1.0)),
            _costs(options, self._tier),
            options.get("preemption", "recompute"),
        )
        self.updates = UpdateMode(self, self.accounting)
        self.gate = SpeculationGate(self.accounting)
        audit = options.get("kv_events_audit")
        self._kv_audit = KvAudit(audit) if audit else None
        self._publish()

    def add_request(self, request: compat.Request) -> None:
        meta = ChunkMeta.of(request.sampling_params)
        self.broker.follow_chunk_policy(meta.policy, meta.preemption)
        now = time.monotonic()
        rid = request.request_id
        known = self.streams.chunk_arrived(rid, now, meta.final, compat.is_stream_chunk(request))
        session = compat.find_request(self, rid)
        if session is not None and meta.in_place and compat.is_stream_chunk(request):
            if self._gate_holds(session, request, meta):
                return
            if held := self.gate.take(rid):  # the final: it goes in with the chunks held for it
                self._release_held(session, held + [compat.as_chunk(request)])
                self.streams.admitted(rid, now, True)
                return
        super().add_request(request)
        held = compat.find_request(self, rid)
        if held is None:
            return
        self.broker.book.admitted(rid, session is None)
        if known:
            self.updates.mark_if_superseded(held)  # vLLM may have queued it behind the chunk in work
        self.streams.admitted(rid, now, meta.final or not compat.is_stream_chunk(request))

    def _gate_holds(self, session: compat.Request, request: compat.Request, meta: ChunkMeta) -> bool:
        """Hold a partial chunk for its final if speculating has not paid for this session
        (``core.speculation``). Whether the chunk was held."""
        rid = session.request_id
        if meta.final:
            return False
        chunk = compat.as_chunk(request)
        if rid not in self.gate.held:
            if not self.gate.closed(rid, self.broker.policy().speculation_gate):
                return False
            if not compat.is_parked(session):
                if not compat.park_ready(session):
                    return False  # it samples or has chunks queued: the gate waits for the next chunk
                chunk = self._park_in_place(session, chunk, meta)
        self.gate.hold(rid, chunk)
        return True

    def _park_in_place(
        self, session: compat.Request, chunk: compat.StreamingUpdate, meta: ChunkMeta
    ) -> compat.StreamingUpdate:
        """The chunk in work (nothing sampled) parks where it is, and ends as a chunk taken over
        does; an append that comes then carries the tokens of it not computed in front."""
        ended, rest = compat.park_in_place(self, session)
        self.updates.ended.append(ended)
        self.broker.touch((session.request_id,))
        if rest and not meta.replaces_prompt:
            return compat.with_prompt(chunk, rest + compat.chunk_ids(chunk))
        return chunk

    def _release_held(self, session: compat.Request, chunks: list[compat.StreamingUpdate]) -> None:
        """The parked session takes the held chunks and its final as one chunk; each held chunk
        ends (one placeholder token) as a chunk the next took over does."""
        self.updates.ended += [compat.ended_chunk(session) for _ in chunks[:-1]]
        compat.resume_parked(self, session, merge_chunks(chunks))
        self.broker.book.admitted(session.request_id, False)

    # -- vLLM's session and free hooks ----------------------------------------------------------

    def before_session_update(
        self, session: compat.Request, update: compat.StreamingUpdate
    ) -> compat.StreamingUpdate:
        return self.updates.next_chunk(session, update)

    def after_session_update(self, session: compat.Request, update: compat.StreamingUpdate) -> None:
        self.broker.touch((session.request_id,))
        self.updates.mark_if_superseded(session)  # an update may already wait behind the chunk just taken

    def is_last_chunk(self, request: compat.Request) -> bool:
        return ChunkMeta.of(request.sampling_params).final

    def on_request_freed(
        self, request: compat.Request, params: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        self.streams.forget(request.request_id)
        self.broker.book.forget(request.request_id)
        self.gate.forget(request.request_id)
        counters = self.accounting.release(request.request_id)
        if counters is None:
            return params
        return {**(params or {}), CONFIG_KEY: counters}

    # -- the scheduling loop --------------------------------------------------------------------

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        tier_before = self._tier_bytes()
        self.broker.touch(self.updates.take_over_superseded())
        self.broker.apply()
        output = super().schedule(*args, **kwargs)
        self.broker.touch(compat.step_request_ids(output))
        self._count_tier_loads()
        tier_after = self._tier_bytes()
        self.accounting.step_scheduled(
            output,
            t0,
            self.broker.policy_name,
            self.streams.is_complete,
            self.broker.evicted_last,
            self.broker.short_last,
            (tier_after[0] - tier_before[0], tier_after[1] - tier_before[1]),
        )
        self._publish()
        return output

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        compat.add_ended_chunks(outputs, self.updates.take_ended())
        self.broker.touch(compat.step_request_ids(scheduler_output, model_runner_output))
        self._count_tier_loads()  # loads that failed are taken back
        self.accounting.step_done()
        self._publish()  # requests finished here free their KV; the board must show it
        self._audit_kv()  # after vLLM published this step's KV events
        return outputs

    def finish_requests(self, request_ids: Any, finished_status: Any) -> list[compat.Request]:
        finished = super().finish_requests(request_ids, finished_status)
        self._publish()
        return finished

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        running = compat.running_ids(self)  # with reset_running_requests vLLM preempts them here,
        done = super().reset_prefix_cache(reset_running_requests, reset_connector)
        self.broker.touch(running)  # and its next step's output reports it only after our apply
        compat.publish_kv_events(self)  # AllBlocksCleared now, not with the next step
        self._audit_kv()
        return done

    def _audit_kv(self) -> None:
        if self._kv_audit is not None:
            self._kv_audit.write(self)

    def _tier_bytes(self) -> tuple[int, int]:
        """Bytes the KV tier was asked to save and to load so far (0, 0 without a tier)."""
        tier = self._tier
        return (tier.tier.bytes_offloaded, tier.tier.bytes_loaded) if tier is not None else (0, 0)

    def _count_tier_loads(self) -> None:
        if (tier := self._tier) is not None and tier.loaded_last:
            self.accounting.tier_loaded(tier.loaded_last)
            tier.loaded_last = []

    def _publish(self) -> None:
        tier = self._tier
        self.accounting.publish(self.broker.evictions, self.broker.offloads, tier.tier if tier else None)


def _costs(options: dict[str, Any], tier: Any) -> Costs:
    """The cost model the engine's policy decides by: the profile the front end passed (its JSON;
    the packaged default otherwise), at this engine's KV geometry, with the session TTL as the
    horizon a victim may come back in."""
    profile = options.get("cost_profile")
    profile = CostProfile.from_json(profile) if profile else CostProfile.load(DEFAULT_PROFILE)
    horizon = float(options.get("session_ttl_s") or math.inf)
    per_token = tier.bytes_per_token if tier is not None else None
    return Costs.from_profile(profile, per_token, horizon)


class AsyncStreamScheduler(StreamScheduler, compat.AsyncScheduler):
    """``StreamScheduler`` on vLLM's ``AsyncScheduler`` (method order: ours, vLLM's async
    placeholders, vLLM's Scheduler). Every change ours makes holds with one step in flight: see
    ``vllm_compat.take_over_ready``, ``cut_session_kv``, ``defer_running_prefill``, and the broker,
    whose evictions wait for a victim's step in flight."""
