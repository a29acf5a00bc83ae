"""The replay against an engine in this process: its transport (``StreamingEngine`` sessions), one
run per (policy, qps) and the whole bench. The policies run in a rotated order from repeat to
repeat, since the machine's speed drifts within a bench.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from stream2llm.engine.engine import Session, StreamingEngine
from stream2llm.workloads.bench_policies import bench_policy, split_run_name
from stream2llm.workloads.filler import FillerText
from stream2llm.workloads.metrics import RunResult
from stream2llm.workloads.replay import (
    BenchPlan,
    EventText,
    Outcome,
    ReplayOptions,
    replay_once,
    rotated,
)
from stream2llm.workloads.trace import TraceRequest


class EngineSession:
    """A ``StreamingEngine`` session as the replay drives it; its outcome carries the engine's
    clock (the first token's time, the timeline to join with the step log)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def ended(self) -> bool:
        return False  # the session raises on its next event if it ended

    async def append(self, text: str, *, final: bool) -> None:
        await self._session.append(text, final=final)

    async def update(self, docs: list[str], *, final: bool) -> None:
        await self._session.update(docs, final=final)

    async def abort(self) -> None:
        await self._session.abort()

    async def result(self) -> Outcome:
        result = await self._session.result()
        times = (result.final_event_at, result.final_handoff_at, result.first_token_at)
        timeline = (self._session.request_id, *times) if None not in times else None
        return Outcome(
            ttft_final_s=result.ttft_final_s,
            ttft_query_s=result.ttft_open_s,
            prompt_tokens=len(result.prompt_token_ids),
            final_chunk_tokens=result.chunks[-1].tokens if result.chunks else 0,
            tokens_prefilled=result.tokens_prefilled,
            tokens_recomputed=result.tokens_recomputed,
            tokens_discarded=result.tokens_discarded,
            tokens_loaded=result.tokens_loaded,
            first_token_at=result.first_token_at,
            timeline=timeline,  # type: ignore[arg-type]
            kv_transfer=result.kv_transfer,
        )


class EngineTransport:
    """Opens sessions on ``engine`` in one session mode, each named after its trace request."""

    def __init__(self, engine: StreamingEngine, sampling: Any, mode: str) -> None:
        self._engine, self._sampling, self._mode = engine, sampling, mode

    async def open(self, request: TraceRequest, salt: str) -> EngineSession:
        session = await self._engine.open(
            request.query,
            self._sampling,
            mode=self._mode,
            request_id=f"{request.id}@{salt[:8]}",  # the trace's id, in the engine's step log too
            cache_salt=salt,
        )
        return EngineSession(session)


async def run_once(
    engine: StreamingEngine,
    requests: Sequence[TraceRequest],
    policy: str,
    qps: float,
    options: ReplayOptions,
    repeat: int = 0,
    on_done: Callable[[], None] | None = None,
) -> RunResult:
    """One (policy, qps) run over the whole trace."""
    from vllm import SamplingParams

    sampling = SamplingParams(temperature=0, max_tokens=options.max_tokens, ignore_eos=True)
    spec = bench_policy(policy)
    engine.set_policy(spec.scheduler, split_run_name(policy)[1] or engine.config.preemption)
    texts = EventText(engine.tokenizer, engine.config.max_model_len, options)
    transport = EngineTransport(engine, sampling, spec.mode)
    before = engine.stats()
    tier = TierGauge(engine.kv_tier_path)
    async with tier:
        result = await replay_once(transport, requests, texts, policy, qps, options, repeat, on_done)
        after = engine.stats()
        await wait_idle(engine)
    offloads = after.offloads - before.offloads
    result.preemption = engine.preemption
    result.preemptions = {"recompute": after.preemptions - before.preemptions - offloads, "offload": offloads}
    result.kv_tier = {
        "bytes_saved": after.tier_bytes_saved - before.tier_bytes_saved,
        "bytes_loaded": after.tier_bytes_loaded - before.tier_bytes_loaded,
        "load_failures": after.tier_load_failures - before.tier_load_failures,
        "peak_bytes": tier.peak_bytes,
        "bound_bytes": engine.kv_tier_bytes,
    }
    return result


class TierGauge:
    """Samples the bytes the engine's KV tier holds on disk (every ``period_s``) while a run goes
    on: the tier's own bound is checked by what it really occupies, not by its bookkeeping."""

    def __init__(self, path: str | None, period_s: float = 0.05) -> None:
        self.path, self.period_s, self.peak_bytes = path, period_s, 0
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> TierGauge:
        if self.path is not None:
            self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._measure()

    async def _sample(self) -> None:
        while True:
            self._measure()
            await asyncio.sleep(self.period_s)

    def _measure(self) -> None:
        total = 0
        with os.scandir(self.path) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
        self.peak_bytes = max(self.peak_bytes, total)


async def wait_idle(engine: StreamingEngine, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.requests == 0:
            return
        await asyncio.sleep(0.05)


class LowerBound:
    """TTFT of a prompt of n tokens on the idle engine (interpolated between measured sizes)."""

    def __init__(self, sizes: list[int], seconds: list[float]) -> None:
        self.sizes, self.seconds = sizes, seconds

    @classmethod
    async def measure(cls, engine: StreamingEngine, max_tokens: int, repeats: int = 3) -> LowerBound:
        from vllm import SamplingParams

        sampling = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        limit = engine.config.max_model_len - max_tokens - 1
        sizes = sorted(
            {s for s in (8, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768) if s <= limit} | {limit}
        )
        filler = FillerText(engine.tokenizer)
        seconds = []
        for size in sizes:
            ids = engine.tokenizer.encode(filler.text(f"lb-{size}", size))[:size]
            times = []
            for _ in range(repeats):
                t0 = time.monotonic()
                await engine.complete(ids, sampling, use_prefix_cache=False)
                times.append(time.monotonic() - t0)
            seconds.append(sorted(times)[len(times) // 2])
        return cls(sizes, seconds)

    def __call__(self, n_tokens: int) -> float:
        i = bisect.bisect_left(self.sizes, n_tokens)
        if i == 0:
            return self.seconds[0]
        if i >= len(self.sizes):
            return self.seconds[-1] * n_tokens / self.sizes[-1]
        x0, x1, y0, y1 = self.sizes[i - 1], self.sizes[i], self.seconds[i - 1], self.seconds[i]
        return y0 + (y1 - y0) * (n_tokens - x0) / (x1 - x0)


async def run_bench(
    engine: StreamingEngine,
    requests: Sequence[TraceRequest],
    plan: BenchPlan,
    options: ReplayOptions,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every (policy, qps, repeat) on the same engine, the policies rotated per repeat (each run
    records its ``position``); returns a ``stream2llm.bench/1`` document.
    ``checkpoint`` gets the document after each finished run (``complete`` false until the last),
    so an interrupted bench keeps what it measured."""
    lower_bound = await LowerBound.measure(engine, options.max_tokens)
    document = _bench_document(engine, requests, options, lower_bound)
    for qps in plan.qps:
        for repeat in range(plan.repeat):
            for position, policy in enumerate(rotated(plan.policies, repeat)):
                tick = progress(f"{policy} @ {qps} qps", len(requests)) if progress else None
                result = await run_once(engine, requests, policy, qps, options, repeat, tick)
                result.position = position
                for record in result.records:
                    if record.error is None:
                        record.lower_bound_s = lower_bound(record.final_chunk_tokens)
                document["runs"].append(result.to_json())
                if checkpoint is not None:
                    checkpoint(document)
    document["complete"] = True
    return document


def _bench_document(
    engine: StreamingEngine, requests: Sequence[TraceRequest], options: ReplayOptions, lower_bound: LowerBound
) -> dict[str, Any]:
    from stream2llm.workloads.metrics import BENCH_SCHEMA

    return {
        "schema": BENCH_SCHEMA,
        "complete": False,
        "engine": {
            "model": engine.config.model,
            "max_model_len": engine.config.max_model_len,
            "kv_cache_bytes": engine.config.kv_cache_bytes,
            "max_num_batched_tokens": engine.config.max_num_batched_tokens,
            "max_num_seqs": engine.config.max_num_seqs,
        },
        "options": vars(options) | {"requests": len(requests)},
        "policy_order": "rotated",  # repeat r runs policies[r % n:] + policies[:r % n]
        "lower_bound_profile": {"tokens": lower_bound.sizes, "seconds": lower_bound.seconds},
        "runs": [],
    }
