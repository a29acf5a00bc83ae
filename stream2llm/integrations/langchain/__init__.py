"""LangChain surfaces: the chat model (``ChatStream2LLM``), the streaming RAG Runnable
(``StreamingRAG``) and the retriever adapter.

Names load on first use, so importing one submodule (e.g. the retriever) does not load vLLM.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stream2llm.integrations.langchain.chat_model import (
        ChatOutcome,
        ChatRequest,
        ChatStream2LLM,
        render_messages,
        run_chat,
    )
    from stream2llm.integrations.langchain.runnable import StreamingRAG, rag_question

_HOME = {
    "ChatStream2LLM": "chat_model",
    "ChatRequest": "chat_model",
    "ChatOutcome": "chat_model",
    "run_chat": "chat_model",
    "render_messages": "chat_model",
    "StreamingRAG": "runnable",
    "rag_question": "runnable",
}
__all__ = [
    "ChatOutcome",
    "ChatRequest",
    "ChatStream2LLM",
    "StreamingRAG",
    "rag_question",
    "render_messages",
    "run_chat",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
