"""LCP-aware document layout for update-mode context.

Each update replaces the context; the engine keeps KV up to the longest common prefix (LCP) of the
old and new prompts and recomputes the rest. Laying documents out in score order moves every
document behind a newcomer that outranks it, so one new document can invalidate almost the whole
context. Keeping surviving documents where they were (in the previous order) and putting newcomers
after them keeps the prefix up to the first dropped document.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

from stream2llm.context.prompt import common_prefix_len

K = TypeVar("K", bound=Hashable)


def stable_layout(previous: Sequence[K], ranked: Sequence[K]) -> list[K]:
    """The new top-k (``ranked``, best first) ordered for prefix reuse: documents also in
    ``previous`` keep their previous relative order and come first, newcomers follow by rank."""
    if len(set(ranked)) != len(ranked):
        raise ValueError("ranked documents must be distinct")
    wanted = set(ranked)
    survivors = [key for key in previous if key in wanted]
    kept = set(survivors)
    return survivors + [key for key in ranked if key not in kept]


class StableLayout:
    """Remembers one request's last layout and lays out each new top-k against it."""

    def __init__(self) -> None:
        self.order: list[Hashable] = []

    def arrange(self, ranked: Sequence[K]) -> list[K]:
        order = stable_layout(self.order, ranked)  # type: ignore[arg-type]
        self.order = list(order)
        return order


def invalidated(previous: Sequence[int], new: Sequence[int]) -> int:
    """Tokens of ``new`` after its common prefix with ``previous``: what an update recomputes."""
    return len(new) - common_prefix_len(previous, new)
