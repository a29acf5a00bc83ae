"""LCP-aware document layout for update-mode context: the one place that decides in which order an
update's documents go into the prompt (the assembler, the ANN retriever and trace replay all ask it).

Each update replaces the context; the engine keeps KV up to the longest common prefix (LCP) of the
old and new prompts and recomputes the rest. Laying documents out in score order moves every
document behind a newcomer that outranks it, so one new document can invalidate almost the whole
context. Keeping surviving documents where they were (in the previous order) and putting newcomers
after them keeps the prefix up to the first dropped document.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

from stream2llm.context.assembler import score_order
from stream2llm.tokens import common_prefix_len

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def stable_layout(previous: Sequence[K], ranked: Sequence[K]) -> list[K]:
    """The new top-k (``ranked``, best first) ordered for prefix reuse: documents also in
    ``previous`` keep their previous relative order and come first, newcomers follow by rank."""
    if len(set(ranked)) != len(ranked):
        raise ValueError("ranked documents must be distinct")
    wanted = set(ranked)
    survivors = [key for key in previous if key in wanted]
    kept = set(survivors)
    return survivors + [key for key in ranked if key not in kept]


# a layout by name (the retrievers', the bench's and the pipeline's option): previous order, new top-k
LAYOUTS: dict[str, Callable[[Sequence[Any], Sequence[Any]], list[Any]]] = {
    "score": score_order,  # as the retriever ranked them
    "stable": stable_layout,  # survivors keep their place
}
DEFAULT_LAYOUT = "stable"


def layout_named(name: str) -> Callable[[Sequence[Any], Sequence[Any]], list[Any]]:
    """The layout called ``name``; ValueError naming the known ones otherwise."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


class UpdateLayout:
    """Remembers one request's last layout and lays out each new top-k against it."""

    def __init__(self, name: str = DEFAULT_LAYOUT) -> None:
        self.name = name
        self._layout = layout_named(name)
        self.order: list[Hashable] = []

    def arrange(self, ranked: Sequence[K]) -> list[K]:
        order = self._layout(self.order, ranked)
        self.order = list(order)
        return order

    def arrange_by(self, items: Sequence[T], key: Callable[[T], Hashable]) -> list[T]:
        """``items`` (best first) in the layout of their keys (e.g. search hits by document id)."""
        by_key = {key(item): item for item in items}
        return [by_key[k] for k in self.arrange([key(item) for item in items])]


class StableLayout(UpdateLayout):
    """The stable layout of one request's successive top-k lists."""

    def __init__(self) -> None:
        super().__init__("stable")


def invalidated(previous: Sequence[int], new: Sequence[int]) -> int:
    """Tokens of ``new`` after its common prefix with ``previous``: what an update recomputes."""
    return len(new) - common_prefix_len(previous, new)
