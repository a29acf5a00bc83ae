"""A StreamingEngine reachable from any thread or event loop.

vLLM's AsyncLLM and every Session belong to the event loop they were created on. Synchronous
callers (LangChain's ``invoke``/``stream``, scripts, notebooks) have no loop, and async callers may
run on a different loop. ``EngineHandle`` runs coroutines and async iterators on the engine's loop
and hands the results back; ``BackgroundEngine`` owns a loop thread with its own engine; and
``shared_engine`` keeps one background engine per configuration for the whole process (engine start
costs ~20 s), shut down at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.errors import StreamError

T = TypeVar("T")
_DONE = object()  # marks the end of a bridged async iterator


class EngineHandle:
    """An engine and the loop it lives on; runs work there for callers on other threads or loops."""

    def __init__(self, engine: StreamingEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop

    def _on_engine_loop(self) -> bool:
        return current_loop() is self.loop

    def _submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        if self.loop.is_closed() or not self.loop.is_running():
            raise StreamError("the engine's event loop is not running (was the engine shut down?)")
        return asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self.loop)

    def run(self, make: Callable[[StreamingEngine], Awaitable[T]]) -> T:
        """Run ``make(engine)`` on the engine's loop and wait for it (synchronous callers)."""
        self._refuse_on_engine_loop()
        return self._submit(make(self.engine)).result()

    def _refuse_on_engine_loop(self) -> None:
        if self._on_engine_loop():
            raise StreamError(
                "a synchronous call was made on the engine's own event loop, where it would block the "
                "engine; use the async API (ainvoke/astream) there"
            )

    async def arun(self, make: Callable[[StreamingEngine], Awaitable[T]]) -> T:
        """Await ``make(engine)`` on the engine's loop from any loop."""
        if self._on_engine_loop():
            return await make(self.engine)
        return await asyncio.wrap_future(self._submit(make(self.engine)))

    def iterate(self, make: Callable[[StreamingEngine], AsyncIterator[T]]) -> Iterator[T]:
        """Iterate ``make(engine)`` (an async iterator run on the engine's loop) synchronously.
        Closing this iterator early closes the async one there (its ``finally`` blocks run)."""
        self._refuse_on_engine_loop()
        agen = make(self.engine)
        try:
            while (item := self.run(lambda _e: _next_or_done(agen))) is not _DONE:
                yield item  # type: ignore[misc]
        finally:
            if not self.loop.is_closed() and self.loop.is_running():
                with contextlib.suppress(Exception):
                    self._submit(_aclose(agen)).result()

    async def aiterate(self, make: Callable[[StreamingEngine], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Iterate ``make(engine)`` from any loop; on the engine's own loop it is iterated directly."""
        agen = make(self.engine)
        if self._on_engine_loop():
            try:
                async for item in agen:
                    yield item
            finally:
                await _aclose(agen)
            return
        try:
            while (item := await self.arun(lambda _e: _next_or_done(agen))) is not _DONE:
                yield item  # type: ignore[misc]
        finally:
            if not self.loop.is_closed() and self.loop.is_running():
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(self._submit(_aclose(agen)))


class EngineRef:
    """An engine the caller gave: an EngineHandle, or a StreamingEngine living on the loop that runs
    when the reference is made (else on the loop of the first async call that uses it)."""

    def __init__(self, engine: StreamingEngine | EngineHandle) -> None:
        if isinstance(engine, EngineHandle):
            self._handle: EngineHandle | None = engine
            self.engine = engine.engine
        elif isinstance(engine, StreamingEngine):
            self._handle = None
            self.engine = engine
            self._loop = current_loop()
        else:
            raise TypeError(
                f"engine must be a StreamingEngine or an EngineHandle, not {type(engine).__name__}"
            )

    def handle(self) -> EngineHandle:
        if self._handle is None:
            self._loop = self._loop or current_loop()
            if self._loop is None:
                raise StreamError(
                    "the engine's event loop is unknown: make this object inside the loop that started "
                    "the engine (or pass an EngineHandle), or make an async call first"
                )
            self._handle = EngineHandle(self.engine, self._loop)
        return self._handle


def current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class BackgroundEngine(EngineHandle):
    """A StreamingEngine on its own event-loop thread."""

    def __init__(self, engine: StreamingEngine, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        super().__init__(engine, loop)
        self._thread = thread

    @classmethod
    def start(cls, config: EngineConfig) -> BackgroundEngine:
        """Start a loop thread and the engine on it; blocks until the engine is ready (~20 s)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_serve_forever, args=(loop,), name="stream2llm-engine", daemon=True)
        thread.start()
        try:
            engine = asyncio.run_coroutine_threadsafe(StreamingEngine.start(config), loop).result()
        except BaseException:
            _stop_loop(loop, thread)
            raise
        return cls(engine, loop, thread)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Shut the engine down (its processes exit) and stop the loop thread. Idempotent."""
        if self.loop.is_running():
            with contextlib.suppress(Exception):
                self._submit(self.engine.shutdown()).result(timeout=timeout_s)
        _stop_loop(self.loop, self._thread, timeout_s)


def _serve_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, timeout_s: float = 10.0) -> None:
    if not loop.is_closed():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join(timeout_s)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _next_or_done(agen: AsyncIterator[T]) -> Any:
    """The next item, or _DONE: StopAsyncIteration must not cross a concurrent Future."""
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return _DONE


async def _aclose(agen: AsyncIterator[Any]) -> None:
    close = getattr(agen, "aclose", None)
    if close is not None:
        await close()


# -- one engine per configuration, for the whole process ---------------------------------------

_shared: dict[str, BackgroundEngine] = {}
_shared_lock = threading.Lock()


def config_key(config: EngineConfig) -> str:
    """Engines with equal keys are interchangeable."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)


def shared_engine(config: EngineConfig) -> BackgroundEngine:
    """The process-wide background engine for ``config``, started on first use."""
    key = config_key(config)
    with _shared_lock:  # held during start: a second caller waits instead of starting a duplicate
        engine = _shared.get(key)
        if engine is None:
            engine = BackgroundEngine.start(config)
            _shared[key] = engine
        return engine


def shutdown_shared_engines() -> None:
    """Shut down every shared engine (registered at exit; tests call it to free the engine early)."""
    with _shared_lock:
        engines = list(_shared.values())
        _shared.clear()
    for engine in engines:
        engine.shutdown()


atexit.register(shutdown_shared_engines)
