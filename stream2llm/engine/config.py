"""How the engine is started: its configuration and the vLLM engine arguments built from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stream2llm.core.cost_profile import DEFAULT_PROFILE, profile_json
from stream2llm.core.kv_connector import tier_config
from stream2llm.core.policies import PREEMPTIONS
from stream2llm.core.protocol import CONFIG_KEY
from stream2llm.engine import models
from stream2llm.engine.tracing import check_endpoint

Mode = Literal["stream", "vllm", "nonstream"]
MODES: tuple[str, ...] = ("stream", "vllm", "nonstream")
SCHEDULER_CLS = "stream2llm.core.scheduler.StreamScheduler"
WORKER_EXTENSION_CLS = "stream2llm.core.worker_extension.StreamWorkerExtension"  # imported by workers only


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
    # how an evicted session gives its KV back: "recompute" (no tier), "offload" (always to the
    # host KV tier) or "cost" (per victim, whichever the cost profile expects to cost less)
    preemption: str = "cost"
    cost_profile: str = DEFAULT_PROFILE  # packaged name or JSON file (stream2llm calibrate)
    kv_tier_bytes: int | None = None  # the host KV tier's bound; None: 4x kv_cache_bytes
    kv_tier_path: str | None = None  # a directory for it; None: a fresh one in shared memory
    step_log: str | None = None  # a file the engine core appends one JSON line per step to
    # vLLM's own stat loggers: its Prometheus metrics (``vllm:...``, in prometheus_client's global
    # registry) as ``vllm serve`` exports them; ``stream2llm serve`` turns them on
    vllm_stats: bool = False
    # vLLM's KV cache events (its KVEventsConfig fields, as ``vllm serve --kv-events-config``):
    # BlockStored / BlockRemoved / AllBlocksCleared on a ZMQ publisher, for KV-aware routers
    kv_events: dict[str, Any] | None = None
    kv_events_audit: str | None = None  # a file the core keeps its cached block hashes in (checks)
    # OpenTelemetry: sessions' traces go to this OTLP collector (``vllm serve
    # --otlp-traces-endpoint``; OTEL_EXPORTER_OTLP_TRACES_PROTOCOL picks grpc or http/protobuf)
    otlp_traces_endpoint: str | None = None
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


def check_config(config: EngineConfig) -> None:
    """A configuration the engine cannot run with is refused before anything starts, naming the
    field (the engine core would otherwise fail deep in vLLM, or run without its tier)."""
    if config.preemption not in PREEMPTIONS:
        raise ValueError(f"preemption={config.preemption!r}: expected one of {', '.join(PREEMPTIONS)}")
    if config.kv_tier_bytes is not None and config.kv_tier_bytes <= 0:
        raise ValueError(f"kv_tier_bytes={config.kv_tier_bytes}: the KV tier needs a positive bound")
    profile_json(config.cost_profile)  # ValueError naming the packaged profiles
    if config.kv_events is not None:
        check_kv_events(config.kv_events)
    if config.otlp_traces_endpoint is not None:
        check_endpoint(config.otlp_traces_endpoint)


def kv_events_config(fields: dict[str, Any]) -> Any:
    """vLLM's KVEventsConfig from ``--kv-events-config``'s fields, events on unless said otherwise;
    a field vLLM does not know is refused by name."""
    from vllm.config import KVEventsConfig

    return KVEventsConfig(**{"enable_kv_cache_events": True, **fields})


def check_kv_events(fields: dict[str, Any]) -> None:
    """Refuse KV-event settings vLLM would fail on deep in the engine core: a field it does not
    know, or a publisher endpoint this host cannot bind (tried and released at once)."""
    try:
        events = kv_events_config(fields)
    except Exception as exc:  # vLLM's config validation: pydantic or TypeError
        raise ValueError(f"kv_events={fields!r}: {exc}") from None
    endpoint = events.endpoint
    binds = "*" in endpoint or "::" in endpoint or endpoint.startswith("ipc://")  # as vLLM decides
    if events.publisher != "zmq" or not binds:
        return  # a connecting endpoint: the subscriber side binds
    import zmq

    socket = zmq.Context.instance().socket(zmq.PUB)
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ValueError(f"kv_events endpoint {endpoint!r}: {exc}") from None
    finally:
        socket.close(linger=0)


def has_kv_tier(config: EngineConfig) -> bool:
    """Whether the engine gets its own host KV tier: a preemption that may offload, and no other
    KV connector (a disaggregated prefill instance's connector is configured by ``kv_transfer``)."""
    return config.preemption != "recompute" and config.kv_transfer is None


def vllm_offloading_tier(cpu_bytes: int) -> dict[str, Any]:
    """``EngineConfig.kv_transfer`` for vLLM's own ``OffloadingConnector`` as the KV tier (CUDA/ROCm/
    XPU only: its CPU spec refuses a CPU engine). It stores every block as it is computed and loads
    on any hit, so evicted sessions resume from it whatever the cost model says; stream2llm's own
    tier is then off (one connector per engine)."""
    return {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"cpu_bytes_to_use": cpu_bytes, "eviction_policy": "lru"},
    }


def tier_bytes(config: EngineConfig) -> int:
    return config.kv_tier_bytes if config.kv_tier_bytes is not None else 4 * config.kv_cache_bytes


def engine_args(
    config: EngineConfig, model: models.ModelInfo, board_path: str, tier_path: str | None = None
) -> Any:
    """vLLM's AsyncEngineArgs: our scheduler and its options, stream2llm's own tokenization, and
    our KV connector as the engine's host KV tier where it has one (``tier_path``)."""
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
        "worker_extension_cls": WORKER_EXTENSION_CLS,  # workers seed streaming chunks as requests
        "additional_config": {
            CONFIG_KEY: {
                "policy": config.policy,
                "stats_path": board_path,
                "parked_kv_cap": config.parked_kv_cap,
                "step_log": config.step_log,
                "preemption": config.preemption,
                "cost_profile": profile_json(config.cost_profile),
                "session_ttl_s": config.session_ttl_s,
                "kv_events_audit": config.kv_events_audit,
            }
        },
        "disable_log_stats": not config.vllm_stats,
        **model.engine_overrides,
        **config.engine_args,
    }
    transfer = config.kv_transfer
    if transfer is None and tier_path is not None:
        transfer = tier_config(tier_path, tier_bytes(config))
    if config.kv_events is not None:
        kwargs["kv_events_config"] = kv_events_config(config.kv_events)
    if transfer is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(**transfer)
    kwargs.update(models.hybrid_kv_overrides(models.hf_config(model.path), kwargs))
    if config.block_size is not None:
        kwargs["block_size"] = config.block_size
    return AsyncEngineArgs(**kwargs)
