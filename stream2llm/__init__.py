"""stream2llm: streaming-aware RAG serving on vLLM.

The public names are imported lazily: ``import vllm`` takes seconds, and the CLI, the connectors
and the workload tools often need none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ContextEvent", "EngineConfig", "Op", "SamplingParams", "Session", "StreamingEngine"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from vllm import SamplingParams

    from stream2llm.context.events import ContextEvent, Op
    from stream2llm.engine.engine import EngineConfig, Session, StreamingEngine


def __getattr__(name: str) -> Any:
    if name == "SamplingParams":
        from vllm import SamplingParams

        return SamplingParams
    if name in ("ContextEvent", "Op"):
        from stream2llm.context import events

        return getattr(events, name)
    if name in ("EngineConfig", "Session", "StreamingEngine"):
        from stream2llm.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'stream2llm' has no attribute {name!r}")
