"""Replay traces over HTTP against any deployment (one ``stream2llm serve``, replicas behind
vllm-router, instances on several hosts): the session API as the replay's transport, with the
in-process replay's arrivals, payloads and metrics.

Per request: open (with its own ``X-Session-ID``, so a session-hashing router keeps it on one
instance), read the SSE stream, send each event (append or update) at its time, the last one
final. TTFT is the client's: from sending the final event (or the open) to the first streamed token;
second-token latency and time per output token are read from when the text deltas arrived (a
delta that holds several tokens, an incomplete character's, counts as their last).
The scheduling policy is the deployment's; a policy name here only chooses the session mode.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from stream2llm.workloads.bench_policies import bench_policy
from stream2llm.workloads.metrics import BENCH_SCHEMA
from stream2llm.workloads.replay import BenchPlan, EventText, Outcome, ReplayOptions, replay_once
from stream2llm.workloads.trace import TraceRequest

SESSION_HEADER = "X-Session-ID"
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30)


class HttpError(RuntimeError):
    """The deployment answered with an error (status and its message)."""


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


class HttpSession:
    """One session of the deployment: its SSE stream read in a task from the open on (noting when
    the first token came, on the event loop's clock), its events POSTed. Closing the stream (on
    an abort, or when a POST fails) makes the server abort the session."""

    def __init__(self, http: aiohttp.ClientSession, url: str, sid: str, opened: float) -> None:
        self._http, self._url, self._sid = http, url, sid
        self._opened = opened  # the open's time: TTFT from the query's arrival
        self._final_sent: float | None = None  # sending the final event: TTFT from the final event
        self._first_token: float | None = None
        self._deltas: list[float] = []  # when each text delta arrived
        self._stream = asyncio.create_task(self._read_stream())

    @property
    def ended(self) -> bool:
        return self._stream.done()

    async def append(self, text: str, *, final: bool) -> None:
        await self._post("append", {"text": text}, final)

    async def update(self, docs: list[str], *, final: bool) -> None:
        await self._post("update", {"docs": docs}, final)

    async def abort(self) -> None:
        self._stream.cancel()

    async def _post(self, op: str, body: dict[str, Any], final: bool) -> None:
        self._final_sent = asyncio.get_running_loop().time() if final else None
        try:
            await _call(self._http, "POST", f"{self._url}/{op}", self._sid, body | {"final": final})
        except BaseException:
            self._stream.cancel()
            raise

    async def result(self) -> Outcome:
        result = await self._stream
        assert self._first_token is not None
        deltas, n = self._deltas, result.get("completion_tokens", 0)
        return Outcome(
            ttft_final_s=self._first_token - (self._final_sent or self._opened),
            ttft_query_s=self._first_token - self._opened,
            prompt_tokens=result["prompt_tokens"],
            final_chunk_tokens=result["chunks"][-1]["tokens"] if result["chunks"] else 0,
            tokens_prefilled=result["tokens_prefilled"],
            tokens_recomputed=result["tokens_recomputed"],
            kv_transfer=result.get("kv_transfer"),
            second_token_s=deltas[1] - deltas[0] if len(deltas) > 1 else None,
            tpot_s=(deltas[-1] - deltas[0]) / (n - 1) if n > 1 and len(deltas) > 1 else None,
        )

    async def _read_stream(self) -> dict:
        """The session's SSE stream until its result; notes when the first token arrived."""
        loop, url, sid = asyncio.get_running_loop(), f"{self._url}/stream", self._sid
        async with self._http.get(url, headers={SESSION_HEADER: sid}) as response:
            if response.status >= 400:
                raise HttpError(f"GET {url}: {response.status} {(await response.text())[:300]}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if event["type"] in ("delta", "result") and self._first_token is None:
                    self._first_token = loop.time()
                if event["type"] == "delta":
                    self._deltas.append(loop.time())
                if event["type"] == "error":
                    raise HttpError(f"session {sid}: {event['error']['message']}")
                if event["type"] == "result":
                    return event
        raise HttpError(f"session {sid}: the stream ended without a result (its instance may have died)")


class HttpTransport:
    """Opens sessions through the deployment's ``/v1/sessions`` API in one session mode."""

    def __init__(self, http: aiohttp.ClientSession, base: str, mode: str, options: ReplayOptions) -> None:
        self._http, self._base, self._mode, self._max_tokens = http, base, mode, options.max_tokens

    async def open(self, request: TraceRequest, salt: str) -> HttpSession:
        sid, opened = session_id(request.id, salt), asyncio.get_running_loop().time()
        opening = {"question": request.query, "max_tokens": self._max_tokens, "ignore_eos": True}
        opening |= {"mode": self._mode, "cache_salt": salt, "session_id": sid}
        await _call(self._http, "POST", f"{self._base}/v1/sessions", sid, opening)
        return HttpSession(self._http, f"{self._base}/v1/sessions/{sid}", sid, opened)


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
                    transport = HttpTransport(http, base, bench_policy(policy).mode, options)
                    result = await replay_once(transport, requests, texts, policy, qps, options, repeat, tick)
                    document["runs"].append(result.to_json())
                    if checkpoint is not None:
                        checkpoint(document)
    document["complete"] = True
    return document
