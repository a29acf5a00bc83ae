"""Soak benchmark: thousands of mixed sessions, then every resource must be back where it started.

One tiny-model engine, the real HTTP server on 127.0.0.1 (``create_app`` + ``start_site``) driven by
real aiohttp clients, and the Python API on the same engine. The mix: append and update sessions
(stream, vllm, nonstream), OpenAI completions and chat (streamed and not), random aborts (DELETE),
clients that hang up mid-SSE, bad input (invalid JSON, empty appends, out-of-order and duplicate
events, oversized bodies, unknown session ids, events after the final) and sessions left to expire
(``session_ttl_s`` is small). Bounded in time (``--minutes``) and in count (``--max-scenarios``).

Baseline: after a warm-up of the same mix, the clients close and the engine drains; then a snapshot.
End: the same after the load. Compared: RSS of this process and of each engine child (tolerance
``--rss-tolerance-mb``), open sessions, the HTTP registry's running sessions, the scheduler's
requests / running / waiting / parked and KV usage (stats board), asyncio tasks, file descriptors
(``--fd-tolerance``). Any scenario that ended in something other than its expected outcome (a 5xx,
a hang, a session still open after its client left) also fails the run. Exit status 1 on any
failure; the JSON (time series every ``--sample-s``, baseline, end, checks, outcome counts) is
written to ``--out``/results.json.

    .venv/bin/python benchmarks/soak.py --minutes 20 --out benchmarks/results/soak-tiny-20m
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import aiohttp
import psutil

from stream2llm.context.events import ContextEvent, Op
from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.errors import (
    ContextTooLong,
    InvalidEvent,
    SequenceError,
    SessionClosed,
    SessionExpired,
    UnknownSession,
)
from stream2llm.server.app import ServerSettings, create_app, start_site
from stream2llm.server.registry import SERVER, SessionRegistry
from stream2llm.workloads.bench import machine

QUESTION = "What does the documentation say about this?"
SCENARIO_TIMEOUT_S = 60.0  # a scenario running longer is a hang: counted as a failure
GONE_TIMEOUT_S = 5.0  # a session whose client left must be gone from the engine by then
TEXT = "\n\n".join(topics[k] for k in sorted(topics))
MIB = 1 << 20


class Unexpected(Exception):
    """A scenario saw something other than its expected outcome."""


def piece(rng: random.Random, lo: int = 100, hi: int = 1200) -> str:
    n = rng.randint(lo, hi)
    start = rng.randrange(0, len(TEXT) - n)
    return TEXT[start : start + n]


def sampling(rng: random.Random, max_tokens: int | None = None) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0, max_tokens=max_tokens or rng.randint(2, 24), ignore_eos=rng.random() < 0.5
    )


class Tally:
    """Outcome counts per scenario, and the first failures' messages."""

    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.notes: dict[str, Counter[str]] = defaultdict(Counter)
        self.failures: list[str] = []

    def note(self, scenario: str, label: str) -> None:
        self.notes[scenario][label] += 1

    def fail(self, scenario: str, message: str) -> None:
        self.failed[scenario] += 1
        if len(self.failures) < 50:
            self.failures.append(f"{scenario}: {message}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": dict(self.ok),
            "failed": dict(self.failed),
            "notes": {k: dict(v) for k, v in self.notes.items()},
            "failures": self.failures,
            "total": sum(self.ok.values()) + sum(self.failed.values()),
        }


# -- HTTP helpers -------------------------------------------------------------------------------------


def expect(status: int, body: Any, *ok: int) -> Any:
    if status not in ok:
        raise Unexpected(f"HTTP {status} (expected {ok}): {str(body)[:300]}")
    return body


async def read_sse(response: aiohttp.ClientResponse, stop_after: int | None = None) -> list[Any]:
    """The ``data:`` payloads (JSON decoded, ``[DONE]`` as the string); stop after ``stop_after``."""
    expect(response.status, "", 200)
    events: list[Any] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


