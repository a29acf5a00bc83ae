"""vLLM general plugin, loaded by vLLM in every one of its processes (front end, engine core, workers).

vLLM's CPU attention picks an AMX kernel for bf16 but never asks Linux for AMX tile permission, so
an engine whose first forward pass is short dies with SIGILL. Asking once per process fixes it.
"""


def register() -> None:
    import torch

    if not torch.cuda.is_available() and hasattr(torch, "cpu") and torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
