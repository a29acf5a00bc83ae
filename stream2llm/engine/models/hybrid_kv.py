"""What the engine must be told about a model's attention: a model with sliding-window layers
needs full-attention KV in every layer, or update mode silently recomputes every prompt."""

from __future__ import annotations

import json
from pathlib import Path

HYBRID_KV_FLAG = "disable_hybrid_kv_cache_manager"


def has_sliding_window(hf_config: dict) -> bool:
    """Whether a model's config.json declares sliding-window attention layers (Gemma 2/3, Mistral
    with a window, Qwen with ``use_sliding_window``), at the top level or in ``text_config``."""
    for cfg in (hf_config, hf_config.get("text_config") or {}):
        if "sliding_attention" in (cfg.get("layer_types") or ()):
            return True
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
            return True
    return False


def hybrid_kv_overrides(hf_config: dict, overrides: dict) -> dict:
    """Engine arguments a sliding-window model needs for update mode. vLLM's hybrid KV manager
    keeps only the last window of blocks in those layers, so an update's cut falls back to keeping
    nothing (``cut_session_kv``: keep = 0) and every update recomputes the whole prompt, silently.
    Full-attention KV for every layer fixes that (more KV memory); turning it off explicitly is
    refused, since update mode would be lost without a word."""
    if not has_sliding_window(hf_config):
        return {}
    if HYBRID_KV_FLAG in overrides and not overrides[HYBRID_KV_FLAG]:
        from stream2llm.errors import StreamError

        raise StreamError(
            f"this model has sliding-window layers: with {HYBRID_KV_FLAG}=False an update keeps no KV "
            "(every update recomputes the whole prompt); leave the flag on"
        )
    return {HYBRID_KV_FLAG: True}


def hf_config(path: Path) -> dict:
    """A model directory's config.json ({} if it has none)."""
    cfg = path / "config.json"
    return json.loads(cfg.read_text()) if cfg.exists() else {}
