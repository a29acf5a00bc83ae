"""The KV connector's side of the compat layer: what a request and the KV cache manager say about
a request's blocks (no public accessor in vLLM 0.32)."""

from __future__ import annotations

from typing import Any

from vllm.v1.request import Request

__all__ = [
    "block_hash_keys",
    "group_block_ids",
    "kv_tier",
    "request_block_ids",
    "tokens_held",
]


def block_hash_keys(request: Request) -> list[str]:
    """Hex keys of the request's full blocks, in order: vLLM's chained block hashes (prefix
    caching's), which cover every full block of the tokens the request holds, computed or not."""
    return [bytes(h).hex() for h in request.block_hashes]


def tokens_held(request: Request) -> int:
    """Tokens the request holds: prompt (a session's: every chunk so far) and sampled outputs."""
    return request.num_tokens


def request_block_ids(kv_cache_manager: Any, request_id: str) -> list[int]:
    """The KV block ids a request holds in its first (full-attention) group, in token order."""
    return list(kv_cache_manager.get_block_ids(request_id)[0])


def group_block_ids(blocks: Any) -> list[int]:
    """The block ids of a ``KVCacheBlocks`` (what ``update_state_after_alloc`` gets), first group."""
    return list(blocks.get_block_ids()[0])


def kv_tier(scheduler: Any) -> Any | None:
    """The scheduler's KV connector where it can take a victim's blocks (``offload``): ours in a
    role that saves; None for no connector or another one."""
    connector = scheduler.get_kv_connector()
    return connector if getattr(connector, "offloads_kv", False) else None
