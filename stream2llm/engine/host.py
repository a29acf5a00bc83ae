"""What a session needs of its engine, and nothing more: the engine hands each session one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from stream2llm.context.prompt import TextTokenizer
from stream2llm.engine.decode import DecodeBackend
from stream2llm.errors import EngineDied


@dataclass(frozen=True)
class SessionHost:
    """The engine's side of a session: submit and abort vLLM requests, who answers, hear that the
    session ended.

    A narrow seam instead of a back-reference: a session never reaches into the engine, and the
    engine never reaches into a session (it calls the session's public methods only)."""

    generate: Callable[..., AsyncIterator[Any]]  # vLLM's generate(prompt, sampling, request_id=...)
    decode: DecodeBackend  # who answers once the prompt is prefilled (this engine or another)
    abort: Callable[[str], Awaitable[None]]  # vLLM's abort(request_id): frees the request's KV
    closed: Callable[[str], None]  # the session with this id ended: it holds no slot any more
    tokenizer: TextTokenizer  # decodes the generated tokens
    engine_died: Callable[[], EngineDied | None]  # the engine's death, if it died (checked now)
    policy: Callable[[], tuple[str, str]]  # the engine's policy and preemption, stamped on every chunk
