"""The HTTP scenario mix: append and update sessions (stream, vllm, nonstream), OpenAI completions and
chat (streamed and not), DELETE at random moments, clients hanging up mid-SSE, bad requests of many
kinds (each must get a 4xx, never a 5xx) and sessions left to expire. HTTP only: it runs against any
server at ``url``."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp

from .common import QUESTION, Unexpected, expect, piece, read_sse
from .mix import LoadContext, Mix

MODES = ["stream", "stream", "vllm", "nonstream"]
BAD_KINDS = [
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
RAW_BAD_BODIES = {
    "invalid_json": b'{"question": "x",',
    "empty_body": b"",
    "not_an_object": b'["question"]',
    "unknown_field": b'{"question": "x", "colour": "red"}',
    "wrong_type": b'{"question": "x", "max_tokens": "many"}',
    "bad_utf8": b'{"question": "\xff\xfe"}',
}
SESSION_ROUTES = [
    ("POST", "/append"),
    ("POST", "/update"),
    ("POST", "/finish"),
    ("GET", "/stream"),
    ("GET", ""),
    ("DELETE", ""),
]


class HttpLoad:
    """The HTTP scenarios against the server at ``url`` (``model``: its model name; ``max_body``: its
    body limit; ``ttl``: its engine's session_ttl_s)."""

    def __init__(self, ctx: LoadContext, url: str, model: str, max_body: int, ttl: float) -> None:
        self.ctx, self.url, self.model, self.max_body, self.ttl = ctx, url, model, max_body, ttl
        self.rng = ctx.rng
        self.http: aiohttp.ClientSession | None = None

    def mix(self) -> Mix:
        return [
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

    async def __aenter__(self) -> HttpLoad:
        self.http = aiohttp.ClientSession(
            self.url, headers={"Content-Type": "application/json"}, timeout=aiohttp.ClientTimeout(total=60)
        )
        return self

    async def __aexit__(self, *_: Any) -> None:
        assert self.http is not None
        await self.http.close()
        self.http = None

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """(status, JSON body or text); a 5xx fails the scenario at once."""
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

    async def still_open(self, session_id: str) -> bool:
        """Whether the server still runs the session, as HTTP shows it: for a run with no engine at
        hand, ``ctx.still_open = load.still_open`` (the soak asks its engine instead)."""
        status, data = await self.call("GET", f"/v1/sessions/{session_id}")
        return status != 404 and expect(status, data, 200).get("state") in ("open", "generating")

    async def post_ok(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return expect(*await self.call("POST", path, json=body), 200)

    # -- sessions ------------------------------------------------------------------------------

    async def h_open(self, name: str, mode: str | None = None, max_tokens: int | None = None) -> str | None:
        """A new session's id; None when the server refused it for load (429, noted)."""
        body = {
            "question": QUESTION,
            "max_tokens": max_tokens or self.rng.randint(2, 24),
            "temperature": 0,
            "ignore_eos": self.rng.random() < 0.5,
            "mode": mode or self.rng.choice(MODES),
        }
        status, data = await self.call("POST", "/v1/sessions", json=body)
        if status == 429:
            self.ctx.tally.note(name, "429 at open")
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
            await self.post_ok(f"/v1/sessions/{sid}/append", {"text": piece(self.rng), "final": final})
        if not final:
            await self.post_ok(f"/v1/sessions/{sid}/finish")
        await self.h_result("http_append", sid)

    async def h_update(self) -> None:
        sid = await self.h_open("http_update")
        if sid is None:
            return
        docs = [piece(self.rng, 100, 500) for _ in range(4)]
        for _ in range(self.rng.randint(1, 3)):
            self.rng.shuffle(docs)
            docs[0] = piece(self.rng, 100, 500)
            await self.post_ok(f"/v1/sessions/{sid}/update", {"docs": docs[:3]})
        await self.post_ok(f"/v1/sessions/{sid}/update", {"docs": docs[1:], "final": True})
        await self.h_result("http_update", sid)

    async def h_abort(self) -> None:
        """DELETE at a random moment: while context arrives, mid-prefill or mid-generation."""
        sid = await self.h_open("http_abort", max_tokens=self.rng.randint(8, 64))
        if sid is None:
            return
        for _ in range(self.rng.randint(0, 3)):
            await self.post_ok(f"/v1/sessions/{sid}/append", {"text": piece(self.rng)})
        if self.rng.random() < 0.5:
            await self.post_ok(f"/v1/sessions/{sid}/finish")
        await asyncio.sleep(self.rng.random() * 0.3)
        status, data = await self.call("DELETE", f"/v1/sessions/{sid}")
        state = expect(status, data, 200)["state"]
        self.ctx.tally.note("http_abort", state)
        if state not in ("aborted", "completed"):
            raise Unexpected(f"DELETE left {sid} {state}")
        await self.ctx.gone(sid)

    async def h_expire(self) -> None:
        """Open, send one piece, go silent: the server must report it expired after session_ttl_s."""
        sid = await self.h_open("http_expire", mode=self.rng.choice(["stream", "vllm", "nonstream"]))
        if sid is None:
            return
        await self.post_ok(f"/v1/sessions/{sid}/append", {"text": piece(self.rng)})

        async def check() -> None:
            await asyncio.sleep(self.ttl + 2.5)
            await self.ctx.gone(sid)
            status, data = await self.call("GET", f"/v1/sessions/{sid}")
            if status == 404:  # forgotten already (keep_results)
                self.ctx.tally.note("http_expire_check", "forgotten")
                return
            if expect(status, data, 200)["state"] != "expired":
                raise Unexpected(f"{sid} is {data['state']}, not expired")

        self.ctx.later("http_expire_check", check())

    # -- OpenAI-compatible ---------------------------------------------------------------------------

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
            self.ctx.tally.note("http_completion", "429")
            return
        if not expect(status, data, 200)["choices"][0]["finish_reason"]:
            raise Unexpected(f"no finish_reason: {data}")

    async def h_completion_stream(self) -> None:
        assert self.http is not None
        async with self.http.post("/v1/completions", json=self.completion_body(True)) as r:
            if r.status == 429:
                self.ctx.tally.note("http_completion_stream", "429")
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
                self.ctx.tally.note("http_chat_stream", "429")
                return
            if body["stream"]:
                events = await read_sse(r)
                if events[-1] != "[DONE]":
                    raise Unexpected(f"chat stream ended with {events[-2:]}")
            else:
                expect(r.status, await r.text(), 200)

    # -- clients that misbehave ------------------------------------------------------------------------

    async def h_disconnect(self) -> None:
        """Hang up mid-SSE (a completion or a session stream): the session must leave the engine."""
        assert self.http is not None
        if self.rng.random() < 0.5:
            body = {**self.completion_body(True, max_tokens=200), "ignore_eos": True}
            async with self.http.post("/v1/completions", json=body) as r:
                if r.status == 429:
                    self.ctx.tally.note("http_disconnect_sse", "429")
                    return
                events = await read_sse(r, stop_after=self.rng.randint(1, 3))
                r.close()  # drops the connection
            sid = events[0]["id"]
        else:
            sid = await self.h_open("http_disconnect_sse", mode="stream", max_tokens=200)
            if sid is None:
                return
            await self.post_ok(f"/v1/sessions/{sid}/append", {"text": piece(self.rng), "final": True})
            async with self.http.get(f"/v1/sessions/{sid}/stream") as r:
                await read_sse(r, stop_after=self.rng.randint(1, 3))
                r.close()
        await self.ctx.gone(sid)

    async def h_bad_input(self) -> None:
        """One kind of bad request; it must get a 4xx (never a 5xx) and harm nothing else."""
        kind = self.rng.choice(BAD_KINDS)
        status = await self.bad_request(kind)
        self.ctx.tally.note("http_bad_input", f"{kind}:{status}")
        if not 400 <= status < 500 and status != -1:
            raise Unexpected(f"{kind}: HTTP {status}")

    async def bad_request(self, kind: str) -> int:
        if kind in RAW_BAD_BODIES:
            return (await self.call("POST", "/v1/sessions", data=RAW_BAD_BODIES[kind]))[0]
        if kind == "unknown_session":
            sid = f"sess-{uuid.uuid4().hex}"
            method, path = self.rng.choice(SESSION_ROUTES)
            body = {"text": "x", "docs": ["x"]}
            return (await self.call(method, f"/v1/sessions/{sid}{path}", json=body))[0]
        if kind == "bad_model":
            return (await self.call("POST", "/v1/completions", json={"model": "nope", "prompt": "x"}))[0]
        if kind == "unknown_route":
            return (await self.call("POST", "/v1/nothing", json={}))[0]
        if kind.startswith("oversized"):
            return await self.oversized(chunked=kind.endswith("chunked"))
        return await self.bad_session_request(kind)

    async def bad_session_request(self, kind: str) -> int:
        """An empty append or update, or an append after the final, on a session of its own."""
        sid = await self.h_open("http_bad_input", mode="stream")
        if sid is None:
            return 429
        try:
            if kind == "empty_append":
                return (await self.call("POST", f"/v1/sessions/{sid}/append", json={"text": ""}))[0]
            if kind == "empty_update":
                return (await self.call("POST", f"/v1/sessions/{sid}/update", json={"docs": []}))[0]
            await self.post_ok(f"/v1/sessions/{sid}/finish")  # after_final
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
