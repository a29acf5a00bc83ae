"""vLLM general plugin, loaded by vLLM in every one of its processes (front end, engine core, workers).

vLLM's CPU attention picks an AMX kernel for bf16 but never asks Linux for AMX tile permission, so
an engine whose first forward pass is short dies with SIGILL. Asking once per process fixes it.
The workers' model runner also learns to seed each chunk of a streaming session afresh
(``vllm_compat.seeded_streams``), so a seeded session samples as one seeded request does.
"""


def register() -> None:
    import torch

    from stream2llm.core.vllm_compat.seeded_streams import reseed_streaming_updates

    if not torch.cuda.is_available() and hasattr(torch, "cpu") and torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()
    reseed_streaming_updates()
