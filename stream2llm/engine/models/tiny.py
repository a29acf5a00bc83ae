"""``tiny``: a 2-layer Llama with a locally trained byte-level BPE, the test model. Built on this
machine in seconds, bit for bit the same everywhere (a fixed slice of the standard library as text,
fixed seeds, one thread), so tests on any machine see the same weights."""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path
from typing import Any

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
