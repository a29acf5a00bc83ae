"""A streaming chunk queued behind the one in work takes it over in place.

vLLM applies a session's next chunk only once the chunk in work has sampled its token: the rest of
its prefill, a sampling step, a park and a resume. A chunk queued behind it replaces (an update)
or extends (an append) that chunk, so the engine core applies it at once through vLLM's own
session update, and ends the superseded chunk itself with an output that carries one placeholder
token and ``finish_reason`` length. Both front-end counters then see what they would have seen:
vLLM's output processor moves a streaming request to its next chunk when the last one finishes,
and stream2llm's hand-over counts one throw-away token per chunk (and drops it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request, RequestStatus, StreamingUpdate

from stream2llm.core.vllm_compat.queues import defer_running_prefill
from stream2llm.core.vllm_compat.scheduler_state import is_prefilling

__all__ = [
    "EndedChunk",
    "add_ended_chunks",
    "as_chunk",
    "ended_chunk",
    "next_queued_chunk",
    "park_in_place",
    "park_ready",
    "resume_parked",
    "take_over_chunk",
    "take_over_ready",
]

_REPLACEABLE = (RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.RUNNING)

EndedChunk = tuple[int, EngineCoreOutput]  # (the client the output goes to, the output)


def as_chunk(request: Request) -> StreamingUpdate:
    """A streaming chunk as vLLM queues it behind a session's chunk in work."""
    chunk = StreamingUpdate.from_request(request)
    assert chunk is not None, "not a streaming chunk"
    return chunk


def resume_parked(scheduler: Scheduler, session: Request, chunk: StreamingUpdate) -> None:
    """A parked session takes its next chunk, as vLLM's ``add_request`` gives it one."""
    assert session.status == RequestStatus.WAITING_FOR_STREAMING_REQ and not session.streaming_queue
    scheduler._update_request_as_session(session, chunk)


def ended_chunk(request: Request) -> EndedChunk:
    """The output that ends a chunk of this session that another took over: one placeholder
    token (the last prompt token) and ``finish_reason`` length, as a one-token chunk ends."""
    placeholder = request.prompt_token_ids[-1] if request.prompt_token_ids else 0
    output = EngineCoreOutput(
        request_id=request.request_id,
        new_token_ids=[placeholder],
        finish_reason=FinishReason.LENGTH,
        trace_headers=request.trace_headers,
    )
    return request.client_index, output


def park_in_place(scheduler: Scheduler, request: Request) -> tuple[EndedChunk, list[int]]:
    """Park a session whose chunk in work has sampled nothing (``take_over_ready``'s conditions)
    where it is: its prompt ends at the tokens computed, it waits for its next chunk holding their
    KV, as if the chunk had ended there. Returns the output that ends the chunk and the chunk's
    tokens not computed (they go in front of the session's next append)."""
    if request.status == RequestStatus.RUNNING:
        defer_running_prefill(scheduler, request)
    ended = ended_chunk(request)
    rest = _end_prompt_at_computed(scheduler, request)
    request.status = RequestStatus.WAITING_FOR_STREAMING_REQ
    scheduler.num_waiting_for_streaming_input += 1
    scheduler.deferred_waiting.add(request)  # as vLLM files a request in a blocked state
    return ended, rest


def next_queued_chunk(request: Request) -> StreamingUpdate | None:
    """The chunk vLLM holds first behind the one in work (None: none, or only the end marker)."""
    queue = request.streaming_queue
    return queue[0] if queue else None


def park_ready(request: Request) -> bool:
    """Whether a session's chunk in work may park where it is (``park_in_place``): nothing
    queued behind it, nothing sampled, no step in flight that samples for it."""
    if request.streaming_queue or request.status not in _REPLACEABLE:
        return False
    if request.num_output_tokens or request.num_output_placeholders:
        return False
    return request.status != RequestStatus.RUNNING or is_prefilling(request)


def take_over_ready(request: Request) -> bool:
    """Whether the chunk queued behind the one in work may take it over now: the chunk in work has
    sampled nothing and no step in flight samples for it.

    A partial prefill may still be in flight (async scheduling): vLLM's own preemption resets a
    request under such a step too. Its output carries no token; the blocks the take-over frees
    go through vLLM's deferred frees, and the worker runs the step before the one that writes
    the new tokens over the positions the cut gave up."""
    if next_queued_chunk(request) is None or request.status not in _REPLACEABLE:
        return False
    if request.num_output_tokens or request.num_output_placeholders:
        return False  # it samples (or sampled) its token: vLLM moves on by itself
    return request.status != RequestStatus.RUNNING or is_prefilling(request)


def take_over_chunk(scheduler: Scheduler, request: Request, keep_rest: bool) -> EndedChunk:
    """Apply the chunk queued first behind the one in work (``take_over_ready``) through vLLM's
    session update, and return the output that ends the chunk it supersedes.

    ``keep_rest``: the queued chunk extends the one in work (an append), so the part of the chunk
    in work not computed yet goes in front of it; an update replaces it and is cut by the session
    update's hooks. A running request moves to the waiting queue, keeping its KV, so the worker
    takes its new prompt anew."""
    if request.status == RequestStatus.RUNNING:
        defer_running_prefill(scheduler, request)
    queue = request.streaming_queue
    update = queue.popleft()
    ended = ended_chunk(request)
    if keep_rest:
        rest = _end_prompt_at_computed(scheduler, request)
        update = dataclasses.replace(update, prompt_token_ids=rest + list(update.prompt_token_ids or ()))
    scheduler._update_request_as_session(request, update)
    return ended


def _end_prompt_at_computed(scheduler: Scheduler, request: Request) -> list[int]:
    """Make the tokens computed the request's whole prompt; return the ones cut off."""
    computed = request.num_computed_tokens
    rest = request._all_token_ids[computed:]
    del request._all_token_ids[computed:]
    del request.prompt_token_ids[computed:]
    del request.block_hashes[computed // scheduler.hash_block_size :]
    request.num_prompt_tokens = computed
    return rest


def add_ended_chunks(outputs: dict[int, EngineCoreOutputs], ended: Iterable[EndedChunk]) -> None:
    """Put the outputs that end superseded chunks in front of a step's outputs (a chunk's end comes
    before anything its successor produced in that step), per client."""
    by_client: dict[int, list[EngineCoreOutput]] = {}
    for client, output in ended:
        by_client.setdefault(client, []).append(output)
    for client, outs in by_client.items():
        if (existing := outputs.get(client)) is None:
            outputs[client] = EngineCoreOutputs(outputs=outs)
        else:
            existing.outputs[:0] = outs
