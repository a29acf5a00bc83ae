"""Local models, one concern a module: ``registry`` (the known names, prepare, resolve, list),
``info`` (what a model directory says about itself, chat turns), ``hybrid_kv`` (what a
sliding-window model needs from the engine), ``cache`` (where prepared models live, atomic builds),
``tiny`` and ``gemma`` (building each). Callers use this package's names: ``models.prepare("tiny")``.
"""

from stream2llm.engine.models.cache import cache_root
from stream2llm.engine.models.gemma import build_gemma
from stream2llm.engine.models.hybrid_kv import (
    HYBRID_KV_FLAG,
    has_sliding_window,
    hf_config,
    hybrid_kv_overrides,
)
from stream2llm.engine.models.info import CHAT_TURNS, GEMMA_TURN, META_FILE, ModelInfo
from stream2llm.engine.models.registry import DEFAULT_MODEL, RECIPES, list_models, prepare, resolve
from stream2llm.engine.models.tiny import TINY_VERSION, build_tiny

__all__ = [
    "CHAT_TURNS",
    "DEFAULT_MODEL",
    "GEMMA_TURN",
    "HYBRID_KV_FLAG",
    "META_FILE",
    "RECIPES",
    "TINY_VERSION",
    "ModelInfo",
    "build_gemma",
    "build_tiny",
    "cache_root",
    "has_sliding_window",
    "hf_config",
    "hybrid_kv_overrides",
    "list_models",
    "prepare",
    "resolve",
]
