"""How a command ends: on SIGINT, SIGTERM or the engine's death it stops its work, aborts its
sessions, shuts the engine down and exits with the conventional status, in bounded time.

A signal cancels the command's main task, so the ``finally`` blocks and ``async with`` exits
below it (engine shutdown, session aborts, partial results written) run as on any error; a
second signal, or a cleanup longer than ``grace_s``, ends the process at once. vLLM's engine-core
and worker processes watch their parent and exit with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from stream2llm.engine.health import on_engine_death
from stream2llm.errors import EngineDied

T = TypeVar("T")
EXIT_ENGINE_DIED = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """The command was stopped from outside; ``code`` is the exit status it should end with."""

    def __init__(self, code: int, reason: str, signum: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.signal = signum  # the signal that stopped it, or None (the engine died)


class _Stopper:
    """Cancels the main task once, remembering why; a second stop request exits at once."""

    def __init__(self, task: asyncio.Task, grace_s: float) -> None:
        self.task = task
        self.grace_s = grace_s
        self.reason: Stopped | None = None

    def stop(self, reason: Stopped) -> None:
        if self.reason is not None:
            hard_exit(self.reason.code)  # asked twice: the user wants out now
        self.reason = reason
        self.task.cancel()
        asyncio.get_running_loop().call_later(self.grace_s, hard_exit, reason.code)

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self.stop(Stopped(128 + signum, f"stopped by {name}", signum))

    def on_engine_died(self, error: EngineDied) -> None:
        self.stop(Stopped(EXIT_ENGINE_DIED, str(error)))


async def _main(work: Coroutine[Any, Any, T], grace_s: float) -> T:
    loop = asyncio.get_running_loop()
    stopper = _Stopper(asyncio.current_task(), grace_s)  # type: ignore[arg-type]
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stopper.on_signal, signum)
    try:
        with on_engine_death(stopper.on_engine_died):
            return await work
    except asyncio.CancelledError:
        if stopper.reason is not None:
            raise stopper.reason from None
        raise
    except EngineDied as error:  # the work noticed its engine's death itself (``serve``)
        raise Stopped(EXIT_ENGINE_DIED, str(error)) from None
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def run(work: Coroutine[Any, Any, T], *, grace_s: float = 10.0) -> T:
    """``asyncio.run(work)``; raises ``Stopped`` (after cleanup) when a signal or the engine's
    death ended it early. Child processes still alive then (an engine stopped while it was
    starting) are killed: a stopped command leaves nothing behind."""
    try:
        return asyncio.run(_main(work, grace_s))
    except Stopped:
        kill_children()
        raise


def kill_children() -> None:
    """Kill every process below this one (vLLM's engine core and workers, crawler helpers)."""
    import psutil

    children = [p for p in psutil.Process().children(recursive=True) if not _is_resource_tracker(p)]
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=5)


def _is_resource_tracker(process: Any) -> bool:
    """multiprocessing's resource tracker: it exits with this process and cleans up after it."""
    try:
        return "resource_tracker" in " ".join(process.cmdline())
    except Exception:
        return False


def hard_exit(code: int) -> None:
    """Exit now, without cleanup, leaving no child process."""
    kill_children()
    os._exit(code)


def report(stop: Stopped) -> None:
    """One line on stderr saying why the command ended."""
    print(f"stream2llm: {stop}", file=sys.stderr, flush=True)
