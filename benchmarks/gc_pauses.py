"""`stream2llm bench` with every garbage collection of the front end over 20 ms logged to stderr.

A full collection stops the front end's event loop: every session whose chunk arrives meanwhile
waits. Each line gives the monotonic time the collection ended (to join with a run's
``samples.timeline``), the generation and the pause:

    PYTHONPATH=. .venv/bin/python benchmarks/gc_pauses.py bench crawler.jsonl ... 2> gc.log
    grep GCPAUSE gc.log
"""

from __future__ import annotations

import gc
import sys
import time

THRESHOLD_S = 0.02
_started: list[float] = []


def log_pause(phase: str, info: dict) -> None:
    if phase == "start":
        _started[:] = [time.perf_counter()]
        return
    pause = time.perf_counter() - (_started[0] if _started else time.perf_counter())
    if pause > THRESHOLD_S:
        generation, collected = info["generation"], info["collected"]
        line = f"GCPAUSE {time.monotonic():.3f} gen{generation} {pause * 1000:.0f} ms collected {collected}"
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    gc.callbacks.append(log_pause)
    from stream2llm.cli import app

    app()