class Soak:
    """The mixed load, its bookkeeping and the resource snapshots."""

    def __init__(self, engine: StreamingEngine, url: str, server: SessionRegistry, args: argparse.Namespace):
        self.engine, self.url, self.server, self.args = engine, url, server, args
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.http: aiohttp.ClientSession | None = None
        self.started = 0
        self.checks: set[asyncio.Task] = set()  # delayed expiry checks
        self.model = server.model_name
        self.max_body = int(getattr(server.settings, "max_body_bytes", 4 * MIB))
        self.http_mix: list[tuple[str, int, Callable[[], Awaitable[None]]]] = [
            ("http_append", 20, self.h_append),
            ("http_update", 10, self.h_update),
            ("http_completion", 10, self.h_completion),
            ("http_completion_stream", 8, self.h_completion_stream),
            ("http_chat_stream", 5, self.h_chat_stream),
            ("http_abort", 10, self.h_abort),
            ("http_disconnect_sse", 10, self.h_disconnect),
            ("http_bad_input", 15, self.h_bad_input),
            ("http_expire", 4, self.h_expire),
        ]
        self.api_mix: list[tuple[str, int, Callable[[], Awaitable[None]]]] = [
            ("api_append", 25, self.a_append),
            ("api_update", 15, self.a_update),
            ("api_push_events", 15, self.a_push),
            ("api_abort", 15, self.a_abort),
            ("api_stream_break", 10, self.a_stream_break),
            ("api_bad_input", 10, self.a_bad_input),
            ("api_expire", 5, self.a_expire),
        ]

    # -- running ---------------------------------------------------------------------------------

    async def load(self, seconds: float, max_scenarios: int) -> None:
        """Run the mix with the configured workers until ``seconds`` pass or ``max_scenarios`` start."""
        deadline = time.monotonic() + seconds
        self.http = aiohttp.ClientSession(
            self.url, headers={"Content-Type": "application/json"}, timeout=aiohttp.ClientTimeout(total=60)
        )
        limit = self.started + max_scenarios
        try:
            workers = [self.worker(self.http_mix, deadline, limit) for _ in range(self.args.http_workers)]
            workers += [self.worker(self.api_mix, deadline, limit) for _ in range(self.args.api_workers)]
            await asyncio.gather(*workers)
            if self.checks:
                await asyncio.wait(self.checks, timeout=self.args.ttl * 3 + 30)
        finally:
            await self.http.close()
            self.http = None

    async def worker(self, mix: list, deadline: float, limit: int) -> None:
        names = [m[0] for m in mix]
        weights = [m[1] for m in mix]
        fns = {m[0]: m[2] for m in mix}
        while time.monotonic() < deadline and self.started < limit:
            name = self.rng.choices(names, weights)[0]
            self.started += 1
            await self.run_one(name, fns[name])

    async def run_one(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await asyncio.wait_for(fn(), SCENARIO_TIMEOUT_S)
            self.tally.ok[name] += 1
        except Unexpected as exc:
            self.tally.fail(name, str(exc))
        except asyncio.TimeoutError:
            self.tally.fail(name, f"no end within {SCENARIO_TIMEOUT_S:g} s")
        except Exception as exc:
            self.tally.fail(name, repr(exc)[:300])

    def later(self, name: str, coro: Awaitable[None]) -> None:
        """A delayed check (an expiry) that must not hold a worker."""
        task = asyncio.ensure_future(self.run_one(name, lambda: coro))
        self.checks.add(task)
        task.add_done_callback(self.checks.discard)

    async def gone(self, request_id: str) -> None:
        """The session must leave the engine (its KV freed) soon after its client left."""
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while any(s.request_id == request_id for s in self.engine.open_sessions()):
            if time.monotonic() > deadline:
                raise Unexpected(f"{request_id} still open {GONE_TIMEOUT_S:g} s after its client left")
            await asyncio.sleep(0.05)

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.request(method, path, **kw) as r:
            text = await r.text()
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = text
        if r.status >= 500:
            raise Unexpected(f"{method} {path}: HTTP {r.status}: {text[:300]}")
        return r.status, body

    # -- HTTP scenarios -------------------------------------------------------------------------------

    async def h_open(self, name: str, mode: str | None = None, max_tokens: int | None = None) -> str | None:
        rng = self.rng
        body = {
            "question": QUESTION,
            "max_tokens": max_tokens or rng.randint(2, 24),
            "temperature": 0,
            "ignore_eos": rng.random() < 0.5,
            "mode": mode or rng.choice(["stream", "stream", "vllm", "nonstream"]),
        }
        status, data = await self.call("POST", "/v1/sessions", json=body)
        if status == 429:
            self.tally.note(name, "429 at open")
            return None
        return expect(status, data, 201)["id"]

    async def h_result(self, name: str, sid: str) -> None:
        """Read the answer: the SSE stream to its end, or poll the session until it completes."""
        assert self.http is not None
        if self.rng.random() < 0.6:
            async with self.http.get(f"/v1/sessions/{sid}/stream") as r:
                events = await read_sse(r)
            if events[-1] != "[DONE]" or events[-2].get("type") != "result":
                raise Unexpected(f"stream of {sid} ended with {events[-2:]}")
            return
        for _ in range(600):
            status, data = await self.call("GET", f"/v1/sessions/{sid}")
            state = expect(status, data, 200)["state"]
            if state == "completed":
                return
            if state not in ("open", "generating"):
                raise Unexpected(f"{sid} ended {state}: {data.get('error')}")
            await asyncio.sleep(0.05)
        raise Unexpected(f"{sid} did not complete")

    async def h_append(self) -> None:
        sid = await self.h_open("http_append")
        if sid is None:
            return
        n = self.rng.randint(1, 4)
        for i in range(n):
            final = i == n - 1 and self.rng.random() < 0.5
            status, data = await self.call(
                "POST", f"/v1/sessions/{sid}/append", json={"text": piece(self.rng), "final": final}
            )
            expect(status, data, 200)
        if not final:
            expect(*await self.call("POST", f"/v1/sessions/{sid}/finish"), 200)
        await self.h_result("http_append", sid)

    async def h_update(self) -> None:
        sid = await self.h_open("http_update")
        if sid is None:
            return
        docs = [piece(self.rng, 100, 500) for _ in range(4)]
        for _ in range(self.rng.randint(1, 3)):
            self.rng.shuffle(docs)
            docs[0] = piece(self.rng, 100, 500)
            status, data = await self.call("POST", f"/v1/sessions/{sid}/update", json={"docs": docs[:3]})
            expect(status, data, 200)
        status, data = await self.call(
            "POST", f"/v1/sessions/{sid}/update", json={"docs": docs[1:], "final": True}
        )
        expect(status, data, 200)
        await self.h_result("http_update", sid)

    def completion_body(self, stream: bool, max_tokens: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": piece(self.rng, 50, 1500),
            "max_tokens": max_tokens or self.rng.randint(2, 24),
            "temperature": 0,
            "stream": stream,
        }
        if self.rng.random() < 0.3:
            body["prompt"], body["context"] = QUESTION, [piece(self.rng, 100, 600) for _ in range(2)]
        return body

    async def h_completion(self) -> None:
        status, data = await self.call("POST", "/v1/completions", json=self.completion_body(False))
        if status == 429:
            self.tally.note("http_completion", "429")
            return
        if not expect(status, data, 200)["choices"][0]["finish_reason"]:
            raise Unexpected(f"no finish_reason: {data}")

    async def h_completion_stream(self) -> None:
        assert self.http is not None
        async with self.http.post("/v1/completions", json=self.completion_body(True)) as r:
            if r.status == 429:
                self.tally.note("http_completion_stream", "429")
                return
            events = await read_sse(r)
        if events[-1] != "[DONE]" or not events[-2]["choices"][0]["finish_reason"]:
            raise Unexpected(f"stream ended with {events[-2:]}")

    async def h_chat_stream(self) -> None:
        assert self.http is not None
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": piece(self.rng, 50, 600)},
            ],
            "max_tokens": self.rng.randint(2, 24),
            "temperature": 0,
            "stream": self.rng.random() < 0.7,
        }
        async with self.http.post("/v1/chat/completions", json=body) as r:
            if r.status == 429:
                self.tally.note("http_chat_stream", "429")
                return
            if body["stream"]:
                events = await read_sse(r)
                if events[-1] != "[DONE]":
                    raise Unexpected(f"chat stream ended with {events[-2:]}")
            else:
                expect(r.status, await r.text(), 200)

    async def h_abort(self) -> None:
        """DELETE at a random moment: while context arrives, mid-prefill or mid-generation."""
        sid = await self.h_open("http_abort", max_tokens=self.rng.randint(8, 64))
        if sid is None:
            return
        for _ in range(self.rng.randint(0, 3)):
            expect(
                *await self.call("POST", f"/v1/sessions/{sid}/append", json={"text": piece(self.rng)}), 200
            )
        if self.rng.random() < 0.5:
            expect(*await self.call("POST", f"/v1/sessions/{sid}/finish"), 200)
        await asyncio.sleep(self.rng.random() * 0.3)
        status, data = await self.call("DELETE", f"/v1/sessions/{sid}")
        state = expect(status, data, 200)["state"]
        self.tally.note("http_abort", state)
        if state not in ("aborted", "completed"):
            raise Unexpected(f"DELETE left {sid} {state}")
        await self.gone(sid)

    async def h_disconnect(self) -> None:
        """Hang up mid-SSE (a completion or a session stream): the session must leave the engine."""
        assert self.http is not None
        if self.rng.random() < 0.5:
            body = {**self.completion_body(True, max_tokens=200), "ignore_eos": True}
            async with self.http.post("/v1/completions", json=body) as r:
                if r.status == 429:
                    self.tally.note("http_disconnect_sse", "429")
                    return
                events = await read_sse(r, stop_after=self.rng.randint(1, 3))
                r.close()  # drops the connection
            sid = events[0]["id"]
        else:
            sid = await self.h_open("http_disconnect_sse", mode="stream", max_tokens=200)
            if sid is None:
                return
            body = {"text": piece(self.rng), "final": True}
            expect(*await self.call("POST", f"/v1/sessions/{sid}/append", json=body), 200)
            async with self.http.get(f"/v1/sessions/{sid}/stream") as r:
                await read_sse(r, stop_after=self.rng.randint(1, 3))
                r.close()
        await self.gone(sid)

    async def h_bad_input(self) -> None:
        """One kind of bad request; it must get a 4xx (never a 5xx) and harm nothing else."""
        kind = self.rng.choice(
            [
                "invalid_json",
                "empty_body",
                "not_an_object",
                "unknown_field",
                "wrong_type",
                "bad_utf8",
                "empty_append",
                "empty_update",
                "oversized",
                "oversized_chunked",
                "unknown_session",
                "after_final",
                "bad_model",
                "unknown_route",
            ]
        )
        status = await self.bad_request(kind)
        self.tally.note("http_bad_input", f"{kind}:{status}")
        if not 400 <= status < 500 and status != -1:
            raise Unexpected(f"{kind}: HTTP {status}")

    async def bad_request(self, kind: str) -> int:
        raw = {
            "invalid_json": b'{"question": "x",',
            "empty_body": b"",
            "not_an_object": b'["question"]',
            "unknown_field": b'{"question": "x", "colour": "red"}',
            "wrong_type": b'{"question": "x", "max_tokens": "many"}',
            "bad_utf8": b'{"question": "\xff\xfe"}',
        }
        if kind in raw:
            return (await self.call("POST", "/v1/sessions", data=raw[kind]))[0]
        if kind == "unknown_session":
            sid = f"sess-{uuid.uuid4().hex}"
            method, path = self.rng.choice(
                [
                    ("POST", "/append"),
                    ("POST", "/update"),
                    ("POST", "/finish"),
                    ("GET", "/stream"),
                    ("GET", ""),
                    ("DELETE", ""),
                ]
            )
            return (await self.call(method, f"/v1/sessions/{sid}{path}", json={"text": "x", "docs": ["x"]}))[
                0
            ]
        if kind == "bad_model":
            return (await self.call("POST", "/v1/completions", json={"model": "nope", "prompt": "x"}))[0]
        if kind == "unknown_route":
            return (await self.call("POST", "/v1/nothing", json={}))[0]
        if kind.startswith("oversized"):
            return await self.oversized(chunked=kind.endswith("chunked"))
        sid = await self.h_open("http_bad_input", mode="stream")
        if sid is None:
            return 429
        try:
            if kind == "empty_append":
                return (await self.call("POST", f"/v1/sessions/{sid}/append", json={"text": ""}))[0]
            if kind == "empty_update":
                return (await self.call("POST", f"/v1/sessions/{sid}/update", json={"docs": []}))[0]
            expect(*await self.call("POST", f"/v1/sessions/{sid}/finish"), 200)  # after_final
            return (await self.call("POST", f"/v1/sessions/{sid}/append", json={"text": "late"}))[0]
        finally:
            expect(*await self.call("DELETE", f"/v1/sessions/{sid}"), 200)

    async def oversized(self, chunked: bool) -> int:
        """A body just over the server's limit; -1 when the server hung up before answering."""
        text = "x" * (self.max_body + 1024)
        data = json.dumps({"question": text}).encode()
        try:
            if chunked:

                async def body():  # no Content-Length: the limit must hold while reading
                    for i in range(0, len(data), 64 << 10):
                        yield data[i : i + (64 << 10)]

                return (await self.call("POST", "/v1/sessions", data=body()))[0]
            return (await self.call("POST", "/v1/sessions", data=data))[0]
        except aiohttp.ClientError:
            return -1

    async def h_expire(self) -> None:
        """Open, send one piece, go silent: the server must report it expired after session_ttl_s."""
        sid = await self.h_open("http_expire", mode=self.rng.choice(["stream", "vllm", "nonstream"]))
        if sid is None:
            return
        expect(*await self.call("POST", f"/v1/sessions/{sid}/append", json={"text": piece(self.rng)}), 200)

        async def check() -> None:
            await asyncio.sleep(self.args.ttl + 2.5)
            await self.gone(sid)
            status, data = await self.call("GET", f"/v1/sessions/{sid}")
            if status == 404:  # forgotten already (keep_results)
                self.tally.note("http_expire_check", "forgotten")
                return
            if expect(status, data, 200)["state"] != "expired":
                raise Unexpected(f"{sid} is {data['state']}, not expired")

        self.later("http_expire_check", check())

    # -- Python API scenarios ------------------------------------------------------------------

    def mode(self) -> str:
        return self.rng.choice(["stream", "stream", "vllm", "nonstream"])

    async def a_append(self) -> None:
        s = await self.engine.open(QUESTION, sampling(self.rng), mode=self.mode())
        n = self.rng.randint(1, 4)
        for i in range(n):
            await s.append(piece(self.rng), final=i == n - 1)
        if self.rng.random() < 0.5:
            text = "".join([d async for d in s.stream()])
            if text != (await s.result()).text:
                raise Unexpected("streamed text differs from the result")
        await s.result()

    async def a_update(self) -> None:
        s = await self.engine.open(QUESTION, sampling(self.rng), mode=self.mode())
        docs = [piece(self.rng, 100, 500) for _ in range(4)]
        for _ in range(self.rng.randint(1, 3)):
            self.rng.shuffle(docs)
            await s.update(docs[:3])
        await s.update(docs[1:], final=True)
        await s.result()

    async def a_push(self) -> None:
        """Retriever events: a skipped and a repeated seq are refused; the session goes on."""
        s = await self.engine.open(QUESTION, sampling(self.rng), mode=self.mode())
        rid = s.request_id
        n = self.rng.randint(2, 4)
        for seq in range(n):
            event = ContextEvent(rid, seq, Op.APPEND, piece(self.rng), final=seq == n - 1)
            if seq == n - 1 or self.rng.random() < 0.5:
                bad = ContextEvent(rid, seq + self.rng.randint(1, 3), Op.APPEND, "ahead")
                await self.refused(s.push(bad), SequenceError, "api_push_events", "out_of_order")
            await s.push(event)
            if seq < n - 1 and self.rng.random() < 0.3:
                await self.refused(s.push(event), SequenceError, "api_push_events", "duplicate")
        await self.refused(
            s.push(ContextEvent(rid, n, Op.APPEND, "late")), SessionClosed, "api_push_events", "after_final"
        )
        await s.result()

    async def refused(self, call: Awaitable[Any], error: type[Exception], name: str, label: str) -> None:
        try:
            await call
        except error:
            self.tally.note(name, label)
            return
        raise Unexpected(f"{label} was accepted (expected {error.__name__})")

    async def a_abort(self) -> None:
        s = await self.engine.open(QUESTION, sampling(self.rng, self.rng.randint(8, 64)), mode=self.mode())
        for _ in range(self.rng.randint(0, 3)):
            await s.append(piece(self.rng))
        if self.rng.random() < 0.5:
            await s.finish()
        await asyncio.sleep(self.rng.random() * 0.3)
        await s.abort()
        try:
            await s.result()
            self.tally.note("api_abort", "completed first")
        except SessionClosed:
            self.tally.note("api_abort", "aborted")
        await self.gone(s.request_id)

    async def a_stream_break(self) -> None:
        """A consumer that stops reading after the first delta, then aborts."""
        s = await self.engine.open(QUESTION, sampling(self.rng, 100), mode="stream")
        await s.append(piece(self.rng), final=True)
        async for _ in s.stream():
            break
        await s.abort()
        await self.gone(s.request_id)

    async def a_bad_input(self) -> None:
        s = await self.engine.open(QUESTION, sampling(self.rng), mode=self.mode())
        try:
            kind = self.rng.choice(["empty_append", "empty_update", "too_long", "unknown_id", "after_final"])
            if kind == "empty_append":
                await self.refused(s.append(""), InvalidEvent, "api_bad_input", kind)
            elif kind == "empty_update":
                await self.refused(s.update(["  "]), InvalidEvent, "api_bad_input", kind)
            elif kind == "too_long":
                await self.refused(s.append(TEXT[:40000]), ContextTooLong, "api_bad_input", kind)
            elif kind == "unknown_id":
                try:
                    self.engine.session(f"nope-{uuid.uuid4().hex}")
                    raise Unexpected("unknown session id accepted")
                except UnknownSession:
                    self.tally.note("api_bad_input", kind)
            else:
                await s.finish()
                await self.refused(s.append("late"), SessionClosed, "api_bad_input", kind)
        finally:
            await s.abort()

    async def a_expire(self) -> None:
        s = await self.engine.open(QUESTION, sampling(self.rng), mode=self.mode())
        await s.append(piece(self.rng))

        async def check() -> None:
            try:
                await asyncio.wait_for(s.result(), self.args.ttl + 5)
            except SessionExpired:
                await self.gone(s.request_id)
                return
            raise Unexpected(f"{s.request_id} did not expire")

        self.later("api_expire_check", check())

    # -- resources ---------------------------------------------------------------------------------

    def snapshot(self, t0: float) -> dict[str, Any]:
        proc = psutil.Process()
        children = []
        for child in proc.children(recursive=True):
            try:
                children.append(
                    {"pid": child.pid, "name": child.name(), "rss_mb": child.memory_info().rss / MIB}
                )
            except psutil.Error:
                continue
        stats = self.engine.stats()
        return {
            "t_s": round(time.monotonic() - t0, 2),
            "rss_mb": proc.memory_info().rss / MIB,
            "children": children,
            "children_rss_mb": sum(c["rss_mb"] for c in children),
            "fds": proc.num_fds(),
            "tasks": len(asyncio.all_tasks()),
            "open_sessions": len(self.engine.open_sessions()),
            "http_running": self.server.running(),
            "http_entries": len(self.server.entries),
            "kv_usage": stats.kv_usage,
            "sched_requests": stats.requests,
            "sched_running": stats.running,
            "sched_waiting": stats.waiting,
            "sched_parked": stats.parked,
            "tokens_prefilled": stats.tokens_prefilled,
            "preemptions": stats.preemptions,
            "scenarios_started": self.started,
            "scenarios_failed": sum(self.tally.failed.values()),
        }

    async def drain(self, timeout_s: float) -> float:
        """Wait until no session is open and the scheduler holds nothing; the seconds it took."""
        t = time.monotonic()
        while time.monotonic() - t < timeout_s:
            s = self.engine.stats()
            busy = s.requests or s.running or s.waiting or s.parked or s.kv_usage
            if not self.engine.open_sessions() and not self.server.running() and not busy:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # server-side connection handlers finish after the clients closed
        gc.collect()
        return time.monotonic() - t


