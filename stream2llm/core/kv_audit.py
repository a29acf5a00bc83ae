"""The prefix cache's block hashes, written to a file after every step that changed them
(``EngineConfig.kv_events_audit``): the truth a KV-event subscriber's replayed block set is
checked against, since nothing else shows it outside the engine-core process."""

from __future__ import annotations

import json
import os
from typing import Any

from stream2llm.core import vllm_compat as compat


def block_key(group: int | None, block_hash: bytes | int) -> str:
    """One cached block as text, the same for the audit and for a KV event's fields."""
    value = block_hash.hex() if isinstance(block_hash, bytes) else str(block_hash)
    return f"{group or 0}:{value}"


class KvAudit:
    """Rewrites ``path`` (atomically: a reader never sees half a list) when the cache changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._last: list[str] | None = None

    def write(self, scheduler: Any) -> None:
        keys = sorted(block_key(group, h) for group, h in compat.cached_block_keys(scheduler))
        if keys == self._last:
            return
        self._last = keys
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(keys, f)
        os.replace(tmp, self.path)


def read_audit(path: str) -> set[str]:
    """The block keys an audit file holds (empty before the engine's first step)."""
    try:
        with open(path) as f:
            return set(json.load(f))
    except FileNotFoundError:
        return set()
