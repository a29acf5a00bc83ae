"""stream2llm: streaming-aware RAG serving on vLLM.

The public names are imported lazily: ``import vllm`` takes seconds, and the CLI, the context code
and the workload tools often need none of it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from stream2llm.errors import (
    AdmissionRejected,
    ContextTooLong,
    EngineDied,
    InvalidEvent,
    OutputTooLong,
    SequenceError,
    SessionClosed,
    SessionExpired,
    StreamError,
    UnknownSession,
)

__all__ = [
    "AdmissionRejected",
    "ContextEvent",
    "ContextTooLong",
    "EngineConfig",
    "EngineDied",
    "InvalidEvent",
    "Op",
    "OutputTooLong",
    "SamplingParams",
    "SequenceError",
    "Session",
    "SessionClosed",
    "SessionExpired",
    "SessionResult",
    "StreamError",
    "StreamingEngine",
    "UnknownSession",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from vllm import SamplingParams

    from stream2llm.context.events import ContextEvent, Op
    from stream2llm.engine.config import EngineConfig
    from stream2llm.engine.engine import StreamingEngine
    from stream2llm.engine.outputs import SessionResult
    from stream2llm.engine.session import Session

# where each lazily imported public name lives
_LAZY = {
    "SamplingParams": "vllm",
    "ContextEvent": "stream2llm.context.events",
    "Op": "stream2llm.context.events",
    "EngineConfig": "stream2llm.engine.config",
    "StreamingEngine": "stream2llm.engine.engine",
    "Session": "stream2llm.engine.session",
    "SessionResult": "stream2llm.engine.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stream2llm' has no attribute {name!r}")
