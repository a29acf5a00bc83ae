from __future__ import annotations

import hashlib

import pytest

from stream2llm.engine import models


def test_tiny_is_cached_and_self_describing(tiny_model):
    again = models.prepare("tiny")
    assert again.path == tiny_model.path
    assert tiny_model.bos_token_id == 1 and tiny_model.eos_token_ids == (2,)
    assert (tiny_model.path / "model.safetensors").stat().st_size > 1_000_000


def test_tiny_build_is_deterministic(tiny_model, tmp_path):
    meta = models.build_tiny(tmp_path)
    assert meta["bos_token_id"] == tiny_model.bos_token_id
    for name in ("model.safetensors", "tokenizer.json"):
        digest = [hashlib.sha256((p / name).read_bytes()).hexdigest() for p in (tmp_path, tiny_model.path)]
        assert digest[0] == digest[1], name


def test_resolve_names_dirs_and_errors(tiny_model):
    assert models.resolve("tiny").path == tiny_model.path
    assert models.resolve(str(tiny_model.path)).bos_token_id == tiny_model.bos_token_id
    with pytest.raises(ValueError, match="neither a known name"):
        models.resolve("/nonexistent/model")
    names = [name for name, _, _ in models.list_models()]
    assert names == ["tiny", "gemma-270m"]


GEMMA3_LIKE = {
    "model_type": "gemma3_text",
    "sliding_window": 512,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
}


@pytest.mark.parametrize(
    ("config", "sliding"),
    [
        (GEMMA3_LIKE, True),
        ({"model_type": "gemma3", "text_config": {"sliding_window": 1024}}, True),
        ({"model_type": "mistral", "sliding_window": 4096}, True),
        ({"model_type": "mistral", "sliding_window": None}, False),
        ({"model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}, False),
        ({"model_type": "llama", "layer_types": ["full_attention"] * 2}, False),
        ({"model_type": "llama"}, False),
    ],
)
def test_sliding_window_models_are_recognised(config, sliding):
    assert models.has_sliding_window(config) is sliding
    assert models.hybrid_kv_overrides(config, {}) == ({models.HYBRID_KV_FLAG: True} if sliding else {})


def test_turning_full_kv_off_on_a_sliding_window_model_is_refused():
    from stream2llm.errors import StreamError

    with pytest.raises(StreamError, match="sliding-window layers"):
        models.hybrid_kv_overrides(GEMMA3_LIKE, {models.HYBRID_KV_FLAG: False})
    assert models.hybrid_kv_overrides(GEMMA3_LIKE, {models.HYBRID_KV_FLAG: True}) == {
        models.HYBRID_KV_FLAG: True
    }


def test_engine_args_give_a_sliding_window_directory_full_kv(tmp_path, tiny_model):
    """A plain HF directory (no stream2llm.json) with sliding-window layers gets the flag."""
    import json

    from stream2llm.engine.config import EngineConfig, engine_args

    cfg = json.loads((tiny_model.path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 64}))
    info = models.ModelInfo.load(tmp_path)
    assert engine_args(EngineConfig(model=str(tmp_path)), info, "/tmp/board").disable_hybrid_kv_cache_manager
    assert not engine_args(
        EngineConfig(model="tiny"), tiny_model, "/tmp/board"
    ).disable_hybrid_kv_cache_manager


def test_trained_tiny_model_is_peaked_and_sees_one_changed_token(tiny_model):
    """Random weights give near-flat logits (mean max-prob ~0.002): a stale KV entry would hardly
    move an output. The trained model is peaked on held-out English, and one token changed 500
    positions back moves the last position's logprobs far beyond the equivalence tests' 1e-4."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.conftest import corpus_text

    tok = AutoTokenizer.from_pretrained(tiny_model.path)
    model = LlamaForCausalLM.from_pretrained(tiny_model.path, dtype=torch.float32).eval()
    ids = torch.tensor([tok(corpus_text(6000, seed=3))["input_ids"][:1000]])
    changed = ids.clone()
    changed[0, 500] = (int(changed[0, 500]) + 7) % 1000 + 4
    with torch.no_grad():
        lp, lp2 = (model(x).logits.log_softmax(-1) for x in (ids, changed))
    assert lp.exp().max(-1).values.mean().item() > 0.3
    assert (lp[0, -1] - lp2[0, -1]).abs().max().item() > 1e-3
