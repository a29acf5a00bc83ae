"""How the deployments build their children's command lines and CPU bindings (no process started)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from stream2llm.deploy.disaggregated import decode_argv, transfer_configs
from stream2llm.deploy.instance_flags import instance_flags
from stream2llm.deploy.replicas import ReplicaPlan, cpus_for, instance_argv
from stream2llm.engine.config import EngineConfig


def test_cpus_for_gives_each_instance_its_cores(monkeypatch):
    monkeypatch.setenv("STREAM2LLM_REPLICA_CPUS", "0-3|4-7")
    assert [cpus_for("STREAM2LLM_REPLICA_CPUS", i) for i in range(3)] == ["0-3", "4-7", "0-3"]
    monkeypatch.delenv("STREAM2LLM_REPLICA_CPUS")
    assert cpus_for("STREAM2LLM_REPLICA_CPUS", 0) is None


def test_instance_flags_turn_booleans_into_flag_pairs():
    assert instance_flags({"model": "tiny", "disaggregate": True, "token": None, "kv_cache_gb": 0.5}) == (
        "--model", "tiny", "--disaggregate", "--kv-cache-gb", "0.5",
    )  # fmt: skip
    assert instance_flags({"allow_insecure_bind": False}) == ("--no-allow-insecure-bind",)


def test_both_layouts_give_an_instance_the_same_flags_for_the_same_options(tmp_path):
    """A replica (``stream2llm serve``) and the decode instance (vLLM) get one set of flags for one
    set of options, a False boolean included (said as ``--no-...``, not dropped by one of them)."""
    options = {"disable_hybrid_kv_cache_manager": False, "enforce_eager": True, "max_num_seqs": 8, "x": None}
    expected = ("--no-disable-hybrid-kv-cache-manager", "--enforce-eager", "--max-num-seqs", "8")
    replica = instance_argv(ReplicaPlan(2, serve_args=instance_flags(options)), 9000)
    model = SimpleNamespace(path=tmp_path, engine_overrides=options)
    decode = decode_argv(EngineConfig(model="tiny"), model, 9001, {})
    assert replica[4 : 4 + len(expected)] == list(expected)  # python -m stream2llm serve <flags> --host ...
    assert decode[-len(expected) :] == list(expected)


def test_every_boolean_an_instance_may_be_given_has_a_negative_form():
    """``serve`` reads ``--no-<name>`` for each of its booleans that a replica is started with."""
    import typer.main

    from stream2llm.cli import app

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    flags = {p.name: p.secondary_opts for p in serve.params if getattr(p, "is_flag", False)}
    assert flags.pop("debug") == []  # the supervisor's own, never an instance's
    assert flags == {name: [f"--no-{name.replace('_', '-')}"] for name in flags} and flags


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
