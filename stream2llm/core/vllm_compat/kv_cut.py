"""Cutting a session back to a prefix (update mode): freeing KV past a token, token-exact.

The cut works on vLLM's KV cache manager directly: each KV group's per-request block list, the
block pool, and the prefix-cache hashes its blocks carry.
"""

from __future__ import annotations

from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import Request

from stream2llm.core.vllm_compat.scheduler_state import _block_pool, _managers

__all__ = ["cut_session_kv", "truncate_session_prompt"]


def _release(scheduler: Scheduler, blocks: list[Any]) -> None:
    """Return blocks to the pool, tail first, respecting vLLM's deferred frees when a step is in flight."""
    if not blocks:
        return
    if scheduler.defer_block_free:
        scheduler.deferred_frees.append((scheduler.sched_step_seq, blocks))
    else:
        _block_pool(scheduler).free_blocks(reversed(blocks))


def _make_tail_block_writable(scheduler: Scheduler, manager: Any, request_id: str, index: int) -> str | None:
    """Ensure the block at ``index`` may be written; say how ("private", "unhashed", "copied"), or
    None if that is impossible right now.

    A block that carries a prefix-cache hash must never be written: another request may hit it.
    If only this request holds it, its hash is dropped (its contents are about to change); if
    others share it, the request gets a private copy (vLLM's copy-on-write path, executed by the
    worker before the next forward pass).
    """
    pool = _block_pool(scheduler)
    block = manager.req_to_blocks[request_id][index]
    if pool.is_block_writable(block):
        return "private"
    if block.ref_cnt == 1:
        pool._maybe_evict_cached_block(block)
        return "unhashed" if pool.is_block_writable(block) else None
    if pool.get_num_free_blocks() < 1:
        return None
    copy = pool.get_new_blocks(1)[0]
    manager._apply_cow(request_id, index, block, copy)
    return "copied"


def cut_session_kv(scheduler: Scheduler, request: Request, keep: int) -> tuple[int, str]:
    """Free the request's KV past ``keep`` tokens; return the tokens really kept and how the block
    holding the cut was treated ("aligned" when the cut falls on a block boundary).

    Token-exact for full-attention groups: the block holding token ``keep`` stays, made writable
    first. Other group kinds (sliding window, Mamba) keep only whole blocks they can vouch for, so
    the cut falls back to a block boundary (and to 0 where a group cannot be cut at all).

    With a step in flight (async scheduling) the cut is still safe: vLLM applies a session's next
    chunk only once the output of its last step came back, and later steps never schedule a
    session whose chunk reached ``max_tokens``; a stale step vLLM drops writes only past the
    computed tokens, never into a full (hashed, shareable) block. Freed blocks go through vLLM's
    deferred frees, and the worker makes a copy before the step that reads it.
    """
    managers = _managers(scheduler)
    rid = request.request_id
    if not all(type(m) is FullAttentionManager for m in managers):
        keep = 0
    block_size = max(m.block_size for m in managers)
    how = "aligned"
    if keep % block_size:
        tail_index = keep // block_size
        for manager in managers:
            if tail_index >= len(manager.req_to_blocks[rid]):
                continue
            how = _make_tail_block_writable(scheduler, manager, rid, tail_index) or "aligned"
            if how == "aligned":
                keep -= keep % block_size
                break
    for manager in managers:
        blocks = manager.req_to_blocks[rid]
        n_keep = cdiv(keep, manager.block_size)
        tail = blocks[n_keep:]
        del blocks[n_keep:]
        _release(scheduler, tail)
        if n_keep == 0:
            # nothing kept: the request is new to this manager again. vLLM looks a request with
            # no computed tokens up in the prefix cache, and asserts that one it tracks (a
            # ``num_cached_block`` entry) has no hits: vLLM's own free drops the entry too
            manager.num_cached_block.pop(rid, None)
        elif rid in manager.num_cached_block:
            manager.num_cached_block[rid] = min(manager.num_cached_block[rid], keep // manager.block_size)
    request.num_computed_tokens = keep
    return keep, how


def truncate_session_prompt(request: Request, keep: int) -> None:
    """Make the first ``keep`` computed tokens the whole prompt, so vLLM's own session update
    appends the new tail after them (it keeps tokens up to ``num_computed_tokens``)."""
    assert request.num_computed_tokens == keep
    del request.prompt_token_ids[keep:]
    request.num_prompt_tokens = keep