# -- checks and the run ------------------------------------------------------------------------------


def compare(base: dict[str, Any], end: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """End against baseline: what must be back exactly, and what within a documented tolerance."""
    checks: list[dict[str, Any]] = []

    def check(name: str, b: float, e: float, limit: float, tolerance: str) -> None:
        checks.append(
            {"name": name, "baseline": b, "end": e, "limit": limit, "tolerance": tolerance, "ok": e <= limit}
        )

    for key in (
        "open_sessions",
        "http_running",
        "sched_requests",
        "sched_running",
        "sched_waiting",
        "sched_parked",
    ):
        check(key, base[key], end[key], 0, "exactly 0")
    check("kv_usage", base["kv_usage"], end["kv_usage"], base["kv_usage"] + 1e-9, "baseline")
    check("tasks", base["tasks"], end["tasks"], base["tasks"], "baseline")
    check("fds", base["fds"], end["fds"], base["fds"] + args.fd_tolerance, f"+{args.fd_tolerance}")
    tol = f"+{args.rss_tolerance_mb:g} MiB"
    check("rss_mb", base["rss_mb"], end["rss_mb"], base["rss_mb"] + args.rss_tolerance_mb, tol)
    by_pid = {c["pid"]: c for c in end["children"]}
    for child in base["children"]:
        now = by_pid.get(child["pid"])
        if now is None:
            checks.append({"name": f"child {child['pid']} ({child['name']})", "ok": False, "end": "gone"})
            continue
        limit = child["rss_mb"] + args.rss_tolerance_mb
        check(f"rss_mb child {child['pid']} ({child['name']})", child["rss_mb"], now["rss_mb"], limit, tol)
    check("children", len(base["children"]), len(end["children"]), len(base["children"]), "baseline")
    return checks


def rss_slope(samples: list[dict[str, Any]]) -> dict[str, float | None]:
    """Least-squares slope of RSS over the load phase (MiB/min): a leak shows as a steady climb."""
    if len(samples) < 3:
        return {"self": None, "children": None}
    ts = [x["t_s"] / 60 for x in samples]
    mean_t = sum(ts) / len(ts)
    var = sum((t - mean_t) ** 2 for t in ts) or 1.0

    def slope(key: str) -> float:
        ys = [x[key] for x in samples]
        mean_y = sum(ys) / len(ys)
        return round(sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys)) / var, 3)

    return {"self": slope("rss_mb"), "children": slope("children_rss_mb")}


