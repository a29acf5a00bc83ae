"""Reading scheduler, request and step state: attributes with no public accessor in vLLM.

Each reader names one thing the rest of the engine core asks of vLLM's scheduler, a request, a
streaming chunk or a step's ``SchedulerOutput``, so that only this module knows which field holds
it. (``with_prompt`` builds a changed copy of a chunk; nothing here changes state.)
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Sequence
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus, StreamingUpdate

__all__ = [
    "Request",
    "RequestStatus",
    "additional_config",
    "admits_whole_prompts",
    "block_size",
    "block_tables",
    "blocks_held",
    "cached_block_keys",
    "chunk_ids",
    "computed_token_ids",
    "computed_tokens",
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
    "preempted_ids",
    "prompt_ids",
    "prompt_length",
    "publish_kv_events",
    "queued_chunks",
    "request_counts",
    "request_facts",
    "request_table",
    "running_ids",
    "running_requests",
    "scheduled_tokens",
    "sent_prompts",
    "step_request_ids",
    "token_budget",
    "token_ids_at",
    "tokens_to_compute",
    "total_block_count",
    "was_evicted",
    "with_prompt",
]


_request_id = operator.attrgetter("request_id")


def additional_config(scheduler: Scheduler) -> dict[str, Any]:
    """The engine's ``additional_config`` (where stream2llm's options travel to the core)."""
    return scheduler.vllm_config.additional_config or {}


def find_request(scheduler: Scheduler, request_id: str) -> Request | None:
    """The request the scheduler holds under ``request_id`` (finished ones leave at once)."""
    return scheduler.requests.get(request_id)


def request_table(scheduler: Scheduler) -> dict[str, Request]:
    """vLLM's own map of request id to request (read only; the same dict for the scheduler's
    life), for looking up many requests each step without a call apiece."""
    return scheduler.requests


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
    return set(map(_request_id, scheduler.running))  # read before every step: no Python call per request


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


def preempted_ids(output: Any) -> list[str]:
    """Requests vLLM's allocator preempted while scheduling the step (their KV is freed; they
    recompute when scheduled again), from its ``SchedulerOutput``."""
    return sorted(output.preempted_req_ids or ())


def step_request_ids(output: Any, runner_output: Any = None) -> list[str]:
    """Every request a step may have changed: those its ``SchedulerOutput`` scheduled or whose
    KV vLLM's allocator preempted for it, and (with the model runner's output, when the step
    comes back) those whose KV a connector finished loading."""
    ids = [*output.num_scheduled_tokens, *(output.preempted_req_ids or ())]
    connector = getattr(runner_output, "kv_connector_output", None)
    if connector is not None:
        ids.extend(connector.finished_recving or ())
    return ids


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


def is_prefilling(request: Request) -> bool:
    return request.status == RequestStatus.RUNNING and request.num_computed_tokens < request.num_prompt_tokens


def queued_chunks(request: Request) -> list[StreamingUpdate]:
    """The chunks vLLM holds for a streaming session behind the one it is working on."""
    return [u for u in (request.streaming_queue or ()) if u is not None]


def was_evicted(request: Request) -> bool:
    """A session whose KV was evicted while it was parked holds fewer tokens than its prompt."""
    return request.num_computed_tokens < request.num_prompt_tokens


def with_prompt(update: StreamingUpdate, prompt_token_ids: list[int]) -> StreamingUpdate:
    """The same streaming chunk carrying other prompt tokens."""
    return dataclasses.replace(update, prompt_token_ids=prompt_token_ids)


def computed_token_ids(request: Request) -> list[int]:
    """The tokens whose KV the request holds (prompt and kept outputs), in order."""
    return request._all_token_ids[: request.num_computed_tokens]


def blocks_held(scheduler: Scheduler, request_id: str) -> int:
    return sum(len(m.req_to_blocks.get(request_id, ())) for m in _managers(scheduler))


def block_tables(scheduler: Scheduler) -> list[dict[str, Any]]:
    """Each KV cache group's map of request id to the blocks it holds (vLLM's own, read only): a
    request's blocks are the sum of its list lengths, read without a call per group."""
    return [m.req_to_blocks for m in _managers(scheduler)]


_LAST_LIVE, _PARKED = RequestStatus.PREEMPTED, RequestStatus.WAITING_FOR_STREAMING_REQ  # enum lookups, once


def request_facts(
    request: Request, tables: Sequence[dict[str, Any]]
) -> tuple[bool, int, int, int, bool] | None:
    """(parked, tokens computed, tokens to compute, blocks held, chunks queued) of one request in
    one call, None once it finished; the broker reads them for every request that changed before
    each step, so one call beats five (``is_parked``, ``computed_tokens``, ...)."""
    status = request.status
    if status > _LAST_LIVE:  # RequestStatus.is_finished, without the call
        return None
    rid, blocks = request.request_id, 0
    for table in tables:
        held = table.get(rid)
        if held:
            blocks += len(held)
    computed = request.num_computed_tokens
    return (
        status == _PARKED,
        computed,
        len(request._all_token_ids) - computed,
        blocks,
        bool(request.streaming_queue),
    )


def free_block_count(scheduler: Scheduler) -> int:
    return _block_pool(scheduler).get_num_free_blocks()


def admits_whole_prompts(scheduler: Scheduler) -> bool:
    """vLLM admits a waiting request only if its whole prompt fits in the free blocks
    (``scheduler_reserve_full_isl``, on by default), not just the chunk it schedules now."""
    return bool(scheduler.scheduler_reserve_full_isl)


def total_block_count(scheduler: Scheduler) -> int:
    return _block_pool(scheduler).num_gpu_blocks - 1  # minus vLLM's null block


# -- vLLM's KV cache manager (also the KV cut's way in) ---------------------------------------


def cached_block_keys(scheduler: Scheduler) -> list[tuple[int, bytes | int]]:
    """Every block hash the prefix cache holds, as ``(KV group, hash)`` in the form vLLM's KV
    events carry it: the truth a subscriber's replayed block set must equal."""
    from vllm.v1.core.kv_cache_utils import get_block_hash, get_group_id, maybe_convert_block_hash

    keys = _block_pool(scheduler).cached_block_hash_to_block._cache
    return [(get_group_id(key), maybe_convert_block_hash(get_block_hash(key))) for key in keys]


def publish_kv_events(scheduler: Scheduler) -> None:
    """Publish the KV events the block pool holds now, as vLLM does at the end of a step: a reset
    on an idle engine would otherwise reach subscribers only with the next step."""
    events = scheduler.kv_cache_manager.take_events()
    if events:
        from vllm.distributed.kv_events import KVEventBatch

        scheduler.kv_event_publisher.publish(KVEventBatch(ts=time.time(), events=events))


def _managers(scheduler: Scheduler) -> Sequence[Any]:
    return scheduler.kv_cache_manager.coordinator.single_type_managers


def _block_pool(scheduler: Scheduler) -> Any:
    return scheduler.kv_cache_manager.block_pool
