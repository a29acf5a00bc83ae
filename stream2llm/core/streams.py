"""What the engine core learns about each stream from its chunks' arrivals: when its query came,
when its latest chunk came, the gap to expect before the next one, and whether the final chunk is in.

The broker ranks on this (a complete stream is on the TTFT clock; a parked session whose next chunk
is far off is the cheapest to evict). Pure bookkeeping: no vLLM import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_GAP_S = 0.7  # expected gap to a session's next chunk before any is observed (crawler median)


@dataclass
class StreamState:
    """One request's arrivals."""

    arrival: float
    last_chunk: float
    complete: bool
    gap_ewma: float | None = None

    def on_chunk(self, now: float, final: bool) -> None:
        gap = now - self.last_chunk
        self.gap_ewma = gap if self.gap_ewma is None else 0.5 * self.gap_ewma + 0.5 * gap
        self.last_chunk = now
        self.complete = self.complete or final

    def next_chunk_eta(self) -> float:
        if self.complete:
            return math.inf
        return self.last_chunk + (self.gap_ewma if self.gap_ewma is not None else DEFAULT_GAP_S)


class StreamTracker:
    """The ``StreamState`` of every request the scheduler holds, by request id."""

    def __init__(self) -> None:
        self._states: dict[str, StreamState] = {}

    def chunk_arrived(self, request_id: str, now: float, final: bool, is_stream_chunk: bool) -> bool:
        """A chunk came in (before vLLM admits it, which may queue it behind the chunk in flight);
        return whether its stream was already known."""
        state = self._states.get(request_id)
        if state is not None and is_stream_chunk:
            state.on_chunk(now, final)
        return state is not None

    def admitted(self, request_id: str, now: float, complete: bool) -> None:
        """vLLM now holds the request: start tracking it if it is new."""
        if request_id not in self._states:
            self._states[request_id] = StreamState(now, now, complete)

    def get(self, request_id: str) -> StreamState | None:
        return self._states.get(request_id)

    @property
    def states(self) -> Mapping[str, StreamState]:
        """Every tracked request's state (read only), for reading many per step without a call."""
        return self._states

    def is_complete(self, request_id: str) -> bool:
        state = self._states.get(request_id)
        return state is not None and state.complete

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)