def print_sample(s: dict[str, Any], phase: str) -> None:
    print(
        f"[{phase} {s['t_s']:7.1f}s] started={s['scenarios_started']} failed={s['scenarios_failed']} "
        f"open={s['open_sessions']} sched={s['sched_requests']}/{s['sched_running']}/{s['sched_waiting']}"
        f"/{s['sched_parked']} kv={s['kv_usage']:.3f} tasks={s['tasks']} fds={s['fds']} "
        f"rss={s['rss_mb']:.0f}+{s['children_rss_mb']:.0f} MiB",
        flush=True,
    )


async def sampler(soak: Soak, t0: float, series: list[dict[str, Any]], every_s: float, phase: list[str]):
    while True:
        sample = soak.snapshot(t0)
        sample["phase"] = phase[0]
        series.append(sample)
        print_sample(sample, phase[0])
        await asyncio.sleep(every_s)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    engine = await StreamingEngine.start(
        EngineConfig(
            model=args.model,
            kv_cache_bytes=args.kv_mb * MIB,
            max_model_len=4096,
            max_num_seqs=64,
            session_ttl_s=args.ttl,
            fast_start=args.fast_start,
        )
    )
    app = create_app(engine, ServerSettings(keep_results=args.keep_results))
    runner, url = await start_site(app, "127.0.0.1", 0)
    soak = Soak(engine, url, app[SERVER], args)
    total_s = args.minutes * 60
    warmup_s = args.warmup_s if args.warmup_s is not None else min(60.0, max(15.0, 0.15 * total_s))
    series: list[dict[str, Any]] = []
    phase = ["warmup"]
    t0 = time.monotonic()
    ticker = asyncio.ensure_future(sampler(soak, t0, series, args.sample_s, phase))
    try:
        await soak.load(warmup_s, args.max_scenarios)
        phase[0] = "drain"
        drain_base = await soak.drain(args.ttl * 3 + 30)
        base = soak.snapshot(t0)
        phase[0] = "load"
        await soak.load(max(0.0, total_s - warmup_s), max(0, args.max_scenarios - soak.started))
        phase[0] = "drain"
        drain_end = await soak.drain(args.ttl * 3 + 30)
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        end = soak.snapshot(t0)
        base["tasks"] -= 1  # the sampler ran when the baseline was taken
    finally:
        ticker.cancel()
        await runner.cleanup()
        await engine.shutdown()
    checks = compare(base, end, args)
    tally = soak.tally.as_dict()
    ok = all(c["ok"] for c in checks) and not tally["failed"]
    load = [x for x in series if x["phase"] == "load"]
    return {
        "command": " ".join(sys.argv),
        "rss_slope_mb_per_min": rss_slope(load),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
        "wall_s": round(time.time() - t_start, 1),
        "config": {**vars(args), "warmup_s": warmup_s, "max_body_bytes": soak.max_body},
        "drain_s": {"baseline": round(drain_base, 2), "end": round(drain_end, 2)},
        "baseline": base,
        "end": end,
        "checks": checks,
        "scenarios": tally,
        "ok": ok,
        "series": series,
    }


