"""What every client shares: English filler text, percentiles, SSE reading and outcome tallies."""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter, defaultdict
from pydoc_data.topics import topics
from typing import Any

import aiohttp

QUESTION = "What does the documentation say about this?"
TEXT = "\n\n".join(topics[k] for k in sorted(topics))
MIB = 1 << 20


class Unexpected(Exception):
    """A scenario saw something other than its expected outcome."""


def piece(rng: random.Random, lo: int = 100, hi: int = 1200) -> str:
    """A random slice of ``TEXT`` of ``lo`` to ``hi`` characters."""
    n = rng.randint(lo, hi)
    start = rng.randrange(0, len(TEXT) - n)
    return TEXT[start : start + n]


def filler(n_bytes: int) -> str:
    """English text of about ``n_bytes`` (Python's help topics, repeated)."""
    reps = n_bytes // len(TEXT) + 1
    return (TEXT * reps)[:n_bytes]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summary(values: list[float], scale: float = 1.0) -> dict[str, Any]:
    """n, p50, p99, max (times ``scale``: 1000 for milliseconds)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(pct(values, 50) * scale, 3),
        "p99": round(pct(values, 99) * scale, 3),
        "max": round(max(values) * scale, 3),
        "mean": round(statistics.fmean(values) * scale, 3),
    }


def expect(status: int, body: Any, *ok: int) -> Any:
    """``body`` when ``status`` is one of ``ok``; else the scenario failed."""
    if status not in ok:
        raise Unexpected(f"HTTP {status} (expected {ok}): {str(body)[:300]}")
    return body


async def read_sse(response: aiohttp.ClientResponse, stop_after: int | None = None) -> list[Any]:
    """The ``data:`` payloads (JSON decoded, ``[DONE]`` as the string); stop after ``stop_after``."""
    expect(response.status, "", 200)
    events: list[Any] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


class Tally:
    """Outcome counts per scenario, and the first failures' messages."""

    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.notes: dict[str, Counter[str]] = defaultdict(Counter)
        self.failures: list[str] = []

    def note(self, scenario: str, label: str) -> None:
        self.notes[scenario][label] += 1

    def fail(self, scenario: str, message: str) -> None:
        self.failed[scenario] += 1
        if len(self.failures) < 50:
            self.failures.append(f"{scenario}: {message}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": dict(self.ok),
            "failed": dict(self.failed),
            "notes": {k: dict(v) for k, v in self.notes.items()},
            "failures": self.failures,
            "total": sum(self.ok.values()) + sum(self.failed.values()),
        }
