"""A tiny shared-memory board on which the engine-core scheduler publishes its live state.

vLLM only reports scheduler stats alongside outputs, so after the last abort the front end would
never hear that KV usage fell back to zero. The scheduler instead writes a fixed-size record into an
mmap'ed file after every step, admission and free; the front end reads it at any time. A sequence
number (odd while writing) makes reads consistent without locks.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

_FORMAT = struct.Struct("<QdIIIIQQQQQQQ")  # seq, kv_usage, running, waiting, parked, requests,
#                                       prefilled, recomputed, preemptions, then the KV tier's counters


@dataclass(frozen=True)
class EngineStats:
    """What ``StreamingEngine.stats()`` returns."""

    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    running: int = 0
    waiting: int = 0  # queued for prefill or decode, parked sessions excluded
    parked: int = 0  # streaming sessions waiting for their next chunk (they hold KV)
    requests: int = 0  # requests the scheduler knows
    tokens_prefilled: int = 0
    tokens_recomputed: int = 0  # by updates (past the common prefix) and evictions (KV lost)
    preemptions: int = 0  # evictions by the broker, however their KV was given back
    offloads: int = 0  # evictions whose KV went to the KV tier
    tier_bytes_saved: int = 0
    tier_bytes_loaded: int = 0
    tier_load_failures: int = 0  # blocks missing or damaged in the tier: recomputed


class StatsBoard:
    """Writer (engine core) and reader (front end) of one stats record."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, _FORMAT.size)
            self._map = mmap.mmap(fd, _FORMAT.size)
        finally:
            os.close(fd)
        self._seq = 0

    def publish(self, stats: EngineStats) -> None:
        self._seq += 1
        struct.pack_into("<Q", self._map, 0, self._seq * 2 - 1)  # odd: write in progress
        _FORMAT.pack_into(
            self._map,
            0,
            self._seq * 2 - 1,
            stats.kv_usage,
            stats.running,
            stats.waiting,
            stats.parked,
            stats.requests,
            stats.tokens_prefilled,
            stats.tokens_recomputed,
            stats.preemptions,
            stats.offloads,
            stats.tier_bytes_saved,
            stats.tier_bytes_loaded,
            stats.tier_load_failures,
        )
        struct.pack_into("<Q", self._map, 0, self._seq * 2)

    def read(self, timeout_s: float = 0.1) -> EngineStats:
        deadline = time.monotonic() + timeout_s
        while True:
            values = _FORMAT.unpack_from(self._map, 0)
            seq = values[0]
            if seq % 2 == 0 and struct.unpack_from("<Q", self._map, 0)[0] == seq:
                return EngineStats(*values[1:])
            if time.monotonic() > deadline:
                return EngineStats(*values[1:])
            time.sleep(0)

    def close(self) -> None:
        self._map.close()
