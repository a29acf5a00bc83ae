"""Who answers once a session's prompt is prefilled: the local engine, or a remote decode instance.

Handover runs every chunk on the local engine either way. A decode backend says what the final
chunk samples with here (the caller's parameters when this engine answers; one throw-away token
when another instance does) and, when another instance answers, produces the answer from the
final prompt, the caller's sampling parameters and the KV connector's transfer parameters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from stream2llm.core.protocol import ChunkMeta
from stream2llm.engine.outputs import Generated


@dataclass(frozen=True)
class FinalPrompt:
    """The prompt the local engine prefilled for a session, as a decode instance needs it."""

    token_ids: list[int]
    cache_salt: str | None = None
    kv_params: dict[str, Any] = field(default_factory=dict)  # the KV connector's own (NIXL: where)
    trace_headers: dict[str, str] = field(default_factory=dict)  # the session's traceparent


class DecodeBackend(Protocol):
    """A strategy handover calls: how chunks sample here, and who answers after the final one.
    The final chunk's samples on the local engine are the answer, or its first token when
    ``ends_here`` says the answer goes on and ``decode`` answers the rest elsewhere."""

    def chunk_sampling(self, params: Any, meta: ChunkMeta) -> Any:
        """A chunk's sampling parameters as this backend needs them on the local engine."""
        ...

    def ends_here(self, finish_reason: str, sampling: Any) -> bool:
        """Whether the local engine's finish reason ends the caller's answer."""
        ...

    def decode(self, prompt: FinalPrompt, sampling: Any, first_token: int) -> AsyncIterator[Generated]:
        """The rest of the answer to a prefilled prompt after its first token, sampled locally
        (called only when ``ends_here`` said the answer goes on; the caller's sampling parameters)."""
        ...

    async def close(self) -> None: ...


class LocalDecode:
    """The local engine answers: the final chunk samples with the caller's parameters, in the same
    vLLM request that prefilled the chunks, so there is nothing to hand on."""

    def chunk_sampling(self, params: Any, meta: ChunkMeta) -> Any:
        return params

    def ends_here(self, finish_reason: str, sampling: Any) -> bool:
        return True

    async def decode(self, prompt: FinalPrompt, sampling: Any, first_token: int) -> AsyncIterator[Generated]:
        raise RuntimeError("the local engine answers in the prefill's own request")
        yield  # pragma: no cover - makes this an async generator

    async def close(self) -> None:
        return None
