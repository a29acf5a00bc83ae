"""The front-end side of the compat layer: starting AsyncLLM, its engine-core processes, shutdown."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["engine_core_processes", "shut_down", "start_async_llm"]


def start_async_llm(engine_args: Any, fork: bool) -> Any:
    """Start an AsyncLLM; ``fork`` forks the engine-core and worker processes (~4 s, tests only).

    The CPU platform forces ``spawn`` while the config is built; the launcher reads the variable
    later, so setting it in between takes effect. Forked workers are not pinned to cores the way
    spawned ones are, so per-step speed is lower: never benchmark a forked engine.
    """
    from vllm.v1.engine.async_llm import AsyncLLM

    if not fork:
        return AsyncLLM.from_engine_args(engine_args)
    vllm_config = engine_args.create_engine_config()
    previous = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    try:
        return AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=engine_args.disable_log_stats)
    finally:
        if previous is None:
            os.environ.pop("VLLM_WORKER_MULTIPROC_METHOD", None)
        else:
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = previous


def engine_core_processes(llm: Any) -> list[Any]:
    """The engine-core processes (``multiprocessing`` processes) an AsyncLLM started; empty when
    the engine core runs elsewhere. Used to say which process died and with what exit code."""
    manager = getattr(llm.engine_core.resources, "engine_manager", None)
    return list(getattr(manager, "processes", ()) or ())


def shut_down(llm: Any, timeout_s: float | None = None) -> None:
    """Shut an AsyncLLM down once and for all.

    ``AsyncLLM.__del__`` shuts it down again; at interpreter exit that second call finds vLLM's
    module globals already gone and prints a TypeError traceback. The object is switched to a
    subclass whose ``__del__`` does nothing: it has been shut down already."""
    llm.shutdown(timeout=timeout_s)
    llm.__class__ = _shut_down_class(type(llm))


_SHUT_DOWN_CLASSES: dict[type, type] = {}


def _shut_down_class(cls: type) -> type:
    if cls not in _SHUT_DOWN_CLASSES:
        _SHUT_DOWN_CLASSES[cls] = type(f"ShutDown{cls.__name__}", (cls,), {"__del__": lambda self: None})
    return _SHUT_DOWN_CLASSES[cls]
