"""Async scheduling: vLLM schedules step N+1 while step N still runs on the worker.

vLLM picks its ``AsyncScheduler`` only when no ``scheduler_cls`` is given; ``StreamScheduler``
picks its own async variant from the same flag. Under it ``schedule()`` runs with at most one step
in flight (the engine's batch queue holds two), a request's ``num_computed_tokens`` already counts
the step in flight, and a decoding request holds output placeholders for tokens not sampled yet.
These readers let the rest of stream2llm ask what is in flight without touching vLLM's fields.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.request import Request

__all__ = ["AsyncScheduler", "async_scheduling", "sample_in_flight", "step_in_flight", "tokens_in_flight"]


def async_scheduling(vllm_config: Any) -> bool:
    """Whether the engine schedules the next step before the last one's output came back (vLLM's
    default on GPU; its CPU platform turns it off)."""
    return bool(vllm_config.scheduler_config.async_scheduling)


def tokens_in_flight(request: Request) -> int:
    """Tokens scheduled for the request in steps whose output has not come back yet."""
    return request.num_in_flight_tokens


def step_in_flight(request: Request) -> bool:
    """Whether a step that computes this request's KV is still running. Always False when
    ``schedule()`` runs without async scheduling: every step's output came back before it."""
    return request.num_in_flight_tokens > 0


def sample_in_flight(request: Request) -> bool:
    """Whether a step in flight samples a token for the request (async scheduling keeps an output
    placeholder for it): the request's state changes when that output comes back."""
    return request.num_output_placeholders > 0
