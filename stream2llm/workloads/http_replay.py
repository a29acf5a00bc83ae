"""Replay traces over HTTP against any deployment (one ``stream2llm serve``, replicas behind
vllm-router, instances on several hosts): the session API, with the in-process replay's arrivals,
payloads and metrics.

Per request: open (with its own ``X-Session-ID``, so a session-hashing router keeps it on one
instance), read the SSE stream, send each event (append or update) at its time, the last one
final. TTFT is the client's: from sending the final event (or the open) to the first streamed token.
The scheduling policy is the deployment's; a policy name here only chooses the session mode.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp

from stream2llm.workloads.bench_policies import bench_policy
from stream2llm.workloads.metrics import BENCH_SCHEMA, RequestRecord, RunResult
from stream2llm.workloads.replay import BenchPlan, EventText, ReplayOptions, plan_run, replay_all
from stream2llm.workloads.trace import TraceRequest

SESSION_HEADER = "X-Session-ID"
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30)


class HttpError(RuntimeError):
    """The deployment answered with an error (status and its message)."""


@dataclass
class Timing:
    """Client-side times (event loop clock) of one request."""

    opened: float = 0.0
    final_sent: float | None = None
    first_token: float | None = None


def session_id(request_id: str, salt: str) -> str:
    """A valid client-chosen session id: the trace's id, then the run's salt."""
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', request_id)[:96]}-{salt[:12]}"


async def _call(http: aiohttp.ClientSession, method: str, url: str, sid: str, body: Any = None) -> dict:
    async with http.request(method, url, json=body, headers={SESSION_HEADER: sid}) as response:
        text = await response.text()
        if response.status >= 400:
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text.strip()[:300]
            raise HttpError(f"{method} {url}: {response.status} {message}")
        return json.loads(text)


async def read_stream(http: aiohttp.ClientSession, url: str, sid: str, timing: Timing) -> dict:
    """The session's SSE stream until its result; notes when the first token arrived."""
    loop = asyncio.get_running_loop()
    async with http.get(url, headers={SESSION_HEADER: sid}) as response:
        if response.status >= 400:
            raise HttpError(f"GET {url}: {response.status} {(await response.text())[:300]}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event["type"] in ("delta", "result") and timing.first_token is None:
                timing.first_token = loop.time()
            if event["type"] == "error":
                raise HttpError(f"session {sid}: {event['error']['message']}")
            if event["type"] == "result":
                return event
    raise HttpError(f"session {sid}: the stream ended without a result (its instance may have died)")


async def replay_one(
    http: aiohttp.ClientSession,
    base: str,
    request: TraceRequest,
    record: RequestRecord,
    mode: str,
    start: float,
    payloads: list[str | list[str]],
    options: ReplayOptions,
    salt: str,
) -> None:
    loop = asyncio.get_running_loop()
    arrival = start + record.arrival_s
    await asyncio.sleep(max(0.0, arrival - loop.time()))
    sid, timing = session_id(request.id, salt), Timing(opened=loop.time())
    url = f"{base}/v1/sessions/{sid}"
    opening = {"question": request.query, "max_tokens": options.max_tokens, "ignore_eos": True}
    opening |= {"mode": mode, "cache_salt": salt, "session_id": sid}
    await _call(http, "POST", f"{base}/v1/sessions", sid, opening)
    stream = asyncio.create_task(read_stream(http, f"{url}/stream", sid, timing))
    try:
        last = len(request.events) - 1
        for i, (event, payload) in enumerate(zip(request.events, payloads)):
            await asyncio.sleep(max(0.0, arrival + event.t * options.delay_multiplier - loop.time()))
            if stream.done():
                break  # the session failed (its error is raised below)
            timing.final_sent = loop.time() if i == last else None
            body = {"text": payload} if isinstance(payload, str) else {"docs": payload}
            await _call(
                http,
                "POST",
                f"{url}/{'append' if isinstance(payload, str) else 'update'}",
                sid,
                body | {"final": i == last},
            )
        result = await stream
    except BaseException:
        stream.cancel()
        raise
    _fill(record, result, timing, loop.time() - start)


def _fill(record: RequestRecord, result: dict, timing: Timing, done_s: float) -> None:
    assert timing.first_token is not None
    record.ttft_final_s = timing.first_token - (timing.final_sent or timing.opened)
    record.ttft_query_s = timing.first_token - timing.opened
    record.done_s = done_s
    record.prompt_tokens = result["prompt_tokens"]
    record.final_chunk_tokens = result["chunks"][-1]["tokens"] if result["chunks"] else 0
    record.tokens_prefilled = result["tokens_prefilled"]
    record.tokens_recomputed = result["tokens_recomputed"]
    record.kv_transfer = result.get("kv_transfer")


async def run_once_http(
    http: aiohttp.ClientSession,
    base: str,
    requests: Sequence[TraceRequest],
    texts: EventText,
    policy: str,
    qps: float,
    options: ReplayOptions,
    repeat: int = 0,
    on_done: Callable[[], None] | None = None,
) -> RunResult:
    """One (policy, qps) run over the whole trace, over HTTP; the same arrivals as ``run_once``."""
    mode = bench_policy(policy).mode
    plan = plan_run(requests, texts, qps, options, repeat)
    start = asyncio.get_running_loop().time()

    async def replay(request: TraceRequest, record: RequestRecord, events: list[str | list[str]]) -> None:
        await replay_one(http, base, request, record, mode, start, events, options, plan.salt)

    await replay_all(replay, requests, plan.records, plan.payloads, plan.deadline, on_done)
    return RunResult(policy, qps, repeat, plan.records, completion_s=plan.completion_s())


def event_text(model: str, max_model_len: int, options: ReplayOptions) -> EventText:
    """The in-process replay's payload builder, fed the model's tokenizer without an engine."""
    from stream2llm.context.prompt import TextTokenizer
    from stream2llm.engine import models

    info = models.resolve(model)
    shape = SimpleNamespace(
        tokenizer=TextTokenizer(info.path, info.bos_token_id),
        config=SimpleNamespace(max_model_len=max_model_len),
    )
    return EventText(shape, options)  # type: ignore[arg-type]


async def run_http_bench(
    endpoint: str,
    requests: Sequence[TraceRequest],
    plan: BenchPlan,
    options: ReplayOptions,
    texts: EventText,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every (policy, qps, repeat) against the endpoint; a ``stream2llm.bench/1`` document."""
    base = endpoint.rstrip("/")
    document: dict[str, Any] = {
        "schema": BENCH_SCHEMA,
        "complete": False,
        "engine": {"endpoint": base, "scheduler": "the deployment's"},
        "options": vars(options) | {"requests": len(requests)},
        "runs": [],
    }
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for qps in plan.qps:
            for repeat in range(plan.repeat):
                for policy in plan.policies:
                    tick = progress(f"{policy} @ {qps} qps", len(requests)) if progress else None
                    result = await run_once_http(
                        http, base, requests, texts, policy, qps, options, repeat, tick
                    )
                    document["runs"].append(result.to_json())
                    if checkpoint is not None:
                        checkpoint(document)
    document["complete"] = True
    return document
