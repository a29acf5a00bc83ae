"""The models stream2llm knows by name (``tiny``, ``gemma-270m``): how each is built and where its
prepared directory is, and turning a name or a local HF directory into a prepared model.

No model hub is reachable, so both are built on this machine, deterministically, and cached (one
directory per recipe version)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stream2llm.engine.models.cache import build_atomically, cache_root
from stream2llm.engine.models.gemma import build_gemma, gemma_version
from stream2llm.engine.models.info import META_FILE, ModelInfo
from stream2llm.engine.models.tiny import TINY_VERSION, build_tiny

DEFAULT_MODEL = "gemma-270m"


@dataclass(frozen=True)
class _Recipe:
    version: Callable[[], str]
    build: Callable[[Path], dict]
    about: str


RECIPES: dict[str, _Recipe] = {
    "tiny": _Recipe(lambda: TINY_VERSION, build_tiny, "random-weight 2-layer Llama, local BPE (tests)"),
    "gemma-270m": _Recipe(gemma_version, build_gemma, "Gemma 3 270M, converted from PyPI GGUF (default)"),
}


def _model_dir(name: str) -> Path:
    version = RECIPES[name].version()
    digest = hashlib.sha256(version.encode()).hexdigest()[:8]
    return cache_root() / f"{name}-{digest}"


def prepare(name: str) -> ModelInfo:
    """Build (once) and return a named model; the cached directory is reused afterwards."""
    if name not in RECIPES:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(RECIPES)}")
    target = _model_dir(name)
    if not (target / META_FILE).exists():
        build_atomically(target, RECIPES[name].build)
    return ModelInfo.load(target, name)


def resolve(model: str) -> ModelInfo:
    """A model name (``tiny``, ``gemma-270m``) or a local HF directory -> a prepared model."""
    if model in RECIPES:
        return prepare(model)
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise ValueError(
            f"model {model!r} is neither a known name ({', '.join(RECIPES)}) "
            "nor a local Hugging Face directory with a config.json"
        )
    return ModelInfo.load(path)


def list_models() -> list[tuple[str, str, Path | None]]:
    """(name, description, path if prepared) for each known model."""
    rows = []
    for name, recipe in RECIPES.items():
        try:
            target = _model_dir(name)
        except Exception:  # package for the recipe not installed
            target = None
        ready = target if target is not None and (target / META_FILE).exists() else None
        rows.append((name, recipe.about, ready))
    return rows
