"""The engine-core side of the compat layer: scheduler hooks, scheduler and request state, KV cuts."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import Request, RequestStatus, StreamingUpdate

__all__ = [
    "HookedScheduler",
    "Request",
    "RequestStatus",
    "Scheduler",
    "StreamingUpdate",
    "additional_config",
    "block_size",
    "blocks_held",
    "chunk_ids",
    "computed_token_ids",
    "computed_tokens",
    "cut_session_kv",
    "defer_running_prefill",
    "end_chunk_early",
    "evict_waiting_kv",
    "external_request_id",
    "find_request",
    "free_block_count",
    "is_parked",
    "is_prefilling",
    "is_stream_chunk",
    "kv_usage",
    "live_requests",
    "num_requests",
    "parked_count",
    "prompt_ids",
    "prompt_length",
    "queued_chunks",
    "request_counts",
    "running_ids",
    "running_requests",
    "scheduled_tokens",
    "sent_prompts",
    "sort_queues",
    "token_budget",
    "token_ids_at",
    "tokens_to_compute",
    "total_block_count",
    "truncate_session_prompt",
    "was_evicted",
    "with_prompt",
]


# ---------------------------------------------------------------------------------------------
# Scheduler hooks: private override points mapped to named ones
# ---------------------------------------------------------------------------------------------


class HookedScheduler(Scheduler):
    """vLLM's Scheduler with its private session and free hooks exposed under stable names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Sessions finished on their last chunk before vLLM's end-of-input marker arrived.
        self._awaiting_end_marker: set[str] = set()

    def is_last_chunk(self, request: Request) -> bool:
        """Whether the chunk a streaming session just finished was its last one. vLLM only learns
        that from a separate end-of-input marker; if the chunk finishes first, the session would
        park and later be aborted without an output, losing its final state (and counters)."""
        return False

    def before_session_update(self, session: Request, update: StreamingUpdate) -> StreamingUpdate:
        """Called when a parked streaming session takes its next chunk; may rewrite the chunk."""
        return update

    def after_session_update(self, session: Request, update: StreamingUpdate) -> None:
        """Called once the session holds the chunk and is queued again."""

    def on_request_freed(self, request: Request, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """Called when a request is finished or aborted; the returned dict reaches the front end
        (``RequestOutput.kv_transfer_params``) with the request's final output."""
        return params

    # -- the private methods these hooks ride on --------------------------------------------

    def _update_request_as_session(self, session: Request, update: StreamingUpdate) -> None:
        update = self.before_session_update(session, update)
        super()._update_request_as_session(session, update)
        self.after_session_update(session, update)

    def _handle_stopped_request(self, request: Request) -> bool:
        if request.resumable and self.is_last_chunk(request):
            queue = request.streaming_queue
            if not (queue and queue[0] is None):  # the marker is still on its way
                self._awaiting_end_marker.add(request.request_id)
            return True  # finish now: the output carries finish_reason and on_request_freed's dict
        return super()._handle_stopped_request(request)

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self._awaiting_end_marker:
            if not request.resumable and list(request.prompt_token_ids or ()) == [0]:
                self._awaiting_end_marker.discard(rid)
                return  # the end-of-input marker of a session that already finished
            self._awaiting_end_marker.discard(rid)
        super().add_request(request)

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        kv_params, ec_params = super()._free_request(request, delay_free_blocks)
        return self.on_request_freed(request, kv_params), ec_params


# ---------------------------------------------------------------------------------------------
# Reading scheduler, request and step state (attributes with no public accessor in vLLM)
# ---------------------------------------------------------------------------------------------


def additional_config(scheduler: Scheduler) -> dict[str, Any]:
    """The engine's ``additional_config`` (where stream2llm's options travel to the core)."""
    return scheduler.vllm_config.additional_config or {}


def find_request(scheduler: Scheduler, request_id: str) -> Request | None:
    """The request the scheduler holds under ``request_id`` (finished ones leave at once)."""
    return scheduler.requests.get(request_id)


def num_requests(scheduler: Scheduler) -> int:
    """Every request the scheduler holds: running, waiting, or parked between chunks."""
    return len(scheduler.requests)


def live_requests(scheduler: Scheduler) -> list[Request]:
    """The requests the scheduler holds that have not finished."""
    return [r for r in scheduler.requests.values() if not r.is_finished()]


def running_requests(scheduler: Scheduler) -> list[Request]:
    """A copy of the running list, in vLLM's order (it preempts from the end)."""
    return list(scheduler.running)


def running_ids(scheduler: Scheduler) -> set[str]:
    return {r.request_id for r in scheduler.running}


def token_budget(scheduler: Scheduler) -> int:
    """The tokens one step may schedule."""
    return scheduler.max_num_scheduled_tokens


def block_size(scheduler: Scheduler) -> int:
    """Tokens per KV block (the block size the scheduler was built with)."""
    return scheduler.block_size


def request_counts(scheduler: Scheduler) -> tuple[int, int]:
    """(running, waiting); waiting counts parked sessions too."""
    return scheduler.get_request_counts()


def parked_count(scheduler: Scheduler) -> int:
    """Streaming sessions waiting for their next chunk."""
    return scheduler.num_waiting_for_streaming_input


def kv_usage(scheduler: Scheduler) -> float:
    """Fraction of KV blocks in use, 0..1."""
    return scheduler.get_kv_cache_usage()


def computed_tokens(request: Request) -> int:
    """Tokens whose KV the request holds (after ``schedule``: including the step just scheduled)."""
    return request.num_computed_tokens


def prompt_length(request: Request) -> int:
    """Tokens of the request's prompt (a session's: every chunk taken so far)."""
    return request.num_prompt_tokens


def tokens_to_compute(request: Request) -> int:
    """Tokens the request holds but has not computed yet (prompt or the last sample)."""
    return request.num_tokens - request.num_computed_tokens


def is_stream_chunk(request: Request) -> bool:
    """Whether the request is a streaming session's chunk (more may follow), not a plain request."""
    return request.resumable


def prompt_ids(request: Request) -> list[int]:
    """A copy of the request's prompt token ids."""
    return list(request.prompt_token_ids)


def chunk_ids(update: StreamingUpdate) -> list[int]:
    """A copy of the token ids a streaming chunk carries."""
    return list(update.prompt_token_ids or ())


def scheduled_tokens(output: Any) -> dict[str, int]:
    """Tokens a step's ``SchedulerOutput`` scheduled, per request id."""
    return output.num_scheduled_tokens


def sent_prompts(output: Any) -> dict[str, list[int]]:
    """The token ids a step's ``SchedulerOutput`` hands the model runner for each request it
    (re)starts there: ``scheduled_new_reqs`` (new requests, and parked streaming sessions resumed
    with their next chunk: vLLM re-sends them as new, with ``num_computed_tokens`` set) carry the
    prompt (v2 runner: ``prefill_token_ids``); a running request is computed from the copy its
    runner took then, plus the tokens it sampled. Copies: in-process the list is the scheduler's."""
    sent = {}
    for new in output.scheduled_new_reqs:
        ids = new.prefill_token_ids if new.prefill_token_ids is not None else new.prompt_token_ids
        sent[new.req_id] = list(ids or ())
    return sent


def token_ids_at(request: Request, start: int, stop: int) -> list[int]:
    """The request's token ids (prompt, then sampled outputs) at positions ``start:stop``."""
    return list(request.all_token_ids[start:stop])


def external_request_id(request_id: str) -> str:
    """The id a request was submitted under: vLLM's input processor appends "-" and 8 random
    characters (``InputProcessor.assign_request_id``) unless told not to."""
    from vllm import envs

    if envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION:
        return request_id
    head, sep, tail = request_id.rpartition("-")
    return head if sep and len(tail) == 8 else request_id


def is_parked(request: Request) -> bool:
    """A streaming session waiting for its next chunk (it holds KV and a batch slot)."""
    return request.status == RequestStatus.WAITING_FOR_STREAMING_REQ


def blocks_held(scheduler: Scheduler, request_id: str) -> int:
    return sum(len(m.req_to_blocks.get(request_id, ())) for m in _managers(scheduler))


def free_block_count(scheduler: Scheduler) -> int:
    return _block_pool(scheduler).get_num_free_blocks()


def total_block_count(scheduler: Scheduler) -> int:
    return _block_pool(scheduler).num_gpu_blocks - 1  # minus vLLM's null block


def sort_queues(scheduler: Scheduler, key: Any) -> None:
    """Order the running list and the waiting requests by ``key`` (smallest first). vLLM
    schedules in this order and preempts from the end of the running list.

    vLLM keeps waiting requests that hold KV (resumed sessions, deferred prefills) in a queue it
    drains before the one for requests without KV (new sessions, evicted ones), which would put
    every partial stream's next chunk ahead of a higher-ranked request with no KV. Both kinds go
    into the first queue, in rank order; vLLM schedules and removes requests from either queue
    alike, and re-files them by their KV when it re-queues them."""
    scheduler.running.sort(key=key)
    first, second = scheduler.kv_holding_waiting, scheduler.waiting
    if not isinstance(first, deque) or not isinstance(second, deque):
        return  # a priority policy orders its own queues
    ordered = sorted([*first, *second], key=key)
    first.clear()
    second.clear()
    first.extend(ordered)


def evict_waiting_kv(scheduler: Scheduler, request: Request) -> int:
    """Free the KV of a request that is not running (a parked session, or one waiting for blocks);
    it recomputes when it is scheduled again. Freed blocks keep their prefix-cache hashes, so if
    nobody reuses them first, the request gets them back for free. Callers wait until no step of
    the request is in flight (``step_in_flight``): its output would land on a reset request."""
    assert request.status in (RequestStatus.WAITING_FOR_STREAMING_REQ, RequestStatus.WAITING), request.status
    n = blocks_held(scheduler, request.request_id)
    scheduler._free_request_blocks(request)  # vLLM's own free: deferred while a KV load may write them
    request.num_computed_tokens = 0
    request.num_preemptions += 1
    return n


def is_prefilling(request: Request) -> bool:
    return request.status == RequestStatus.RUNNING and request.num_computed_tokens < request.num_prompt_tokens


def defer_running_prefill(scheduler: Scheduler, request: Request) -> None:
    """Take a request that is still prefilling out of the running list, keeping its KV, so that
    higher-ranked waiting work gets this step's tokens first. vLLM resumes it from the waiting
    queue like a streaming session resumes (the worker gets its state anew). Safe with a step in
    flight: a request still prefilling after it was scheduled is one whose step samples nothing."""
    assert is_prefilling(request), request.status
    scheduler.running.remove(request)
    scheduler._inflight_prefills.discard(request)
    request.status = RequestStatus.WAITING
    scheduler.kv_holding_waiting.add_request(request)


def queued_chunks(request: Request) -> list[StreamingUpdate]:
    """The chunks vLLM holds for a streaming session behind the one it is working on."""
    return [u for u in (request.streaming_queue or ()) if u is not None]


def end_chunk_early(scheduler: Scheduler, request: Request) -> bool:
    """End the chunk a streaming session is prefilling after the tokens already scheduled plus one
    (its throw-away token is sampled there); return whether anything was cut.

    The rest of the chunk is about to be replaced by an update queued behind it. A running request
    is moved back to the waiting queue, keeping its KV, so the worker takes its shortened state
    anew when it is scheduled again (as a deferred prefill is).

    Under async scheduling ``num_computed_tokens`` already counts the step in flight, so the cut
    falls past it: that step is a partial prefill of positions that stay, and it samples nothing
    (a step that samples holds an output placeholder; such a chunk is left alone)."""
    keep = request.num_computed_tokens + 1
    if is_parked(request) or request.num_output_tokens or keep >= request.num_prompt_tokens:
        return False
    if request.num_output_placeholders:
        return False
    if is_prefilling(request):
        defer_running_prefill(scheduler, request)
    del request._all_token_ids[keep:]
    del request.prompt_token_ids[keep:]
    del request.block_hashes[keep // scheduler.hash_block_size :]
    request.num_prompt_tokens = keep
    return True


def was_evicted(request: Request) -> bool:
    """A session whose KV was evicted while it was parked holds fewer tokens than its prompt."""
    return request.num_computed_tokens < request.num_prompt_tokens


def with_prompt(update: StreamingUpdate, prompt_token_ids: list[int]) -> StreamingUpdate:
    """The same streaming chunk carrying other prompt tokens."""
    return dataclasses.replace(update, prompt_token_ids=prompt_token_ids)


def computed_token_ids(request: Request) -> list[int]:
    """The tokens whose KV the request holds (prompt and kept outputs), in order."""
    return request._all_token_ids[: request.num_computed_tokens]


# ---------------------------------------------------------------------------------------------
# Cutting a session back to a prefix (update mode)
# ---------------------------------------------------------------------------------------------


def _managers(scheduler: Scheduler) -> Sequence[Any]:
    return scheduler.kv_cache_manager.coordinator.single_type_managers


def _block_pool(scheduler: Scheduler) -> Any:
    return scheduler.kv_cache_manager.block_pool


def _release(scheduler: Scheduler, blocks: list[Any]) -> None:
    """Return blocks to the pool, tail first, respecting vLLM's deferred frees when a step is in flight."""
    if not blocks:
        return
    if scheduler.defer_block_free:
        scheduler.deferred_frees.append((scheduler.sched_step_seq, blocks))
    else:
        _block_pool(scheduler).free_blocks(reversed(blocks))


def _make_tail_block_writable(scheduler: Scheduler, manager: Any, request_id: str, index: int) -> str | None:
    """Ensure the block at ``index`` may be written; say how ("private", "unhashed", "copied"), or
    None if that is impossible right now.

    A block that carries a prefix-cache hash must never be written: another request may hit it.
    If only this request holds it, its hash is dropped (its contents are about to change); if
    others share it, the request gets a private copy (vLLM's copy-on-write path, executed by the
    worker before the next forward pass).
    """
    pool = _block_pool(scheduler)
    block = manager.req_to_blocks[request_id][index]
    if pool.is_block_writable(block):
        return "private"
    if block.ref_cnt == 1:
        pool._maybe_evict_cached_block(block)
        return "unhashed" if pool.is_block_writable(block) else None
    if pool.get_num_free_blocks() < 1:
        return None
    copy = pool.get_new_blocks(1)[0]
    manager._apply_cow(request_id, index, block, copy)
    return "copied"


def cut_session_kv(scheduler: Scheduler, request: Request, keep: int) -> tuple[int, str]:
    """Free the request's KV past ``keep`` tokens; return the tokens really kept and how the block
    holding the cut was treated ("aligned" when the cut falls on a block boundary).

    Token-exact for full-attention groups: the block holding token ``keep`` stays, made writable
    first. Other group kinds (sliding window, Mamba) keep only whole blocks they can vouch for, so
    the cut falls back to a block boundary (and to 0 where a group cannot be cut at all).

    With a step in flight (async scheduling) the cut is still safe: vLLM applies a session's next
    chunk only once the output of its last step came back, and later steps never schedule a
    session whose chunk reached ``max_tokens``; a stale step vLLM drops writes only past the
    computed tokens, never into a full (hashed, shareable) block. Freed blocks go through vLLM's
    deferred frees, and the worker makes a copy before the step that reads it.
    """
    managers = _managers(scheduler)
    rid = request.request_id
    if not all(type(m) is FullAttentionManager for m in managers):
        keep = 0
    block_size = max(m.block_size for m in managers)
    how = "aligned"
    if keep % block_size:
        tail_index = keep // block_size
        for manager in managers:
            if tail_index >= len(manager.req_to_blocks[rid]):
                continue
            how = _make_tail_block_writable(scheduler, manager, rid, tail_index) or "aligned"
            if how == "aligned":
                keep -= keep % block_size
                break
    for manager in managers:
        blocks = manager.req_to_blocks[rid]
        n_keep = cdiv(keep, manager.block_size)
        tail = blocks[n_keep:]
        del blocks[n_keep:]
        _release(scheduler, tail)
        if rid in manager.num_cached_block:
            manager.num_cached_block[rid] = min(manager.num_cached_block[rid], keep // manager.block_size)
    request.num_computed_tokens = keep
    return keep, how


def truncate_session_prompt(request: Request, keep: int) -> None:
    """Make the first ``keep`` computed tokens the whole prompt, so vLLM's own session update
    appends the new tail after them (it keeps tokens up to ``num_computed_tokens``)."""
    assert request.num_computed_tokens == keep
    del request.prompt_token_ids[keep:]
    request.num_prompt_tokens = keep
