"""The Python API scenario mix on a ``StreamingEngine``: append and update sessions, retriever events
out of order, repeated and after the final (each refused, the session goes on), aborts at random
moments, consumers that stop reading, bad input and sessions left to expire. The ``stream2llm``
package's public names only."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any

import stream2llm
from stream2llm import (
    ContextEvent,
    ContextTooLong,
    InvalidEvent,
    Op,
    SequenceError,
    SessionClosed,
    SessionExpired,
    UnknownSession,
)

from .common import QUESTION, TEXT, Unexpected, piece
from .mix import LoadContext, Mix

MODES = ["stream", "stream", "vllm", "nonstream"]
BAD_KINDS = ["empty_append", "empty_update", "too_long", "unknown_id", "after_final"]


async def engine_still_open(engine: stream2llm.StreamingEngine, request_id: str) -> bool:
    """Whether ``engine`` still holds the session (its KV not yet freed)."""
    return any(s.request_id == request_id for s in engine.open_sessions())


class ApiLoad:
    """The Python API scenarios on ``engine`` (``ttl``: its session_ttl_s)."""

    def __init__(self, ctx: LoadContext, engine: stream2llm.StreamingEngine, ttl: float) -> None:
        self.ctx, self.engine, self.ttl = ctx, engine, ttl
        self.rng = ctx.rng

    def mix(self) -> Mix:
        return [
            ("api_append", 25, self.a_append),
            ("api_update", 15, self.a_update),
            ("api_push_events", 15, self.a_push),
            ("api_abort", 15, self.a_abort),
            ("api_stream_break", 10, self.a_stream_break),
            ("api_bad_input", 10, self.a_bad_input),
            ("api_expire", 5, self.a_expire),
        ]

    def sampling(self, max_tokens: int | None = None) -> Any:
        return stream2llm.SamplingParams(
            temperature=0,
            max_tokens=max_tokens or self.rng.randint(2, 24),
            ignore_eos=self.rng.random() < 0.5,
        )

    async def open(self, max_tokens: int | None = None, mode: str | None = None) -> stream2llm.Session:
        sampling = self.sampling(max_tokens)  # drawn before the mode, as the soak always did
        return await self.engine.open(QUESTION, sampling, mode=mode or self.rng.choice(MODES))

    async def refused(self, call: Awaitable[Any], error: type[Exception], name: str, label: str) -> None:
        """``call`` must raise ``error`` (noted as ``label``)."""
        try:
            await call
        except error:
            self.ctx.tally.note(name, label)
            return
        raise Unexpected(f"{label} was accepted (expected {error.__name__})")

    async def a_append(self) -> None:
        s = await self.open()
        n = self.rng.randint(1, 4)
        for i in range(n):
            await s.append(piece(self.rng), final=i == n - 1)
        if self.rng.random() < 0.5:
            text = "".join([d async for d in s.stream()])
            if text != (await s.result()).text:
                raise Unexpected("streamed text differs from the result")
        await s.result()

    async def a_update(self) -> None:
        s = await self.open()
        docs = [piece(self.rng, 100, 500) for _ in range(4)]
        for _ in range(self.rng.randint(1, 3)):
            self.rng.shuffle(docs)
            await s.update(docs[:3])
        await s.update(docs[1:], final=True)
        await s.result()

    async def a_push(self) -> None:
        """Retriever events: a skipped and a repeated seq are refused; the session goes on."""
        s = await self.open()
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
        late = ContextEvent(rid, n, Op.APPEND, "late")
        await self.refused(s.push(late), SessionClosed, "api_push_events", "after_final")
        await s.result()

    async def a_abort(self) -> None:
        s = await self.open(max_tokens=self.rng.randint(8, 64))
        for _ in range(self.rng.randint(0, 3)):
            await s.append(piece(self.rng))
        if self.rng.random() < 0.5:
            await s.finish()
        await asyncio.sleep(self.rng.random() * 0.3)
        await s.abort()
        try:
            await s.result()
            self.ctx.tally.note("api_abort", "completed first")
        except SessionClosed:
            self.ctx.tally.note("api_abort", "aborted")
        await self.ctx.gone(s.request_id)

    async def a_stream_break(self) -> None:
        """A consumer that stops reading after the first delta, then aborts."""
        s = await self.engine.open(QUESTION, self.sampling(100), mode="stream")
        await s.append(piece(self.rng), final=True)
        async for _ in s.stream():
            break
        await s.abort()
        await self.ctx.gone(s.request_id)

    async def a_bad_input(self) -> None:
        s = await self.open()
        try:
            kind = self.rng.choice(BAD_KINDS)
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
                    self.ctx.tally.note("api_bad_input", kind)
            else:
                await s.finish()
                await self.refused(s.append("late"), SessionClosed, "api_bad_input", kind)
        finally:
            await s.abort()

    async def a_expire(self) -> None:
        s = await self.open()
        await s.append(piece(self.rng))

        async def check() -> None:
            try:
                await asyncio.wait_for(s.result(), self.ttl + 5)
            except SessionExpired:
                await self.ctx.gone(s.request_id)
                return
            raise Unexpected(f"{s.request_id} did not expire")

        self.ctx.later("api_expire_check", check())
