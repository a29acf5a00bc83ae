"""The one replay of a trace, whatever carries it to the engine.

Queries arrive as a Poisson process (fixed seed, the same for every rate and policy, as published).
Each request replays its events at their recorded times (times ``delay_multiplier``): streaming
policies hand each event to the engine as it comes; ``nonstream`` sends the whole prompt once the
last event is in. Runs are separated by a cache salt, so no run reuses another's KV.

The walk over a request's events is written once (``replay_request``); what differs between an
engine in this process and a deployment over HTTP is a small transport (``ReplayTransport``), as
httpx separates a client from its transports: ``engine_replay`` and ``http_replay`` hold the two.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from stream2llm.workloads.arrivals import poisson_arrivals
from stream2llm.workloads.filler import FillerText
from stream2llm.workloads.metrics import RequestRecord, RunResult
from stream2llm.workloads.synth import FILLER_PREFIX, request_tokens
from stream2llm.workloads.trace import TraceEvent, TraceRequest

if TYPE_CHECKING:
    from stream2llm.context.prompt import TextTokenizer

TEMPLATE_ALLOWANCE = 96  # tokens of instructions and answer cue around the context
Payload = str | list[str]  # an append's text or an update's documents


@dataclass(frozen=True)
class ReplayOptions:
    delay_multiplier: float = 1.0
    scale: float = 1.0  # multiplies synthetic token counts (n_tokens, filler documents)
    max_tokens: int = 1  # the published runs generated one token
    seed: int = 42
    deadline_s: float | None = None  # after the last scheduled event: abort what has not answered


class EventText:
    """Turns trace events into text, scaling synthetic token counts and capping each request so it
    fits the context window. It needs the model's tokenizer (filler text is cut to a token count)
    and the context length, not an engine: the HTTP replay has no engine in its process."""

    def __init__(self, tokenizer: TextTokenizer, max_model_len: int, options: ReplayOptions) -> None:
        self._filler = FillerText(tokenizer)
        self._scale = options.scale
        self._cap = max_model_len - options.max_tokens - TEMPLATE_ALLOWANCE

    @classmethod
    def for_model(cls, model: str, max_model_len: int, options: ReplayOptions) -> EventText:
        """Payloads sized as ``model`` counts tokens (a name or a local HF directory), no engine."""
        from stream2llm.context.prompt import TextTokenizer
        from stream2llm.engine import models

        info = models.resolve(model)
        return cls(TextTokenizer(info.path, info.bos_token_id), max_model_len, options)

    def payloads(self, request: TraceRequest) -> list[Payload]:
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


# -- the transport: how a session reaches the engine ---------------------------------------------------
@dataclass
class Outcome:
    """What a finished session tells its record. A transport leaves at None (0 for
    ``tokens_discarded``) what it cannot see: over HTTP there is no engine clock or step log."""

    ttft_final_s: float
    ttft_query_s: float
    prompt_tokens: int
    final_chunk_tokens: int
    tokens_prefilled: int
    tokens_recomputed: int
    tokens_discarded: int = 0
    tokens_loaded: int = 0
    first_token_at: float | None = None  # on the monotonic clock: with the due time, ttft_due_s
    timeline: tuple[str, float, float, float] | None = None
    kv_transfer: dict[str, int] | None = None
    second_token_s: float | None = None  # first token to the second (where the transport sees it)
    tpot_s: float | None = None  # time per output token after the first


class ReplaySession(Protocol):
    """One open session, as the replay drives it."""

    @property
    def ended(self) -> bool:
        """The session ended before its last event (over HTTP: its stream closed); ``result``
        says why. An in-process session raises on its next event instead."""
        ...

    async def append(self, text: str, *, final: bool) -> None: ...

    async def update(self, docs: list[str], *, final: bool) -> None: ...

    async def result(self) -> Outcome: ...

    async def abort(self) -> None:
        """Stop the session and free its KV (the run's deadline passed, or the bench stopped)."""
        ...


class ReplayTransport(Protocol):
    """Opens the sessions of one run (its policy's session mode, its cache salt)."""

    async def open(self, request: TraceRequest, salt: str) -> ReplaySession: ...


async def replay_request(
    transport: ReplayTransport,
    request: TraceRequest,
    record: RequestRecord,
    payloads: list[Payload],
    start: float,
    options: ReplayOptions,
    salt: str,
) -> None:
    """Open the request's session at its arrival, send each event when the trace says it is due
    (the last one final) and fill ``record`` from the session's outcome."""
    loop = asyncio.get_running_loop()
    arrival = start + record.arrival_s
    await asyncio.sleep(max(0.0, arrival - loop.time()))
    session = await transport.open(request, salt)
    last = len(request.events) - 1
    due_at = None  # when the trace says the final event is due, on the engine's (monotonic) clock
    try:
        for i, (event, payload) in enumerate(zip(request.events, payloads)):
            due = arrival + event.t * options.delay_multiplier
            if i == last:
                due_at = time.monotonic() + (due - loop.time())
            await asyncio.sleep(max(0.0, due - loop.time()))
            if session.ended:
                break  # the session failed: its result raises why
            if isinstance(payload, str):
                await session.append(payload, final=i == last)
            else:
                await session.update(payload, final=i == last)
        outcome = await session.result()
    except asyncio.CancelledError:
        await session.abort()  # the run's deadline passed: free its KV
        raise
    fill(record, outcome, due_at, done_s=loop.time() - start)


def fill(record: RequestRecord, outcome: Outcome, due_at: float | None, done_s: float) -> None:
    """The record's fields from a finished session (``ttft_due_s`` where the transport saw the first
    token on the monotonic clock: it also counts the replay's own lateness)."""
    record.ttft_final_s = outcome.ttft_final_s
    if outcome.first_token_at is not None and due_at is not None:
        record.ttft_due_s = outcome.first_token_at - due_at
    record.ttft_query_s = outcome.ttft_query_s
    record.done_s = done_s
    record.prompt_tokens = outcome.prompt_tokens
    record.final_chunk_tokens = outcome.final_chunk_tokens
    record.tokens_prefilled = outcome.tokens_prefilled
    record.tokens_recomputed = outcome.tokens_recomputed
    record.tokens_discarded = outcome.tokens_discarded
    record.tokens_loaded = outcome.tokens_loaded
    record.timeline = outcome.timeline
    record.kv_transfer = outcome.kv_transfer
    record.second_token_s = outcome.second_token_s
    record.tpot_s = outcome.tpot_s


# -- a run: every request of the trace at one rate -------------------------------------------------------
@dataclass
class RunPlan:
    """What one run replays, the same for every transport: each request's payloads (built before
    the clock starts), arrival and record, the run's deadline, and a cache salt that keeps runs from
    reusing each other's KV."""

    payloads: list[list[Payload]]
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


async def replay_run(
    transport: ReplayTransport,
    requests: Sequence[TraceRequest],
    plan: RunPlan,
    options: ReplayOptions,
    on_done: Callable[[], None] | None = None,
) -> None:
    """Replay every request of ``plan`` through ``transport``, the clock starting now; the records
    of ``plan`` are filled in."""
    start = asyncio.get_running_loop().time()

    async def replay(request: TraceRequest, record: RequestRecord, payloads: list[Payload]) -> None:
        await replay_request(transport, request, record, payloads, start, options, plan.salt)

    await replay_all(replay, requests, plan.records, plan.payloads, plan.deadline, on_done)


async def replay_once(
    transport: ReplayTransport,
    requests: Sequence[TraceRequest],
    texts: EventText,
    policy: str,
    qps: float,
    options: ReplayOptions,
    repeat: int = 0,
    on_done: Callable[[], None] | None = None,
) -> RunResult:
    """One (policy, qps) run over the whole trace: planned, replayed and recorded the same way
    whichever transport carries it, so engine and HTTP runs compare."""
    plan = plan_run(requests, texts, qps, options, repeat)
    await replay_run(transport, requests, plan, options, on_done)
    return RunResult(policy, qps, repeat, plan.records, completion_s=plan.completion_s())


async def replay_all(
    replay: Callable[[TraceRequest, RequestRecord, list[Payload]], Awaitable[None]],
    requests: Sequence[TraceRequest],
    records: list[RequestRecord],
    payloads: list[list[Payload]],
    deadline: float | None,
    on_done: Callable[[], None] | None = None,
) -> None:
    """Replay every request as its own task: one failing request records its error and the others
    go on; those still waiting at ``deadline`` are recorded as stalled; a stop from outside stops
    every request too (their sessions abort)."""
    past_deadline: list[bool] = []

    async def guarded(request: TraceRequest, record: RequestRecord, events: list[Payload]) -> None:
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
