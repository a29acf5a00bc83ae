"""LCP-aware layout of update-mode documents (pure logic, no index)."""

from __future__ import annotations

import random

import pytest

from stream2llm.context.layout import StableLayout, invalidated, stable_layout
from stream2llm.tokens import common_prefix_len


def test_survivors_keep_previous_order_and_newcomers_follow_by_rank():
    assert stable_layout(["a", "b", "c", "d"], ["e", "c", "a", "f"]) == ["a", "c", "e", "f"]


def test_no_previous_layout_is_rank_order():
    assert stable_layout([], ["x", "y", "z"]) == ["x", "y", "z"]


def test_same_set_reranked_keeps_the_previous_order():
    assert stable_layout(["a", "b", "c"], ["c", "b", "a"]) == ["a", "b", "c"]


def test_duplicates_in_the_ranking_are_rejected():
    with pytest.raises(ValueError, match="distinct"):
        stable_layout(["a"], ["b", "b"])


def test_tracker_lays_out_each_update_against_the_last():
    layout = StableLayout()
    assert layout.arrange([3, 1, 2]) == [3, 1, 2]
    assert layout.arrange([4, 2, 3]) == [3, 2, 4]
    assert layout.arrange([5, 4, 3]) == [3, 4, 5]


def test_invalidated_counts_tokens_after_the_common_prefix():
    assert invalidated([1, 2, 3, 4], [1, 2, 9, 4, 5]) == 3
    assert invalidated([], [1, 2]) == 2
    assert invalidated([1, 2, 3], [1, 2]) == 0


def test_stable_never_keeps_a_shorter_document_prefix_than_score_order():
    rng = random.Random(7)
    longer = 0
    for _ in range(500):
        previous = rng.sample(range(20), 8)
        ranked = rng.sample(range(20), 8)
        if rng.random() < 0.5:  # often the new ranking starts like the old one
            ranked = previous[:3] + [d for d in ranked if d not in previous[:3]][:5]
        stable = common_prefix_len(previous, stable_layout(previous, ranked))
        score = common_prefix_len(previous, ranked)
        assert stable >= score
        longer += stable > score
    assert longer > 50  # and often strictly longer
