"""An optional per-step log of the engine core: what each step scheduled and how long it took.

Idle calibration (``stream2llm calibrate``) times one request alone; under load a step mixes
prefill chunks deep in long contexts, decodes and the front end's work on the same cores. The log
records, per step, when it was scheduled, when its output came back, how many requests the engine
core held (running, waiting or parked between chunks), and each scheduled request's tokens,
context, whether its stream was complete and its id, so step cost can be fitted under load
and a TTFT can be traced to the steps it waited for. A step that gave KV back says so: the
requests the broker evicted before it (``evicted``: id as submitted, tokens and blocks it held) and
those vLLM's allocator preempted while scheduling it (``preempted``), and the prefill items' tokens
that were computed once already (``recomputed``: id as submitted, tokens; KV lost to either), and
the bytes the KV tier was asked to save and to load for the step (``tier``). One
JSON object per line.
"""

from __future__ import annotations

import gzip
import json
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

PrefillItem = tuple[int, int, bool, str]  # prompt tokens, context, stream complete, id as submitted
Eviction = tuple[str, int, int, str]  # id as submitted, tokens computed, blocks freed, how given back


class StepLog:
    """Appends one line per engine step to ``path`` (engine-core process only)."""

    def __init__(self, path: str | Path) -> None:
        self._file: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the engine
        # steps scheduled whose output has not come back, oldest first: under async scheduling
        # the next step is scheduled before the last one's output arrives (outputs come in order)
        self._open: deque[dict[str, Any]] = deque()

    def scheduled(
        self,
        policy: str,
        items: list[PrefillItem],
        decodes: int,
        held: int,
        t0: float,
        evicted: list[Eviction] | None = None,
        preempted: list[str] | None = None,
        recomputed: list[tuple[str, int]] | None = None,
        kv: tuple[int, int] | None = None,
        tier: tuple[int, int] | None = None,
    ) -> None:
        """A step was scheduled at ``t0``: ``items`` holds one entry per prefill chunk;
        ``decodes`` counts requests that only decode, ``held`` every request the core holds."""
        now = time.monotonic()
        step: dict[str, Any] = {
            "t0": t0,
            "t1": now,
            "policy": policy,
            "prefill": items,
            "decodes": decodes,
            "held": held,
        }
        if evicted:
            step["evicted"] = evicted
        if preempted:
            step["preempted"] = preempted
        if recomputed:
            step["recomputed"] = recomputed
        if kv is not None:
            step["kv"] = kv
        if tier and any(tier):
            step["tier"] = tier
        self._open.append(step)

    def finished(self) -> None:
        """The oldest open step's output came back: write its line."""
        if not self._open:
            return
        step = self._open.popleft()
        step["t2"] = time.monotonic()
        self._file.write(json.dumps(step, separators=(",", ":")) + "\n")


def read_step_log(path: str | Path) -> list[dict[str, Any]]:
    """The logged steps, from the file the engine wrote or its gzipped copy (``.gz``)."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]
