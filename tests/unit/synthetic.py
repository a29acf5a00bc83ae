"""vLLM's scheduler on a synthetic setup: a real Scheduler (ours), real KV block manager, no model.

The model runner is played by hand: each step's output samples one fixed token per request that
reaches the end of its prompt. Building it reads only the tiny model's config (no weights).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from vllm.config import (
    CacheConfig,
    KVEventsConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from stream2llm.core.protocol import CONFIG_KEY
from stream2llm.core.scheduler import StreamScheduler

SAMPLED = 7


def make_scheduler(
    model_dir: str,
    *,
    num_blocks: int = 64,
    block_size: int = 16,
    policy: str = "vllm",
    max_num_batched_tokens: int = 4096,
    max_num_seqs: int = 32,
    kv_transfer: dict[str, Any] | None = None,
    async_scheduling: bool = False,
    kv_events: dict[str, Any] | None = None,
    **options: Any,
) -> StreamScheduler:
    """Our scheduler as vLLM's engine core builds it; ``async_scheduling`` as on GPU (vLLM's CPU
    platform turns it off while the config is built, so it is set afterwards, as on a GPU)."""
    model_config = ModelConfig(
        model=model_dir, skip_tokenizer_init=True, max_model_len=4096, dtype="bfloat16"
    )
    vllm_config = VllmConfig(
        model_config=model_config,
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=4096,
            is_encoder_decoder=False,
        ),
        additional_config={CONFIG_KEY: {"policy": policy, **options}},
        kv_transfer_config=KVTransferConfig(**kv_transfer) if kv_transfer else None,
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, **kv_events) if kv_events else None,
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer0"],
                FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=32, dtype=torch.bfloat16),
            )
        ],
    )
    init_none_hash(sha256)
    return StreamScheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
    )


def make_request(
    scheduler: StreamScheduler,
    request_id: str,
    ids: list[int],
    *,
    op: str = "append",
    max_tokens: int = 1,
    final: bool = False,
    resumable: bool = True,
    in_place: bool = True,
) -> Request:
    """A streaming chunk as stream mode sends it (``in_place``: it takes over a chunk in work)."""
    meta = {"op": op, "final": final, "in_place": in_place}
    params = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args={CONFIG_KEY: meta})
    params.update_from_generation_config({}, None)
    hasher = get_request_block_hasher(scheduler.block_size, sha256)
    return Request(
        request_id=request_id,
        prompt_token_ids=list(ids),
        sampling_params=params,
        pooling_params=None,
        arrival_time=0.0,
        block_hasher=hasher,
        resumable=resumable,
    )


def step(scheduler: StreamScheduler) -> Any:
    """One engine step: schedule, then play the model runner."""
    return step_with_outputs(scheduler)[0]


def step_with_outputs(scheduler: StreamScheduler) -> tuple[Any, dict[str, Any]]:
    """One engine step; also each finished request's ``kv_transfer_params`` (the core's counters)."""
    pending = schedule_step(scheduler)
    return pending[0], finish_step(scheduler, pending)


Pending = tuple[Any, dict[str, list[int]]]  # a scheduled step and what its model runner samples


def schedule_step(scheduler: StreamScheduler) -> Pending:
    """Schedule a step; decide now, as the worker does from what it was sent, which requests it
    samples for: those the step takes to the end of their tokens (a decode under async scheduling
    is scheduled past them, onto its output placeholder)."""
    out = scheduler.schedule()
    samples = {}
    for rid in out.num_scheduled_tokens:
        request = scheduler.requests[rid]
        samples[rid] = [SAMPLED] if request.num_computed_tokens >= request.num_tokens else []
    return out, samples


def finish_step(scheduler: StreamScheduler, pending: Pending) -> dict[str, Any]:
    """Play the model runner's output of a scheduled step; each finished request's counters
    (chunks another took over end too, but carry nothing)."""
    taken_over = {id(output) for _, output in scheduler.updates.ended}
    return {
        o.request_id: o.kv_transfer_params
        for o in finish_step_outputs(scheduler, pending)
        if o.finish_reason is not None and id(o) not in taken_over
    }


def finish_step_outputs(scheduler: StreamScheduler, pending: Pending) -> list[Any]:
    """Play the model runner's output of a scheduled step; the engine core's outputs, in order."""
    out, samples = pending
    req_ids = list(samples)
    runner = ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[samples[r] for r in req_ids],
    )
    engine_outputs = scheduler.update_from_output(out, runner)
    return [o for group in engine_outputs.values() for o in group.outputs]


def has_work(scheduler: StreamScheduler) -> bool:
    return bool(scheduler.running) or any(
        r.status.name in ("WAITING", "PREEMPTED") for r in scheduler.requests.values()
    )


def run_pipelined(scheduler: StreamScheduler, max_steps: int = 100) -> list[Any]:
    """vLLM's engine loop under async scheduling (``EngineCore.step_with_batch_queue``, two steps
    at most): schedule the next step before the last one's output, then process the oldest."""
    in_flight: deque[Pending] = deque()
    scheduled = []
    for _ in range(max_steps):
        if has_work(scheduler):
            in_flight.append(schedule_step(scheduler))
            scheduled.append(in_flight[-1][0])
            if len(in_flight) < 2 and scheduled[-1].total_num_scheduled_tokens:
                continue
        if not in_flight:
            break
        finish_step(scheduler, in_flight.popleft())
    return scheduled


def run_until_idle(scheduler: StreamScheduler, max_steps: int = 100) -> list[Any]:
    outputs = []
    for _ in range(max_steps):
        if not has_work(scheduler):
            break
        outputs.append(step(scheduler))
    return outputs


def blocks_of(scheduler: StreamScheduler, request_id: str) -> list[Any]:
    return scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[request_id]
