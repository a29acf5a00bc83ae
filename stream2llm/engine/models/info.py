"""What a prepared model directory says about itself: ``stream2llm.json`` (BOS handling, EOS ids,
engine overrides, the chat turn), inferred from ``config.json`` for a plain HF directory that
stream2llm did not build, so any directory the engine is given is self-describing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

META_FILE = "stream2llm.json"
GEMMA_TURN = ("<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n")
CHAT_TURNS: dict[str, tuple[str, str]] = {"gemma-270m": GEMMA_TURN}  # for directories built before the field


@dataclass(frozen=True)
class ModelInfo:
    """A prepared model directory and what the engine must know about it."""

    name: str
    path: Path
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    engine_overrides: dict = field(default_factory=dict)
    chat_turn: tuple[str, str] | None = None  # text before the user turn, and from its end to the answer

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> ModelInfo:
        meta_path = path / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if not meta:
            meta = _infer_meta(path)
        return cls(
            name=name or meta.get("name", path.name),
            path=path,
            bos_token_id=meta.get("bos_token_id"),
            eos_token_ids=tuple(meta.get("eos_token_ids", ())),
            engine_overrides=meta.get("engine_overrides", {}),
            chat_turn=tuple(meta["chat_turn"]) if meta.get("chat_turn") else CHAT_TURNS.get(name or ""),
        )


def _infer_meta(path: Path) -> dict:
    """Metadata for a plain HF directory that stream2llm did not build."""
    cfg = json.loads((path / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    return {"bos_token_id": cfg.get("bos_token_id"), "eos_token_ids": eos_ids}


def write_meta(path: Path, meta: dict) -> None:
    """Leave ``stream2llm.json`` in a directory stream2llm built (what ``ModelInfo.load`` reads)."""
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
