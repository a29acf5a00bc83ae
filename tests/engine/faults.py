"""Faults injected for real into the engine core (tests only).

``FaultyScheduler`` is stream2llm's scheduler, loaded by vLLM's engine-core process by qualified
name (``EngineConfig(engine_args={"scheduler_cls": FAULTY_SCHEDULER})``). It behaves exactly like
``StreamScheduler`` until a request whose ``SamplingParams.extra_args`` carries ``FAULT_MARKER``
arrives; the next ``schedule()`` then raises, inside the engine core, as a bug would.
"""

from __future__ import annotations

from typing import Any

from stream2llm.core.scheduler import StreamScheduler

FAULT_KEY = "stream2llm_test_fault"
FAULT_MARKER = {FAULT_KEY: "raise-in-schedule"}
FAULTY_SCHEDULER = "tests.engine.faults.FaultyScheduler"


class InjectedFault(RuntimeError):
    """The error the faulty scheduler raises (a stand-in for a bug in the engine core)."""


class FaultyScheduler(StreamScheduler):
    """StreamScheduler that raises in ``schedule()`` once a marked request arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._armed = False

    def add_request(self, request: Any) -> None:
        if FAULT_KEY in (request.sampling_params.extra_args or {}):
            self._armed = True
        super().add_request(request)

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self._armed:
            raise InjectedFault("injected fault: the scheduler raised inside the engine core")
        return super().schedule(*args, **kwargs)
