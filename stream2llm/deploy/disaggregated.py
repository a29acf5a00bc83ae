"""``stream2llm serve --disaggregate``: a prefill instance (stream2llm's streaming engine, serving
the API in this process) and a decode instance (vLLM's own OpenAI server, a child process), with
KV moving between them through vLLM's KV-connector API (``core.kv_connector``).

What moves where: each session's chunks are prefilled here as they arrive; the connector saves every
full KV block the step it is computed (and the final prompt's partial last block) into a host-local
store (a directory in shared memory); when the session's context is final, its last chunk is
prefilled, and the whole prompt's token ids go to the decode instance, whose connector loads every
stored leading block and which computes the rest (the last token, when every block was stored) and
generates. The decode instance is plain vLLM: it only gets ``--kv-transfer-config``. Either instance
dying ends the deployment (the other is stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from stream2llm.core.kv_store import DEFAULT_ROOT
from stream2llm.deploy.instance_flags import instance_flags
from stream2llm.deploy.replicas import Child, cpus_for, free_ports, spawn, stop_all, wait_healthy
from stream2llm.engine.config import EngineConfig

DECODE_MODEL = "decode"  # the decode instance's served model name
CONNECTORS = ("stream2llm", "nixl")
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}  # vLLM's P/D connector on GPUs


def transfer_configs(connector: str, store: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """vLLM's kv_transfer_config for the prefill and the decode instance. ``stream2llm``: our
    connector, saving each block as it is computed into ``store``, loaded from there; ``nixl``:
    vLLM's NixlConnector, the decode instance pulling the blocks from the prefill's memory (GPU,
    RDMA) once the prompt is done (needs the ``nixl`` package: CUDA only)."""
    from stream2llm.core.kv_connector import transfer_config

    if connector == "stream2llm":
        return transfer_config("kv_producer", store), transfer_config("kv_consumer", store)
    if connector == "nixl":
        return dict(NIXL), dict(NIXL)
    raise ValueError(f"unknown --kv-connector {connector!r}; known: {', '.join(CONNECTORS)}")


def decode_argv(config: EngineConfig, model: Any, port: int, transfer: dict[str, Any]) -> list[str]:
    """vLLM's OpenAI server as the decode instance: the prefill instance's model, sizes and
    numerics, and the connector in the consumer role."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model.path)]
    argv += ["--served-model-name", DECODE_MODEL, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--dtype", config.dtype, "--seed", str(config.seed)]
    argv += ["--max-model-len", str(config.max_model_len)]
    argv += ["--max-num-seqs", str(config.max_num_seqs)]
    argv += ["--max-num-batched-tokens", str(config.max_num_batched_tokens)]
    argv += ["--kv-cache-memory-bytes", str(config.kv_cache_bytes)]
    argv += ["--enforce-eager", "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    argv += ["--enable-scale-out"]  # vLLM's token-in, token-out /inference/v1/generate
    argv += ["--kv-transfer-config", json.dumps(transfer)]
    if config.block_size is not None:
        argv += ["--block-size", str(config.block_size)]
    if config.otlp_traces_endpoint is not None:  # its llm_request span joins the session's trace
        argv += ["--otlp-traces-endpoint", config.otlp_traces_endpoint]
    return argv + list(instance_flags(model.engine_overrides))  # what the model needs (Gemma: full KV)


def new_store(root: str | None = None) -> str:
    """A fresh directory for one deployment's KV blocks (shared memory where there is any)."""
    return tempfile.mkdtemp(prefix="stream2llm-kv-", dir=root or DEFAULT_ROOT)


async def start_decode(config: EngineConfig, transfer: dict[str, Any], timeout_s: float = 900.0) -> Child:
    """Start the decode instance on a free loopback port; return once it answers /health."""
    from stream2llm.engine import models

    model = await asyncio.to_thread(models.resolve, config.model)
    (port,) = free_ports(1)
    argv = decode_argv(config, model, port, transfer)
    child = await spawn(
        "decode instance", f"http://127.0.0.1:{port}", argv, cpus_for("STREAM2LLM_DECODE_CPUS", 0)
    )
    try:
        await wait_healthy(child, "/health", timeout_s)
    except BaseException:
        await asyncio.shield(stop_all([child]))
        raise
    return child


async def run_disaggregated(
    config: EngineConfig,
    serve: Callable[[EngineConfig], Any],
    notify: Callable[[str], None],
    connector: str = "stream2llm",
    store_root: str | None = None,
) -> None:
    """Start the decode instance, then ``serve(config)`` (the prefill instance, its connector and
    decode URL set) until it returns, fails, or the decode instance exits; stop both."""
    store = new_store(store_root)
    decode: Child | None = None
    try:
        prefill_transfer, decode_transfer = transfer_configs(connector, store)
        decode = await start_decode(config, decode_transfer)
        notify(f"decode instance: {decode.url} (pid {decode.process.pid}), KV store {store}")
        prefill = replace(
            config,
            kv_transfer=prefill_transfer,
            decode_url=decode.url,
            decode_model=DECODE_MODEL,
            decode_pulls_kv=connector == "nixl",
        )
        await _until_first_ends(serve(prefill), decode)
    finally:
        if decode is not None:
            await asyncio.shield(stop_all([decode]))
        shutil.rmtree(store, ignore_errors=True)


async def _until_first_ends(serving: Any, decode: Child) -> None:
    """Run the prefill instance's server; if the decode instance exits first, stop it and say why."""
    server = asyncio.ensure_future(serving)
    try:
        done, _ = await asyncio.wait([server, decode.waiter], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        server.cancel()
        with contextlib.suppress(BaseException):
            await server
        raise
    if server in done:
        return server.result()
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server
    raise RuntimeError(f"the decode instance exited with status {decode.process.returncode}")