def report(result: dict[str, Any]) -> None:
    print("\nend vs baseline:")
    for c in result["checks"]:
        mark = "ok  " if c["ok"] else "FAIL"
        b, e = c.get("baseline", ""), c.get("end", "")
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        print(f"  {mark} {c['name']:<40} baseline {fmt(b):>10}  end {fmt(e):>10}  ({c.get('tolerance', '')})")
    tally = result["scenarios"]
    print(
        f"\nscenarios: {tally['total']} ({sum(tally['ok'].values())} as expected, "
        f"{sum(tally['failed'].values())} not)"
    )
    for name in sorted(set(tally["ok"]) | set(tally["failed"])):
        notes = tally["notes"].get(name, {})
        ok, failed = tally["ok"].get(name, 0), tally["failed"].get(name, 0)
        print(f"  {name:<26} ok {ok:>6}  failed {failed:>4}  {notes or ''}")
    for line in tally["failures"][:20]:
        print(f"  failure: {line}")
    print(f"RSS slope over the load (MiB/min): {result['rss_slope_mb_per_min']}")
    print(f"\n{'PASS' if result['ok'] else 'FAIL'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="load time, warm-up included")
    p.add_argument("--warmup-s", type=float, default=None, help="default: 15%% of the run, 15-60 s")
    p.add_argument("--max-scenarios", type=int, default=250_000, help="bound on scenarios started")
    p.add_argument("--http-workers", type=int, default=12)
    p.add_argument("--api-workers", type=int, default=4)
    p.add_argument("--ttl", type=float, default=3.0, help="the engine's session_ttl_s")
    p.add_argument("--keep-results", type=int, default=1024, help="the server's ended sessions kept")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--rss-tolerance-mb", type=float, default=100.0, help="per process")
    p.add_argument("--fd-tolerance", type=int, default=4)
    p.add_argument("--model", default="tiny")
    p.add_argument("--kv-mb", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast-start", action="store_true", help="fork the engine (quicker start)")
    p.add_argument(
        "--out", type=Path, default=Path(f"benchmarks/results/soak-{time.strftime('%Y%m%d-%H%M')}")
    )
    args = p.parse_args()
    result = asyncio.run(run(args))
    result["config"]["out"] = str(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    report(result)
    print(f"written: {args.out / 'results.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
