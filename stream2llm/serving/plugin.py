"""vLLM general plugin, loaded by vLLM in every one of its processes (front end, engine core, workers).

- vLLM's CPU attention picks an AMX kernel for bf16 but never asks Linux for AMX tile permission,
  so an engine whose first forward pass is short dies with SIGILL. Asking once per process fixes it.
- On CPU, vLLM's shared-memory queue readers spin between steps, stealing a core from the model
  on small machines; ``STREAM2LLM_SHM_SPIN=1`` keeps vLLM's default spinning.
"""

import os


def register() -> None:
    import torch

    if not torch.cuda.is_available():
        if hasattr(torch, "cpu") and torch.cpu._is_amx_tile_supported():
            torch.cpu._init_amx()
        if os.environ.get("STREAM2LLM_SHM_SPIN", "0") != "1":
            from stream2llm.serving.vllm_compat import calm_shm_spin

            calm_shm_spin()
