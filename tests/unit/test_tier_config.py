"""Which KV tier an engine gets from its configuration, built as vLLM will take it (no engine started):
stream2llm's own connector by default, vLLM's OffloadingConnector by ``kv_transfer`` (the GPU
configuration), none with ``preemption="recompute"``; the cost profile travels to the engine core."""

from __future__ import annotations

import pytest
from vllm.config import KVTransferConfig

from stream2llm.core.kv_connector import CONNECTOR_NAME
from stream2llm.engine.config import (
    EngineConfig,
    check_config,
    engine_args,
    has_kv_tier,
    vllm_offloading_tier,
)


def test_the_default_engine_has_our_tier_and_decides_by_the_packaged_profile(tiny_model, tmp_path):
    config = EngineConfig(model="tiny")
    assert has_kv_tier(config)
    args = engine_args(config, tiny_model, "/tmp/board", str(tmp_path))
    transfer = args.kv_transfer_config
    assert transfer.kv_connector == CONNECTOR_NAME and transfer.kv_role == "kv_both"
    assert transfer.kv_connector_extra_config["saves"] == "evicted"
    assert transfer.kv_connector_extra_config["capacity_bytes"] == 4 * config.kv_cache_bytes
    assert transfer.kv_load_failure_policy == "recompute"
    options = args.additional_config["stream2llm"]
    assert options["preemption"] == "cost" and options["cost_profile"]["name"] == "cpu-tiny"


def test_the_workers_get_the_extension_that_seeds_streaming_chunks(tiny_model):
    """vLLM resolves ``worker_extension_cls`` in each worker; importing it patches the runner."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    args = engine_args(EngineConfig(model="tiny", preemption="recompute"), tiny_model, "/tmp/board")
    assert resolve_obj_by_qualname(args.worker_extension_cls).__name__ == "StreamWorkerExtension"
    assert getattr(GPUModelRunner._update_streaming_request, "_stream2llm_reseeds", False)


def test_recompute_means_no_tier_at_all(tiny_model):
    config = EngineConfig(model="tiny", preemption="recompute")
    assert not has_kv_tier(config)
    assert engine_args(config, tiny_model, "/tmp/board", None).kv_transfer_config is None


def test_vllms_offloading_connector_is_the_tier_by_configuration(tiny_model, tmp_path):
    """The GPU layout: vLLM's OffloadingConnector (it refuses a CPU engine at start-up, so only
    the configuration is checked here), a GPU cost profile, and our own tier off."""
    tier = vllm_offloading_tier(16 << 30)
    KVTransferConfig(**tier)  # vLLM takes it as it is
    config = EngineConfig(model="tiny", kv_transfer=tier, cost_profile="h100-llama3.1-8b")
    check_config(config)
    assert not has_kv_tier(config)
    args = engine_args(config, tiny_model, "/tmp/board", None)
    assert args.kv_transfer_config.kv_connector == "OffloadingConnector"
    assert args.kv_transfer_config.kv_connector_extra_config["cpu_bytes_to_use"] == 16 << 30
    assert args.additional_config["stream2llm"]["cost_profile"]["name"] == "h100-llama3.1-8b"


def test_an_unknown_preemption_or_profile_is_refused_before_start():
    with pytest.raises(ValueError, match="preemption='swap'"):
        check_config(EngineConfig(preemption="swap"))
    with pytest.raises(ValueError, match="no cost profile 'h300'"):
        check_config(EngineConfig(cost_profile="h300"))
