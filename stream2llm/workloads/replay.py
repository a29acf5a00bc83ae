"""Replay traces against one engine: every policy, every rate, the same arrivals.

Queries arrive as a Poisson process (fixed seed, the same for every rate and policy, as published).
Each request replays its events at their recorded times (times ``delay_multiplier``): streaming
policies hand each event to the engine as it comes; ``nonstream`` sends the whole prompt once the
last event is in. Runs are separated by a cache salt, so no run reuses another's KV. The policies
run in a rotated order from repeat to repeat, since the machine's speed drifts within a bench.
"""

from __future__ import annotations

import asyncio
import bisect
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stream2llm.engine.engine import StreamingEngine
from stream2llm.workloads.arrivals import poisson_arrivals
from stream2llm.workloads.bench_policies import bench_policy
from stream2llm.workloads.filler import FillerText
from stream2llm.workloads.metrics import RequestRecord, RunResult
from stream2llm.workloads.synth import FILLER_PREFIX, request_tokens
from stream2llm.workloads.trace import TraceEvent, TraceRequest

TEMPLATE_ALLOWANCE = 96  # tokens of instructions and answer cue around the context


@dataclass(frozen=True)
class ReplayOptions:
    delay_multiplier: float = 1.0
    scale: float = 1.0  # multiplies synthetic token counts (n_tokens, filler documents)
    max_tokens: int = 1  # the published runs generated one token
    seed: int = 42
    deadline_s: float | None = None  # after the last scheduled event: abort what has not answered


class EventText:
    """Turns trace events into text, scaling synthetic token counts and capping each request so it
    fits the engine's context window."""

    def __init__(self, engine: StreamingEngine, options: ReplayOptions) -> None:
        self._filler = FillerText(engine.tokenizer)
        self._scale = options.scale
        self._cap = engine.config.max_model_len - options.max_tokens - TEMPLATE_ALLOWANCE

    def payloads(self, request: TraceRequest) -> list[str | list[str]]:
        """Each event's text (append) or documents (update), built before the run starts, so that
        making filler text takes no CPU from the engine while it is timed."""
        factor = self.factor(request)
        return [
            (self.append_text(request, i, event, factor) or " ")
            if event.op == "append"
            else self.docs(event, factor)
            for i, event in enumerate(request.events)
        ]

    def factor(self, request: TraceRequest) -> float:
        tokens = request_tokens(request) * self._scale
        return self._scale * min(1.0, self._cap / tokens) if tokens else self._scale

    def append_text(self, request: TraceRequest, index: int, event: TraceEvent, factor: float) -> str:
        if event.n_tokens is not None:
            return self._filler.text(f"{request.id}:{index}", max(1, round(event.n_tokens * factor)))
        return event.text or ""

    def docs(self, event: TraceEvent, factor: float) -> list[str]:
        out = []
        for doc in event.docs or ():
            if doc.startswith(FILLER_PREFIX):
                doc_id, n = doc[len(FILLER_PREFIX) :].rsplit(":", 1)
                out.append(self._filler.text(doc_id, max(1, round(int(n) * factor))))
            else:
                out.append(doc)
        return out


async def _replay_one(
    engine: StreamingEngine,
    request: TraceRequest,
    record: RequestRecord,
    policy: str,
    start: float,
    payloads: list[str | list[str]],
    sampling: Any,
    options: ReplayOptions,
    salt: str,
) -> None:
    loop = asyncio.get_running_loop()
    arrival = start + record.arrival_s
    await asyncio.sleep(max(0.0, arrival - loop.time()))
    spec = bench_policy(policy)
    session = await engine.open(
        request.query,
        sampling,
        mode=spec.mode,
        request_id=f"{request.id}@{salt[:8]}",  # the trace's id, in the engine's step log too
        cache_salt=salt,
    )
    last = len(request.events) - 1
    due_at = None  # when the trace says the final event is due, on the engine's (monotonic) clock
    try:
        for i, (event, payload) in enumerate(zip(request.events, payloads)):
            due = arrival + event.t * options.delay_multiplier
            if i == last:
                due_at = time.monotonic() + (due - loop.time())
            await asyncio.sleep(max(0.0, due - loop.time()))
            if isinstance(payload, str):
                await session.append(payload, final=i == last)
            else:
                await session.update(payload, final=i == last)
        result = await session.result()
    except asyncio.CancelledError:
        await session.abort()  # the run's deadline passed: free its KV
        raise
    record.ttft_final_s = result.ttft_final_s
    if result.first_token_at is not None and due_at is not None:
        record.ttft_due_s = result.first_token_at - due_at  # also counts the replay's own lateness
    record.ttft_query_s = result.ttft_open_s
    record.done_s = loop.time() - start
    record.prompt_tokens = len(result.prompt_token_ids)
    record.final_chunk_tokens = result.chunks[-1].tokens if result.chunks else 0
    record.tokens_prefilled = result.tokens_prefilled
    record.tokens_recomputed = result.tokens_recomputed
    record.tokens_discarded = result.tokens_discarded
    times = (result.final_event_at, result.final_handoff_at, result.first_token_at)
    if None not in times:
        record.timeline = (session.request_id, *times)


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
    engine.set_policy(bench_policy(policy).scheduler)
    plan = plan_run(requests, EventText(engine, options), qps, options, repeat)
    before = engine.stats()
    start = asyncio.get_running_loop().time()

    async def replay(request: TraceRequest, record: RequestRecord, events: list[str | list[str]]) -> None:
        await _replay_one(engine, request, record, policy, start, events, sampling, options, plan.salt)

    await replay_all(replay, requests, plan.records, plan.payloads, plan.deadline, on_done)
    after = engine.stats()
    await wait_idle(engine)
    return RunResult(
        policy,
        qps,
        repeat,
        plan.records,
        completion_s=plan.completion_s(),
        preemptions={"recompute": after.preemptions - before.preemptions},
    )


