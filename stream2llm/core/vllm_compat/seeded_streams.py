"""A streaming session's seeded sampling, made the same as one request's (worker side).

vLLM's model runner builds a request's ``torch.Generator`` only when the request is first added;
``GPUModelRunner._update_streaming_request`` swaps a streaming session's sampling parameters for
the next chunk's and keeps the old generator. A session whose earlier chunks were greedy (no
generator) therefore sampled its seeded final chunk from the batch's global RNG: not reproducible,
and not what one request with the same seed gives. Each chunk now gets a generator seeded afresh,
so the final chunk samples as a one-shot request with that seed does from its first token.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["reseed_streaming_updates"]


def reseed_streaming_updates() -> bool:
    """Patch vLLM's model runner (idempotent; the CPU runner inherits the method); False where
    this vLLM has no such method (then it is left as it is)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = getattr(GPUModelRunner, "_update_streaming_request", None)
    if original is None:
        return False
    if getattr(original, "_stream2llm_reseeds", False):
        return True

    @functools.wraps(original)
    def update(self: Any, req_id: str, new_req_data: Any) -> Any:
        state = original(self, req_id, new_req_data)
        state.generator = chunk_generator(state.sampling_params, self.device)
        return state

    update._stream2llm_reseeds = True  # type: ignore[attr-defined]
    GPUModelRunner._update_streaming_request = update
    return True


def chunk_generator(sampling_params: Any, device: Any) -> Any:
    """The generator vLLM gives a new request with these parameters: seeded, or none."""
    import torch
    from vllm.sampling_params import SamplingType

    if sampling_params is None or sampling_params.sampling_type != SamplingType.RANDOM_SEED:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling_params.seed)
    return generator
