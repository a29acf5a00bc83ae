"""Token-id arithmetic every layer and both processes share; imports nothing from stream2llm or vLLM.

A leaf: the context layer, the engine core (inside vLLM's process), the simulator and the
retrievers all import it, so it must stay free of anything that would tie them together.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ceil_div", "common_prefix_len"]


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up, in integers (no float rounding): e.g. the blocks ``a`` tokens fill."""
    return -(-a // b)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    # Compare in slices first: much faster than a Python loop for long equal prefixes.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i
