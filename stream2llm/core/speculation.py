"""The speculation gate: a partial stream is prefilled ahead of its final only while that pays.

Prefilling a partial stream's chunk bets that the final keeps it. In update mode a refinement
throws away the KV past its longest common prefix; a session whose updates have thrown away more
than the policy's ``speculation_gate`` share of the tokens prefilled for it stops speculating:
its next partial chunks wait in the engine core, unscheduled, and go in with its final (taken
over in place, so only the final is prefilled, from the KV the session still holds), as
``nonstream-ranked`` would serve it. Once closed, the gate stays closed for the session: held
chunks compute nothing, so they give no new evidence.
"""

from __future__ import annotations

import dataclasses

from stream2llm.core import vllm_compat as compat
from stream2llm.core.accounting import Accounting
from stream2llm.core.protocol import CONFIG_KEY, ChunkMeta, ChunkOp


class SpeculationGate:
    """Which sessions speculate, and the partial chunks held for those that do not."""

    def __init__(self, accounting: Accounting) -> None:
        self._accounting = accounting
        self.held: dict[str, list[compat.StreamingUpdate]] = {}
        self.chunks_held = 0
        self.sessions_gated = 0

    def closed(self, request_id: str, limit: float | None) -> bool:
        """Whether this session's updates threw away more than ``limit`` of what was prefilled
        for it (None: the policy never gates). A session with no update yet speculates."""
        counters = self._accounting.counters(request_id)
        if limit is None or counters is None or not counters.updates or not counters.tokens_prefilled:
            return False
        return counters.tokens_discarded > limit * counters.tokens_prefilled

    def hold(self, request_id: str, chunk: compat.StreamingUpdate) -> None:
        if request_id not in self.held:
            self.sessions_gated += 1
        self.held.setdefault(request_id, []).append(chunk)
        self.chunks_held += 1

    def take(self, request_id: str) -> list[compat.StreamingUpdate]:
        return self.held.pop(request_id, [])

    def forget(self, request_id: str) -> None:
        self.held.pop(request_id, None)


def merge_chunks(chunks: list[compat.StreamingUpdate]) -> compat.StreamingUpdate:
    """One chunk with the effect of the held chunks and the final, in order (the final's sampling
    parameters): an update carries the whole prompt, so it replaces what came before it; an
    append extends it. Only the merged prompt is prefilled, from the KV the session holds."""
    op, ids = ChunkOp.APPEND, []
    for chunk in chunks:
        if ChunkMeta.of(chunk.sampling_params).replaces_prompt:
            op, ids = ChunkOp.UPDATE, compat.chunk_ids(chunk)
        else:
            ids += compat.chunk_ids(chunk)
    final = compat.with_prompt(chunks[-1], ids)
    if op is ChunkMeta.of(final.sampling_params).op:
        return final
    params = final.sampling_params.clone()
    params.extra_args = {**params.extra_args, CONFIG_KEY: {**params.extra_args[CONFIG_KEY], "op": op.value}}
    return dataclasses.replace(final, sampling_params=params)