@dataclass
class RunPlan:
    """What one run replays, the same for the in-process and the HTTP replay: each request's
    payloads (built before the clock starts), arrival and record, the run's deadline, and a cache
    salt that keeps runs from reusing each other's KV."""

    payloads: list[list[str | list[str]]]
    records: list[RequestRecord]
    deadline: float | None
    salt: str

    def completion_s(self) -> float:
        return max((r.done_s for r in self.records if r.done_s is not None), default=0.0)


def plan_run(
    requests: Sequence[TraceRequest], texts: EventText, qps: float, options: ReplayOptions, repeat: int
) -> RunPlan:
    """The payloads, Poisson arrivals (seeded per repeat) and records of one (policy, qps) run."""
    arrivals = poisson_arrivals(len(requests), qps, options.seed + repeat)
    return RunPlan(
        payloads=[texts.payloads(r) for r in requests],
        records=[RequestRecord(r.id, a) for r, a in zip(requests, arrivals)],
        deadline=run_deadline(requests, arrivals, options),
        salt=uuid.uuid4().hex,
    )


async def replay_all(
    replay: Callable[[TraceRequest, RequestRecord, list[str | list[str]]], Awaitable[None]],
    requests: Sequence[TraceRequest],
    records: list[RequestRecord],
    payloads: list[list[str | list[str]]],
    deadline: float | None,
    on_done: Callable[[], None] | None = None,
) -> None:
    """Replay every request as its own task: one failing request records its error and the others
    go on; those still waiting at ``deadline`` are recorded as stalled; a stop from outside stops
    every request too (their sessions abort)."""
    past_deadline: list[bool] = []

    async def guarded(request: TraceRequest, record: RequestRecord, events: list[str | list[str]]) -> None:
        try:
            await replay(request, record, events)
        except asyncio.CancelledError:
            if not past_deadline:
                raise  # the bench itself was stopped
            record.error = f"stalled: no first token by the run's deadline ({deadline:g} s)"
        except Exception as exc:  # one failing request must not stop the run
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            if on_done:
                on_done()

    tasks = [asyncio.create_task(guarded(*job)) for job in zip(requests, records, payloads)]
    try:
        await asyncio.wait(tasks, timeout=deadline)
    finally:
        past_deadline.append(True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_deadline(
    requests: Sequence[TraceRequest], arrivals: list[float], options: ReplayOptions
) -> float | None:
    """Seconds after the start by which every request must have answered (None: no deadline)."""
    if options.deadline_s is None:
        return None
    last_event = max(a + r.duration_s * options.delay_multiplier for r, a in zip(requests, arrivals))
    return last_event + options.deadline_s


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


@dataclass(frozen=True)
class BenchPlan:
    policies: tuple[str, ...]
    qps: tuple[float, ...]
    repeat: int = 1


def rotated(policies: Sequence[str], repeat: int) -> list[str]:
    """The policies in the order repeat ``repeat`` runs them: each repeat starts one further on,
    so that no policy always runs first (on a cold machine) or always after the same one, while
    the machine's speed drifts over the bench."""
    if not policies:
        return []
    k = repeat % len(policies)
    return [*policies[k:], *policies[:k]]


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
