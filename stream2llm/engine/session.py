"""Session: one request whose context arrives in pieces; its public API and its state.

Modes, all on the same engine:

- ``stream`` (default): each piece is prefilled on arrival through vLLM's streaming-input sessions.
  Intermediate chunks carry ``max_tokens=1`` (vLLM has no prefill-only request); their throw-away
  tokens never reach the caller. ``update`` replaces the context: the chunk carries the whole new
  prompt and the scheduler keeps KV up to the token-exact longest common prefix.
- ``vllm``: stock behaviour for comparison: appends as above, an update aborts the request and
  resubmits the whole prompt (vLLM's prefix cache reuses whole cached blocks).
- ``nonstream``: nothing is sent before ``finish()``; then the whole prompt at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, Literal

from stream2llm.context.assembler import SequenceCheck
from stream2llm.context.events import ContextEvent, Op
from stream2llm.context.prompt import PromptBuilder
from stream2llm.engine.config import Mode
from stream2llm.engine.handover import Handover
from stream2llm.engine.host import SessionHost
from stream2llm.engine.outputs import SessionOutput, SessionResult
from stream2llm.engine.tracing import SessionTrace
from stream2llm.errors import EngineDied, InvalidEvent, SessionClosed, SessionExpired, StreamError

State = Literal["open", "finished", "aborted", "failed"]
OFF_LOOP_CHARS = 32_768  # tokenizing more text than this takes milliseconds: a worker thread does it


class Session:
    """One request whose context arrives in pieces. Create it with ``StreamingEngine.open``."""

    def __init__(
        self,
        host: SessionHost,
        request_id: str,
        builder: PromptBuilder,
        sampling: Any,
        mode: Mode,
        cache_salt: str | None = None,
        trace: SessionTrace | None = None,
    ) -> None:
        self.request_id = request_id
        self.trace = trace  # its OpenTelemetry trace (None: tracing is off)
        self.mode = mode
        self._host = host
        self._builder = builder
        self._sequence = SequenceCheck(request_id)
        self._state: State = "open"
        self._t_open = time.monotonic()
        self._last_activity = self._t_open
        self._t_final: float | None = None
        self._output = SessionOutput(host.tokenizer)
        self._lock = asyncio.Lock()  # a session's changes apply one at a time, in call order
        self._pending: set[asyncio.Task] = set()  # changes queued on the lock (their tasks)
        self._handover = Handover(
            host,
            request_id,
            mode,
            sampling,
            cache_salt=cache_salt,
            on_tokens=self._output.on_output,
            on_end=self._complete,
            on_error=self._fail,
            decode_trace=trace.decode_call if trace is not None else None,
        )

    # -- public API ------------------------------------------------------------------------------

    @property
    def prompt_ids(self) -> list[int]:
        """The token ids handed to the engine so far (a copy)."""
        return list(self._handover.sent)

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    async def append(self, text: str, *, final: bool = False) -> None:
        """Add text after the context sent so far; ``final`` also ends the context (one chunk)."""
        self._check_open("append")
        if not isinstance(text, str) or not text:
            raise InvalidEvent(f"append to {self.request_id!r} needs non-empty text")
        await self._change("append", Op.APPEND, text, final)

    async def update(self, docs: str | Sequence[str], *, final: bool = False) -> None:
        """Replace the context; KV is kept up to the longest common prefix."""
        self._check_open("update")
        if isinstance(docs, str):
            docs = [docs]
        if not docs or not any(isinstance(d, str) and d.strip() for d in docs):
            raise InvalidEvent(f"update of {self.request_id!r} needs at least one non-empty document")
        await self._change("update", Op.UPDATE, list(docs), final)

    async def push(self, event: ContextEvent) -> None:
        """Apply a retriever's event, which must be the next in sequence; ``final`` finishes the session."""
        if event.request_id != self.request_id:
            raise InvalidEvent(f"event for {event.request_id!r} pushed to session {self.request_id!r}")
        self._check_open(f"event {event.seq}")
        self._sequence.expect(event)
        if event.op is Op.APPEND and event.text:
            await self.append(event.text, final=event.final)
        elif event.op is Op.UPDATE:
            await self.update(event.docs, final=event.final)
        elif event.final:
            await self.finish()
        self._sequence.advance(event)

    async def finish(self) -> None:
        """No more context: prefill the rest and start generating."""
        self._check_open("finish")
        await self._change("finish", None, None, final=True)

    def abort(self) -> Coroutine[Any, Any, None]:
        """Stop the session and free all of its KV. Safe to call at any time, more than once.

        The abort happens at the call (the result resolves, the vLLM abort starts); awaiting waits
        until the KV is freed. A caller cancelled at any point, even before its first step (a task
        cancelled at once), leaves the abort running to its end."""
        return self._close(SessionClosed(f"session {self.request_id!r} was aborted"))

    async def expire_if_idle(self, ttl_s: float, now: float) -> bool:
        """Abort the session (SessionExpired) if it is open and got no event for ``ttl_s``."""
        if not self.is_open or now - self._last_activity <= ttl_s:
            return False
        what = f"session {self.request_id!r} got no event for {ttl_s:g} s (session_ttl_s); aborted"
        await self._close(SessionExpired(what))
        return True

    async def stream(self) -> AsyncIterator[str]:
        """Generated text as it is produced (never the throw-away tokens of intermediate chunks)."""
        async for delta in self._output.stream():
            yield delta

    async def result(self) -> SessionResult:
        return await self._output.result()

    async def begin(self) -> None:
        """Called once by ``StreamingEngine.open``: in stream and vllm modes the instructions and
        the question start prefilling now."""
        if self.mode != "nonstream":
            self._send(self._prepare(None, None, final=False), final=False)

    # -- the context -----------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise SessionClosed(f"{what} on session {self.request_id!r}, which is already {self._state}")

    async def _change(self, what: str, op: Op | None, payload: Any, final: bool) -> None:
        """Apply one change, in call order. A small one applies at once; a large one is tokenized
        in a worker thread (megabytes take seconds: the event loop must go on serving other
        sessions) and, once started, applies in full even if its caller is cancelled."""
        if not self._pending and self._text_chars(payload) <= OFF_LOOP_CHARS:
            self._check_open(what)
            self._touch(final)
            self._send(self._prepare(op, payload, final), final)
            return
        self._pending.add(
            change := asyncio.get_running_loop().create_task(self._change_off_loop(what, op, payload, final))
        )
        change.add_done_callback(self._changed)
        await asyncio.shield(change)

    async def _change_off_loop(self, what: str, op: Op | None, payload: Any, final: bool) -> None:
        async with self._lock:
            self._check_open(what)
            self._touch(final)
            target = await asyncio.to_thread(self._prepare, op, payload, final)
            self._check_open(what)  # aborted (or failed) while tokenizing: nothing to send
            self._send(target, final)

    def _changed(self, change: asyncio.Task) -> None:
        """A change in a task ended; its error (if any) went to its caller, if still there."""
        self._pending.discard(change)
        if not change.cancelled():
            change.exception()  # retrieved: a cancelled caller cannot take it

    def _text_chars(self, payload: Any) -> int:
        """Characters the change makes the tokenizer look at, at most (context text, new text)."""
        new = len(payload) if isinstance(payload, str) else sum(len(d) for d in payload or ())
        return len(self._builder.body) + new

    def _touch(self, final: bool) -> None:
        self._last_activity = time.monotonic()
        if final:
            self._t_final = time.monotonic()

    def _prepare(self, op: Op | None, payload: Any, final: bool) -> list[int]:
        """Change the context as ``op`` says (None: no change); the ids now safe to prefill. A
        failing change leaves the context as it was. Runs in a worker thread for large changes
        (under the session's lock: nothing else touches the builder meanwhile)."""
        before = self._builder.body
        if op is Op.APPEND:
            self._builder.append(payload)
        elif op is Op.UPDATE:
            self._builder.replace(payload)
        try:
            return self._builder.ids(final=final).ids
        except StreamError:
            self._builder.body = before
            raise

    def _send(self, target: list[int], final: bool) -> None:
        """Hand what became safe to prefill to the engine (nonstream mode: all of it, at the end)."""
        if self.mode != "nonstream":
            self._handover.send(target, final)
        elif final:
            self._handover.send_whole(target)
        if final:
            self._state = "finished"

    # -- the end ---------------------------------------------------------------------------------

    def _close(self, error: StreamError) -> Coroutine[Any, Any, None]:
        """End the session with ``error``: the result resolves and the vLLM abort starts now (it
        is shielded, so KV is freed whatever happens to the caller); the coroutine waits for it."""
        if self._state not in ("aborted", "failed"):
            self._state = "aborted"
            self._host.closed(self.request_id)
            self._output.fail(error, expected=True)
            self.end_trace_with(error)
        return self._handover.stop()

    def engine_died(self, error: EngineDied) -> None:
        """The engine core died: fail now (a parked session has no request that would tell it)."""
        if self._state in ("aborted", "failed") or self._output.done:
            return
        self._state = "failed"
        self._host.closed(self.request_id)
        self._output.fail(error)
        self.end_trace_with(error)
        self._handover.drop()

    def _complete(self) -> None:
        if self._output.done:
            return
        self._host.closed(self.request_id)
        result = self._output.complete(
            prompt_ids=self._handover.sent,
            chunks=self._handover.chunks,
            mode=self.mode,
            opened_at=self._t_open,
            final_event_at=self._t_final,
        )
        if self.trace is not None:
            self.trace.finished(result, time.monotonic())

    def _fail(self, exc: Exception) -> None:
        self._state = "failed"
        self._host.closed(self.request_id)
        error = self._host.engine_died() or StreamError(
            f"session {self.request_id!r} failed in the engine: {exc}"
        )
        self._output.fail(error)
        self.end_trace_with(error)

    def end_trace_with(self, error: BaseException) -> None:
        """End the session's trace as failed (an abort, an expiry, a failure, or a failed open)."""
        if self.trace is not None:
            self.trace.failed(error)
            self.trace = None
