"""``stream2llm calibrate``: fit a cost profile to the engine at hand."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from stream2llm.core.step_log import read_step_log
from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.workloads.simulate.cost_model import (
    CostProfile,
    fit_absolute,
    fit_frontend,
    fit_prefill,
    fit_steps,
)

TIER_NOTE = (
    "host KV tier: stream2llm's KV connector (core.kv_connector) saving victims' blocks to a "
    "shared-memory directory store and loading them back; measured by stream2llm calibrate"
)
CPU_BLOCK_TOKENS = 128  # vLLM's default block size on CPU
TIER_BLOCKS = (1, 4, 16, 64)  # blocks per measured save and load


Status = Callable[[str], AbstractContextManager[object]]  # shows what is going on (rich's status)


def _no_status(_: str) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


async def calibrate(
    model: str,
    *,
    max_model_len: int,
    repeats: int,
    status: Status = _no_status,
    max_batched_tokens: int = 2048,
) -> CostProfile:
    """Idle-engine TTFT against prompt length, fitted per step of ``max_batched_tokens`` (the
    engine prefills longer prompts in chunks, each paying the step's fixed cost). ``status`` shows
    what it is doing (the command's console); the library itself writes nothing."""
    from stream2llm.workloads.engine_replay import LowerBound

    config = EngineConfig(model=model, max_model_len=max_model_len, max_num_batched_tokens=max_batched_tokens)
    with status(f"starting {model} ..."):
        engine = await StreamingEngine.start(config)
    try:
        with status("measuring prefill latency at powers of two ..."):
            bound = await LowerBound.measure(engine, max_tokens=1, repeats=repeats)
    finally:
        await engine.shutdown()
    sizes, seconds = bound.sizes[1:], bound.seconds[1:]  # the smallest size is dominated by warm-up
    coeffs = fit_prefill(sizes, seconds, step_tokens=max_batched_tokens)
    kv_bytes = _kv_bytes_per_token(engine)
    with status("measuring the KV tier's save and load ..."):
        tier = measure_kv_tier(_num_layers(engine), config.block_size or CPU_BLOCK_TOKENS, kv_bytes, repeats)
    return CostProfile(
        name=f"measured-{model}",
        hardware=f"{platform.machine()} {platform.processor()}",
        model=model,
        prefill=coeffs,
        step_s=coeffs[0],
        decode_token_s=0.0005,
        kv_bytes_per_token=kv_bytes,
        kv_capacity_tokens=config.kv_cache_bytes // max(kv_bytes, 1),
        max_num_batched_tokens=config.max_num_batched_tokens,
        kv_save=tier.save,
        kv_load=tier.load,
        offload_note=TIER_NOTE,
        source=(
            f"stream2llm calibrate --max-batched-tokens {max_batched_tokens}, {time.strftime('%Y-%m-%d')}:"
            f" idle-engine TTFT, median of {repeats}; KV tier save/load of {TIER_BLOCKS} blocks"
        ),
        measurements={"tokens": sizes, "seconds": seconds, "kv_tier": tier.measurements},
    )


@dataclasses.dataclass(frozen=True)
class TierCurves:
    save: tuple[float, float]  # seconds = a + b*bytes
    load: tuple[float, float]
    measurements: dict


def measure_kv_tier(layers: int, block_tokens: int, bytes_per_token: int, repeats: int = 3) -> TierCurves:
    """Time the engine's own copy path (``core.kv_connector.copy_out``/``copy_in`` over a
    ``DirectoryStore`` in shared memory) for a few block counts at this model's KV geometry, and
    fit seconds = a + b*bytes to each direction (median of ``repeats``)."""
    from stream2llm.core.kv_connector import copy_in, copy_out
    from stream2llm.core.kv_store import DEFAULT_ROOT, DirectoryStore

    per_layer = block_tokens * bytes_per_token // layers // 2  # bf16 elements per layer and block
    most = max(TIER_BLOCKS)
    kv = [(torch.randn(most, per_layer).to(torch.bfloat16), 0) for _ in range(layers)]
    rows: dict[str, list[tuple[int, float]]] = {"save": [], "load": []}
    with tempfile.TemporaryDirectory(prefix="stream2llm-calibrate-", dir=DEFAULT_ROOT) as root:
        for n in TIER_BLOCKS:
            saves, loads = [], []
            for r in range(repeats):
                store = DirectoryStore(Path(root) / f"{n}-{r}", 1 << 40)
                blocks = [(i, f"{n:04x}{r:04x}{i:08x}") for i in range(n)]
                t0 = time.perf_counter()
                copy_out(store, kv, blocks)
                t1 = time.perf_counter()
                for block_id, key in blocks:
                    copy_in(store, kv, block_id, key)
                saves.append(t1 - t0)
                loads.append(time.perf_counter() - t1)
            size = n * block_tokens * bytes_per_token
            rows["save"].append((size, statistics.median(saves)))
            rows["load"].append((size, statistics.median(loads)))
    save, load = (_fit_linear(rows[k]) for k in ("save", "load"))
    return TierCurves(save, load, {k: [list(r) for r in v] for k, v in rows.items()})


def _fit_linear(rows: list[tuple[int, float]]) -> tuple[float, float]:
    """seconds = a + b*bytes by least squares over the measured rows."""
    a, b = fit_absolute([(1.0, size) for size, _ in rows], [s for _, s in rows])
    return a, b


def profile_from_steps(
    path: Path, base: CostProfile, max_batched_tokens: int, bench: Path | None = None
) -> CostProfile:
    """``base`` with its step and prefill costs fitted to a benchmark's logged engine steps
    (``stream2llm bench --step-log``): the machine as it ran under that load. With the bench's
    results JSON (its requests' timelines) the front end's costs are fitted too."""
    steps = read_step_log(path)
    costs = fit_steps(steps)
    from_bench: dict = {}
    if bench is not None:
        results = json.loads(bench.read_text())
        samples = [(t, n) for run in results["runs"] for t, n in _timelines(run) if t is not None]
        names = ("frontend_in_s", "tokenize_token_s", "frontend_out_s")
        from_bench = dict(zip(names, fit_frontend([t for t, _ in samples], [n for _, n in samples], steps)))
        if results.get("machine"):  # the machine the bench ran on, not the base profile's
            from_bench["hardware"] = f"{results['machine']} (bench {bench.parent.name})"
    return dataclasses.replace(
        base,
        name=f"steps-{path.parent.name or path.stem}",
        prefill=(costs.step_s, costs.token_s, costs.attention_s),
        step_s=costs.step_s,
        decode_token_s=costs.decode_s,
        chunk_request_s=costs.chunk_request_s,
        held_request_s=costs.held_request_s,
        max_num_batched_tokens=max_batched_tokens,
        source=f"stream2llm calibrate --from-steps {path}, {time.strftime('%Y-%m-%d')}: steps under load",
        measurements={},
        **from_bench,
    )


def _timelines(run: dict) -> list[tuple[list | None, int]]:
    samples = run["samples"]
    if "timeline" not in samples:
        raise ValueError("the bench results carry no request timelines (made before they were recorded)")
    return list(zip(samples["timeline"], samples["prompt_tokens"]))


def _num_layers(engine: StreamingEngine) -> int:
    return int(json.loads((engine.model.path / "config.json").read_text())["num_hidden_layers"])


def _kv_bytes_per_token(engine: StreamingEngine) -> int:
    cfg = json.loads((engine.model.path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return cfg["num_hidden_layers"] * kv_heads * head_dim * 2 * 2  # K and V, bf16
