"""Update mode: a chunk whose metadata says ``op == "update"`` carries a session's *whole* new prompt.

The session is cut back to the token-exact longest common prefix (LCP) of the tokens it holds and
the new ones; KV past it is freed, a kept block that carries a prefix-cache hash is never written
(its hash is dropped, or it is copied on write when shared), block hashes are recomputed from the
cut, and only the rest is prefilled again.

A chunk that queues behind the one in work (vLLM would apply it after that chunk's prefill, its
sampled token, a park and a resume) takes it over at the next step instead: an update replaces
the rest of it, an append extends it (``vllm_compat.take_over_chunk``).
"""

from __future__ import annotations

from stream2llm.core import vllm_compat as compat
from stream2llm.core.accounting import Accounting
from stream2llm.core.protocol import ChunkMeta, UpdateRecord
from stream2llm.tokens import common_prefix_len


class UpdateMode:
    """Rewrites a session's next chunk (update or resend after eviction) and cuts superseded chunks."""

    def __init__(self, scheduler: compat.Scheduler, accounting: Accounting) -> None:
        self._scheduler = scheduler
        self._accounting = accounting
        self._superseded: set[str] = set()  # sessions with a chunk queued behind the one in work
        self.ended: list[compat.EndedChunk] = []  # outputs ending superseded chunks, for the next step
        self.chunks_taken_over = 0

    def next_chunk(self, session: compat.Request, update: compat.StreamingUpdate) -> compat.StreamingUpdate:
        """The chunk vLLM appends to a parked session, rewritten so that appending it is right."""
        if ChunkMeta.of(update.sampling_params).replaces_prompt:
            return self._cut_to_common_prefix(session, update)
        if compat.was_evicted(session):
            # evicted while parked: resend the whole prompt; vLLM's prefix cache returns what survived
            new_ids = compat.prompt_ids(session) + compat.chunk_ids(update)
            compat.truncate_session_prompt(session, 0)
            return compat.with_prompt(update, new_ids)
        return update

    def _cut_to_common_prefix(
        self, session: compat.Request, update: compat.StreamingUpdate
    ) -> compat.StreamingUpdate:
        """Keep the KV of the LCP (all but one token at most, so the chunk yields logits); the
        update then carries only the tokens past it."""
        new_ids = compat.chunk_ids(update)
        held = compat.computed_token_ids(session)
        lcp = common_prefix_len(held, new_ids)
        kept, tail = compat.cut_session_kv(self._scheduler, session, min(lcp, len(new_ids) - 1))
        compat.truncate_session_prompt(session, kept)
        record = UpdateRecord(len(held), len(new_ids), lcp, kept, len(new_ids) - kept, len(held) - kept, tail)
        self._accounting.record_update(session.request_id, record)
        return compat.with_prompt(update, new_ids[kept:])

    def mark_if_superseded(self, request: compat.Request) -> None:
        """A session with a chunk queued behind the one in work: the queued chunk takes over at the
        next step (stream mode's chunks say so; stock vLLM's wait their turn)."""
        chunk = compat.next_queued_chunk(request)
        if chunk is not None and ChunkMeta.of(chunk.sampling_params).in_place:
            self._superseded.add(request.request_id)

    def take_over_superseded(self) -> list[str]:
        """Before a step: each marked session's queued chunks take over the chunk in work (those
        not ready yet stay marked); the sessions changed. The outputs that end the superseded
        chunks wait in ``ended`` for the step's outputs."""
        changed = []
        for request_id in list(self._superseded):
            request = compat.find_request(self._scheduler, request_id)
            if request is None:
                self._superseded.discard(request_id)
                continue
            while compat.take_over_ready(request):
                chunk = compat.next_queued_chunk(request)
                keep_rest = not ChunkMeta.of(chunk.sampling_params).replaces_prompt
                self.ended.append(compat.take_over_chunk(self._scheduler, request, keep_rest))
                self.chunks_taken_over += 1
                changed.append(request_id)
            if compat.next_queued_chunk(request) is None or compat.is_parked(request):
                self._superseded.discard(request_id)
        return changed

    def take_ended(self) -> list[compat.EndedChunk]:
        ended, self.ended = self.ended, []
        return ended
