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
