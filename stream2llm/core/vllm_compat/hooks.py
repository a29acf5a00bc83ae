"""Scheduler hooks: vLLM's private override points mapped to named ones.

``HookedScheduler`` is the only place that overrides a private ``Scheduler`` method; the rest of
stream2llm overrides the named hooks it exposes (``core.scheduler.StreamScheduler``).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, StreamingUpdate

__all__ = ["END_OF_INPUT_PROMPT", "HookedScheduler", "Scheduler", "StreamingUpdate"]

# Prompt of vLLM's end-of-input marker, the non-resumable request AsyncLLM sends when a stream's input ends.
END_OF_INPUT_PROMPT: tuple[int, ...] = (0,)


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
            if not (queue and queue[0] is None):  # the marker is still on its way (vLLM queues it as None)
                self._awaiting_end_marker.add(request.request_id)
            return True  # finish now: the output carries finish_reason and on_request_freed's dict
        return super()._handle_stopped_request(request)

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self._awaiting_end_marker:
            if not request.resumable and tuple(request.prompt_token_ids or ()) == END_OF_INPUT_PROMPT:
                self._awaiting_end_marker.discard(rid)
                return  # the end-of-input marker of a session that already finished
            self._awaiting_end_marker.discard(rid)
        super().add_request(request)

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        kv_params, ec_params = super()._free_request(request, delay_free_blocks)
        return self.on_request_freed(request, kv_params), ec_params
