"""Noticing that the engine core died, and saying so once, to everyone who waits on it.

vLLM's front end watches its engine-core processes and marks the client dead when one exits
(``AsyncLLM.errored``); requests in flight then fail with ``EngineDeadError``. What stock vLLM
leaves to its API server is the rest: failing parked sessions (they have no request in flight),
refusing new work at once, and ending the process so that a supervisor restarts it. A
``Watchdog`` polls the public ``errored`` flag and turns the death into one ``EngineDied`` error.

Whoever runs a command registers a callback with ``on_engine_death`` (a context variable, so an
engine started anywhere below that command finds it) to stop the command when its engine dies.

vLLM starts its engine core with ``spawn``: the new process re-imports the caller's main module. A
script that starts the engine outside ``if __name__ == "__main__":`` starts it again there, and
multiprocessing refuses with a RuntimeError deep in vLLM's start-up. ``refuse_unguarded_start``
says what to do instead, in the child and, through ``explain_unguarded_main``, in the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import multiprocessing.process
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from stream2llm.errors import EngineDied, StreamError

DeathCallback = Callable[[EngineDied], None]
T = TypeVar("T")
POLL_S = 0.2  # how often the watchdog looks at vLLM's dead flag

UNGUARDED_MAIN = (
    "StreamingEngine.start() ran while the main module was being imported: vLLM starts its engine core "
    "in a new process that re-imports your script; put the call under "
    '`if __name__ == "__main__":`'
)

_death_callback: contextvars.ContextVar[DeathCallback | None] = contextvars.ContextVar(
    "stream2llm_engine_death_callback", default=None
)


@contextlib.contextmanager
def on_engine_death(callback: DeathCallback | None) -> Iterator[None]:
    """Call ``callback`` when an engine started inside this block dies (None: nobody is told;
    whoever starts the engine there watches it with ``wait_died``)."""
    token = _death_callback.set(callback)
    try:
        yield
    finally:
        _death_callback.reset(token)


def describe_death(llm: Any) -> str:
    """What died, how, and where its log went: one line for people and supervisors."""
    from stream2llm.core import vllm_compat

    dead = [p for p in vllm_compat.engine_core_processes(llm) if p.exitcode is not None]
    if not dead:
        return "the vLLM engine core stopped answering; its log is on this process's stderr"
    proc = dead[0]
    how = f"exit code {proc.exitcode}"
    if proc.exitcode < 0:
        how = f"signal {signal.Signals(-proc.exitcode).name}"
    return f"the vLLM engine core (pid {proc.pid}) died ({how}); its log is on this process's stderr"


class Watchdog:
    """Polls an AsyncLLM's ``errored`` flag; on death tells the command that started the engine
    (``on_engine_death``), then runs ``on_death`` (the engine fails its sessions) with one error."""

    def __init__(self, llm: Any, on_death: Callable[[EngineDied], None]) -> None:
        self._llm = llm
        self._on_death = on_death
        self._listener = _death_callback.get()
        self.died: EngineDied | None = None
        self._task: asyncio.Task | None = None
        self._dead = asyncio.Event()

    def check(self) -> EngineDied | None:
        """The engine's death, noticed now if it was not yet (vLLM may tell a request first)."""
        if self.died is None and self._llm.errored:
            self._declare()
        return self.died

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="stream2llm-watchdog")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def wait(self) -> EngineDied:
        await self._dead.wait()
        assert self.died is not None
        return self.died

    async def _watch(self) -> None:
        while self.check() is None:
            await asyncio.sleep(POLL_S)

    def _declare(self) -> None:
        self.died = EngineDied(describe_death(self._llm))
        self._dead.set()
        if self._listener is not None:
            self._listener(self.died)  # first: the command stops before sessions report errors
        self._on_death(self.died)


async def start_off_loop(start: Callable[[], T], discard: Callable[[T], None]) -> T:
    """Run a blocking start-up (vLLM's engine takes seconds to come up) in a daemon thread, so the
    event loop keeps serving signals and other work meanwhile. A waiter that is cancelled gets
    CancelledError at once; whatever the thread starts after that is discarded once it is up."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    abandoned = threading.Event()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            if error is None:
                discard(result)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = start(), None
        except BaseException as exc:
            result, error = None, exc
        if abandoned.is_set():
            if error is None:
                discard(result)
            return
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed meanwhile
            if error is None:
                discard(result)

    threading.Thread(target=work, daemon=True, name="stream2llm-engine-start").start()
    try:
        return await future
    except asyncio.CancelledError:
        abandoned.set()
        raise


def _unguarded_marker(parent_pid: int) -> str:
    """Where a spawned child leaves word for its parent that it re-imported an unguarded script."""
    return os.path.join(tempfile.gettempdir(), f"stream2llm-unguarded-main-{parent_pid}")


def refuse_unguarded_start() -> None:
    """Raise StreamError when called while a spawned child re-imports its parent's main module
    (multiprocessing's own test, ``spawn._check_not_importing_main``), before vLLM tries to
    start yet another process; the marker lets the parent name the cause of its failed start."""
    if not getattr(multiprocessing.process.current_process(), "_inheriting", False):
        return
    with contextlib.suppress(OSError):
        open(_unguarded_marker(os.getppid()), "w").close()
    raise StreamError(UNGUARDED_MAIN)


def explain_unguarded_main(start: Callable[[], T]) -> Callable[[], T]:
    """``start`` (vLLM's start-up, in the parent), whose failure raises StreamError naming the fix
    when the engine core it spawned died re-importing an unguarded main module."""

    def run() -> T:
        marker = _unguarded_marker(os.getpid())
        with contextlib.suppress(OSError):
            os.unlink(marker)
        try:
            return start()
        except Exception as exc:
            if not os.path.exists(marker):
                raise
            with contextlib.suppress(OSError):
                os.unlink(marker)
            raise StreamError(UNGUARDED_MAIN) from exc

    return run
