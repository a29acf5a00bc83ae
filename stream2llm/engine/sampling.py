"""Sampling parameters of a streamed session: what it accepts, and the defaults it gets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stream2llm.errors import StreamError


def _vllm() -> Any:
    """vLLM's public API, imported lazily: `import vllm` costs seconds and most callers need none of it."""
    import vllm

    return vllm


def default_sampling() -> Any:
    """Greedy, 64 tokens: what a session gets when the caller names no sampling parameters."""
    return _vllm().SamplingParams(temperature=0, max_tokens=64)


def check_sampling(sampling: Any) -> None:
    """Reject what vLLM's streaming sessions cannot do, before anything reaches the engine."""
    if getattr(sampling, "n", 1) != 1:
        raise StreamError("streamed sessions support n=1 only")
    if getattr(sampling, "stop", None):
        raise StreamError("streamed sessions do not support stop strings; use stop_token_ids")
    if not sampling.max_tokens or sampling.max_tokens < 1:
        raise StreamError("sampling.max_tokens must be at least 1")
    kind = getattr(sampling, "output_kind", None)
    if kind is not None and kind != _vllm().sampling_params.RequestOutputKind.CUMULATIVE:
        # the session counts the intermediate chunks' throw-away tokens off the front of the
        # final chunk's cumulative output; DELTA would drop real tokens, FINAL_ONLY is refused by
        # vLLM's streaming input. Text deltas come from SessionOutput.stream() anyway.
        raise StreamError(
            f"streamed sessions need output_kind=CUMULATIVE (got {kind.name}); "
            "read incremental text from the session's stream() instead"
        )


def with_eos_stop(sampling: Any, eos_token_ids: Sequence[int]) -> Any:
    """vLLM runs without its tokenizer here, so it does not know the end-of-sequence token:
    name it (unless ``ignore_eos``), or generation only stops at ``max_tokens``."""
    eos = [t for t in eos_token_ids if t not in (sampling.stop_token_ids or ())]
    if sampling.ignore_eos or not eos:
        return sampling
    sampling = sampling.clone()
    sampling.stop_token_ids = [*(sampling.stop_token_ids or ()), *eos]
    return sampling
