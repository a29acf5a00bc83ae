"""What the front end and the engine core say to each other about a streamed request.

Both processes import this module, so it imports nothing from vLLM: a chunk's metadata travels in
``SamplingParams.extra_args[CONFIG_KEY]`` (front end to core), the engine's options in
``VllmConfig.additional_config[CONFIG_KEY]``, and a request's counters come back in its final
output's ``kv_transfer_params[CONFIG_KEY]`` (core to front end).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

CONFIG_KEY = "stream2llm"  # in VllmConfig.additional_config, SamplingParams.extra_args, kv_transfer_params
KV_PARAMS_KEY = "stream2llm_kv"  # the KV connector's per-request transfer counts, in kv_transfer_params


# vLLM has no prefill-only request: every chunk but the one that answers ends with this many tokens
# (sampled, or a placeholder where a later chunk took it over: vllm_compat.take_over_chunk), which
# the front end drops (engine.handover counts them off the front of the cumulative output)
THROWAWAY_TOKENS_PER_CHUNK = 1


class ChunkOp(str, Enum):
    """What a chunk does to the prompt the engine holds (not what a retriever did: an update event
    whose tokens extend what was sent goes as an append chunk, and a BPE merge reaching back turns
    an appended page into an update chunk)."""

    APPEND = "append"  # the chunk's ids follow what the engine holds
    UPDATE = "update"  # the chunk's ids are the whole new prompt; KV is kept up to the common prefix


@dataclass(frozen=True)
class ChunkMeta:
    """What the front end says about one chunk: how it changes the prompt, whether it is the last."""

    op: ChunkOp = ChunkOp.APPEND
    final: bool = False
    policy: str | None = None
    preemption: str | None = None  # how victims give KV back (core.policies.PREEMPTIONS)
    in_place: bool = False  # may take over the chunk in work at once (stream mode; stock vLLM queues)

    @property
    def replaces_prompt(self) -> bool:
        return self.op is ChunkOp.UPDATE

    def as_extra_args(self) -> dict[str, Any]:
        return {
            CONFIG_KEY: {
                "op": self.op.value,
                "final": self.final,
                "policy": self.policy,
                "preemption": self.preemption,
                "in_place": self.in_place,
            }
        }

    @classmethod
    def of(cls, sampling_params: Any) -> ChunkMeta:
        """The metadata a chunk's sampling parameters carry (a plain request: an append)."""
        extra = getattr(sampling_params, "extra_args", None) or {}
        raw = extra.get(CONFIG_KEY) or {}
        return cls(
            ChunkOp(raw.get("op", ChunkOp.APPEND.value)),
            bool(raw.get("final")),
            raw.get("policy"),
            raw.get("preemption"),
            bool(raw.get("in_place")),
        )


def throwaway_tokens(chunks: int) -> int:
    """Throw-away tokens at the front of a streaming request's output after ``chunks`` chunks: one
    per chunk but the final one, whose samples are the answer (or, disaggregated, its first token)."""
    return THROWAWAY_TOKENS_PER_CHUNK * (chunks - 1)


def split_transfer_params(params: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A final output's ``kv_transfer_params`` as (stream2llm's part: the engine core's counters and
    the KV connector's transfer counts; the KV connector's own part, e.g. NIXL's block locations,
    which a decode instance gets with the request)."""
    ours = {k: v for k, v in (params or {}).items() if k in (CONFIG_KEY, KV_PARAMS_KEY)}
    foreign = {k: v for k, v in (params or {}).items() if k not in ours}
    return ours, foreign


@dataclass
class UpdateRecord:
    """One update as the engine applied it."""

    old_len: int  # tokens the session held (computed) before
    new_len: int
    lcp: int  # longest common prefix of old and new token ids
    kept: int  # tokens whose KV was kept (lcp, capped at new_len - 1 so one token yields logits)
    recomputed: int  # new_len - kept
    discarded: int  # old_len - kept: computed KV thrown away (the update's cost over one-shot)
    tail: str  # the block holding the cut: private, unhashed, copied (on write) or aligned


@dataclass
class RequestCounters:
    """What the engine core counted for one request; returned with its final output."""

    tokens_prefilled: int = 0
    tokens_recomputed: int = 0
    tokens_discarded: int = 0
    tokens_loaded: int = 0  # brought back from the KV tier after an eviction, not recomputed
    updates: list[UpdateRecord] = field(default_factory=list)
    # the token ids whose KV the request held at the end, as handed to the model (see accounting)
    computed_prompt_len: int = 0
    computed_prompt_digest: str | None = None
    # when each step that prefilled this request's prompt started (monotonic, shared with the
    # front end): where a chunk's queueing ends and its prefill starts, for its trace
    prefill_steps: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens_prefilled": self.tokens_prefilled,
            "tokens_recomputed": self.tokens_recomputed,
            "tokens_discarded": self.tokens_discarded,
            "tokens_loaded": self.tokens_loaded,
            "updates": [vars(u) for u in self.updates],
            "computed_prompt_len": self.computed_prompt_len,
            "computed_prompt_digest": self.computed_prompt_digest,
            "prefill_steps": self.prefill_steps,
        }


def token_digest(token_ids: Sequence[int]) -> str:
    """sha256 of the ids as little-endian int32: the engine core reports the prompt it computed this
    way, so a test can compare it with any independent tokenization without shipping the ids."""
    ids = array("i", token_ids)
    if ids.itemsize != 4:  # pragma: no cover - every platform vLLM runs on has a 4-byte C int
        raise RuntimeError("array('i') is not 32-bit here")
    if array("i", [1]).tobytes()[0] != 1:  # pragma: no cover - big-endian host
        ids.byteswap()
    return hashlib.sha256(ids.tobytes()).hexdigest()
