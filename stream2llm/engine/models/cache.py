"""Where prepared models live and how one gets there: built once into the user's cache, atomically,
so concurrent or interrupted builds never leave a half-built directory that looks prepared."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import platformdirs

from stream2llm.engine.models.info import write_meta


def cache_root() -> Path:
    """Where prepared models live: $STREAM2LLM_CACHE, else the user's cache directory."""
    root = os.environ.get("STREAM2LLM_CACHE") or platformdirs.user_cache_dir("stream2llm")
    return Path(root) / "models"


def build_atomically(target: Path, build: Callable[[Path], dict]) -> Path:
    """Build into a temporary sibling and rename, so a crash never leaves a half-built model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        meta = build(tmp)
        write_meta(tmp, meta)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
