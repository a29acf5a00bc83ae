"""Update mode: a chunk whose metadata says ``op == "update"`` carries a session's *whole* new prompt.

The session is cut back to the token-exact longest common prefix (LCP) of the tokens it holds and
the new ones; KV past it is freed, a kept block that carries a prefix-cache hash is never written
(its hash is dropped, or it is copied on write when shared), block hashes are recomputed from the
cut, and only the rest is prefilled again. A chunk still in work when an update queues behind it
is ended early: the rest of it would be replaced anyway.
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
        self._superseded: set[str] = set()  # sessions whose chunk in work an update will replace
        self.chunks_ended_early = 0

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
        """An update queued behind the chunk a session is working on replaces that chunk's context:
        prefilling the rest of it would be thrown away (an ANN pipeline refines faster than a
        long update prefills), so the chunk is ended early at the next step."""
        if any(ChunkMeta.of(u.sampling_params).replaces_prompt for u in compat.queued_chunks(request)):
            self._superseded.add(request.request_id)

    def end_superseded_chunks(self) -> list[str]:
        """Before a step: end each chunk marked as superseded after what was already scheduled;
        the sessions whose chunk was ended."""
        ended = []
        for request_id in self._superseded:
            request = compat.find_request(self._scheduler, request_id)
            if request is not None and compat.end_chunk_early(self._scheduler, request):
                self.chunks_ended_early += 1
                ended.append(request_id)
        self._superseded.clear()
        return ended
