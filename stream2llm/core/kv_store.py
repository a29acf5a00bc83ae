"""Where a prefill instance leaves KV blocks for a decode instance: a host-local block store.

A block is addressed by vLLM's chained block hash (the hash of its tokens and of every block
before it), so a key names the whole prefix up to that block: two requests that share a prefix
share its blocks, and a stale block (an update replaced its tokens) is simply never asked for.

The default store is a directory, on ``/dev/shm`` where it exists (shared memory: a write is a
memory copy), one safetensors file per block holding every layer's slice. A write goes to a
temporary name and is renamed into place, so a reader never sees half a block. Each file carries a
CRC-32 of its bytes, checked on every read, so a damaged block is recomputed, never used. The
store is swappable (``BlockStore``): anything with ``has``/``put``/``get`` works, e.g. a network store on
several hosts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

DEFAULT_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
DEFAULT_CAPACITY_BYTES = 4 << 30


class BlockStore(Protocol):
    """What the connector needs of a store: blocks in and out by key, and whether one is there."""

    def has(self, key: str) -> bool: ...

    def put(self, key: str, block: torch.Tensor) -> int: ...

    def get(self, key: str) -> torch.Tensor: ...


class BlockUnreadable(Exception):
    """A stored block is missing, damaged or not what was written: the caller recomputes it."""


class DirectoryStore:
    """Blocks as files in one directory, each with a checksum of its bytes; least recently used
    blocks (written or read by this process) are removed past ``capacity_bytes``. Only the
    writer evicts: a decode instance reads, so eviction needs no coordination. A write the disk
    refuses (full) is dropped: a block not stored is recomputed, never an error."""

    def __init__(self, root: str | os.PathLike, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"a block store needs a positive capacity, not {capacity_bytes} bytes")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self._written: OrderedDict[str, int] = OrderedDict()  # this writer's blocks, least recent first
        self.bytes_held = 0
        self.bytes_held_peak = 0
        self.writes_refused = 0

    def _path(self, key: str) -> Path:
        if not key.isalnum():
            raise ValueError(f"block key {key!r} is not a hex digest")
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def put(self, key: str, block: torch.Tensor) -> int:
        """Store ``block`` under ``key``; returns the bytes written (0: it was there already, or
        the disk is full)."""
        path = self._path(key)
        if path.exists():
            self._touch(key)
            return 0
        block = block.contiguous()
        size = block.numel() * block.element_size()
        self._make_room(size)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"kv": block}, tmp, metadata={"crc32": str(_checksum(block))})
            os.replace(tmp, path)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.writes_refused += 1
            return 0
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._written[key] = size
        self.bytes_held += size
        self.bytes_held_peak = max(self.bytes_held_peak, self.bytes_held)
        return size

    def get(self, key: str) -> torch.Tensor:
        """The block stored under ``key``; ``BlockUnreadable`` if it is gone or its bytes do not
        match the checksum written with them."""
        try:
            with safe_open(self._path(key), framework="pt") as f:
                expected = (f.metadata() or {}).get("crc32")
                block = f.get_tensor("kv")
        except (OSError, SafetensorError) as error:
            raise BlockUnreadable(f"KV block {key}: {error}") from error
        if expected is not None and str(_checksum(block)) != expected:
            raise BlockUnreadable(f"KV block {key}: checksum mismatch (the file was damaged)")
        self._touch(key)
        return block

    def _touch(self, key: str) -> None:
        if key in self._written:
            self._written.move_to_end(key)

    def _make_room(self, size: int) -> None:
        while self._written and self.bytes_held + size > self.capacity_bytes:
            key, held = self._written.popitem(last=False)
            self.bytes_held -= held
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()


def _checksum(block: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (a few microseconds for a block)."""
    return zlib.crc32(block.contiguous().view(torch.uint8).numpy())
