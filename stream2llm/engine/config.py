"""How the engine is started: its configuration and the vLLM engine arguments built from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stream2llm.core.protocol import CONFIG_KEY
from stream2llm.engine import models

Mode = Literal["stream", "vllm", "nonstream"]
MODES: tuple[str, ...] = ("stream", "vllm", "nonstream")
SCHEDULER_CLS = "stream2llm.core.scheduler.StreamScheduler"


@dataclass
class EngineConfig:
    """How to start the engine. Sizes are explicit: vLLM on CPU refuses to guess the KV cache."""

    model: str = models.DEFAULT_MODEL
    policy: str = "stream2llm"
    max_model_len: int = 4096
    kv_cache_bytes: int = 1 << 30
    block_size: int | None = None  # vLLM's default: 128 tokens on CPU
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_sessions: int = 1024  # open sessions admitted at once
    session_ttl_s: float | None = 600.0  # abort a session whose next event does not come in time
    parked_kv_cap: float = 1.0  # fraction of KV blocks parked sessions may hold before eviction
    step_log: str | None = None  # a file the engine core appends one JSON line per step to
    dtype: str = "bfloat16"
    seed: int = 0
    fast_start: bool = False  # fork the engine processes (~4 s start; slower steps; tests only)
    # prefill/decode disaggregation (deploy.disaggregated): vLLM's kv_transfer_config for this
    # (prefill) instance, the decode instance (a vLLM OpenAI server) that answers, and whether it
    # pulls the KV itself given the prefill's kv_transfer_params (NIXL) or finds it in a store
    kv_transfer: dict[str, Any] | None = None
    decode_url: str | None = None
    decode_model: str = "decode"
    decode_pulls_kv: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)  # passed to vLLM's AsyncEngineArgs


def engine_args(config: EngineConfig, model: models.ModelInfo, board_path: str) -> Any:
    """vLLM's AsyncEngineArgs: our scheduler and its options, stream2llm's own tokenization."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = {
        "model": str(model.path),
        "skip_tokenizer_init": True,  # stream2llm tokenizes: token-exact chunking needs it anyway
        "enforce_eager": True,  # torch.compile adds ~40 s to start-up on CPU
        "enable_prefix_caching": True,
        "dtype": config.dtype,
        "seed": config.seed,
        "max_model_len": config.max_model_len,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_num_seqs": config.max_num_seqs,
        "kv_cache_memory_bytes": config.kv_cache_bytes,
        "scheduler_cls": SCHEDULER_CLS,
        "additional_config": {
            CONFIG_KEY: {
                "policy": config.policy,
                "stats_path": board_path,
                "parked_kv_cap": config.parked_kv_cap,
                "step_log": config.step_log,
            }
        },
        "disable_log_stats": True,
        **model.engine_overrides,
        **config.engine_args,
    }
    if config.kv_transfer is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(**config.kv_transfer)
    kwargs.update(models.hybrid_kv_overrides(models.hf_config(model.path), kwargs))
    if config.block_size is not None:
        kwargs["block_size"] = config.block_size
    return AsyncEngineArgs(**kwargs)
