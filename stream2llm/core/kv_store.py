"""Where a prefill instance leaves KV blocks for a decode instance: a host-local block store.

A block is addressed by vLLM's chained block hash (the hash of its tokens and of every block
before it), so a key names the whole prefix up to that block: two requests that share a prefix
share its blocks, and a stale block (an update replaced its tokens) is simply never asked for.

The default store is a directory, on ``/dev/shm`` where it exists (shared memory: a write is a
memory copy), one safetensors file per block holding every layer's slice. A write goes to a
temporary name and is renamed into place, so a reader never sees half a block. The store is
swappable (``BlockStore``): anything with ``has``/``put``/``get`` works, e.g. a network store on
several hosts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

DEFAULT_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
DEFAULT_CAPACITY_BYTES = 4 << 30


class BlockStore(Protocol):
    """What the connector needs of a store: blocks in and out by key, and whether one is there."""

    def has(self, key: str) -> bool: ...

    def put(self, key: str, block: torch.Tensor) -> int: ...

    def get(self, key: str) -> torch.Tensor: ...


class DirectoryStore:
    """Blocks as files in one directory; the oldest writes are removed past ``capacity_bytes``
    (only the writer evicts: a decode instance reads, so eviction needs no coordination)."""

    def __init__(self, root: str | os.PathLike, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self._written: OrderedDict[str, int] = OrderedDict()  # this writer's blocks, oldest first
        self._bytes = 0

    def _path(self, key: str) -> Path:
        if not key.isalnum():
            raise ValueError(f"block key {key!r} is not a hex digest")
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def put(self, key: str, block: torch.Tensor) -> int:
        """Store ``block`` under ``key``; returns the bytes written (0: it was there already)."""
        path = self._path(key)
        if path.exists():
            return 0
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"kv": block.contiguous()}, tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        size = block.numel() * block.element_size()
        self._written[key] = size
        self._bytes += size
        self._evict()
        return size

    def get(self, key: str) -> torch.Tensor:
        return load_file(self._path(key))["kv"]

    def _evict(self) -> None:
        while self._bytes > self.capacity_bytes and len(self._written) > 1:
            key, size = self._written.popitem(last=False)
            self._bytes -= size
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()
