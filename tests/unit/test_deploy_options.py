"""How the deployments build their children's command lines and CPU bindings (no process started)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from stream2llm.deploy.disaggregated import decode_argv, transfer_configs
from stream2llm.deploy.replicas import cpus_for, serve_args
from stream2llm.engine.config import EngineConfig


def test_cpus_for_gives_each_instance_its_cores(monkeypatch):
    monkeypatch.setenv("STREAM2LLM_REPLICA_CPUS", "0-3|4-7")
    assert [cpus_for("STREAM2LLM_REPLICA_CPUS", i) for i in range(3)] == ["0-3", "4-7", "0-3"]
    monkeypatch.delenv("STREAM2LLM_REPLICA_CPUS")
    assert cpus_for("STREAM2LLM_REPLICA_CPUS", 0) is None


def test_serve_args_turn_flags_into_bare_options():
    assert serve_args(model="tiny", disaggregate=True, token=None, kv_cache_gb=0.5) == (
        "--model", "tiny", "--disaggregate", "--kv-cache-gb", "0.5",
    )  # fmt: skip


def test_the_decode_instance_gets_the_prefills_model_sizes_and_the_consumer_role(tmp_path):
    prefill, decode = transfer_configs("stream2llm", str(tmp_path))
    assert (prefill["kv_role"], decode["kv_role"]) == ("kv_producer", "kv_consumer")
    assert prefill["kv_connector_module_path"] == "stream2llm.core.kv_connector"
    config = EngineConfig(model="tiny", dtype="float32", max_model_len=2048, block_size=32)
    model = SimpleNamespace(path=tmp_path, engine_overrides={"disable_hybrid_kv_cache_manager": True})
    argv = decode_argv(config, model, 9001, decode)
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[argv.index("--block-size") + 1] == "32"
    assert argv[argv.index("--max-model-len") + 1] == "2048" and "--disable-hybrid-kv-cache-manager" in argv
    assert json.loads(argv[argv.index("--kv-transfer-config") + 1]) == decode
    nixl = transfer_configs("nixl", str(tmp_path))
    assert nixl[0] == nixl[1] == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    with pytest.raises(ValueError, match="unknown --kv-connector 'lmcache'"):
        transfer_configs("lmcache", str(tmp_path))
