"""stream2llm.tokens: ceiling division and the longest common prefix of two token sequences."""

from __future__ import annotations

import random

import pytest

from stream2llm.tokens import ceil_div, common_prefix_len


@pytest.mark.parametrize(
    ("a", "b", "q"),
    [
        (0, 16, 0),  # nothing fills no block
        (1, 16, 1),
        (15, 16, 1),
        (16, 16, 1),  # an exact multiple takes no extra block
        (17, 16, 2),
        (32, 16, 2),
        (33, 16, 3),
        (7, 1, 7),
        (5, 7, 1),
        (2**60 + 1, 2, 2**59 + 1),  # past float precision: math.ceil(a / b) would say 2**59
    ],
)
def test_ceil_div(a, b, q):
    assert ceil_div(a, b) == q
    assert isinstance(ceil_div(a, b), int)


def test_ceil_div_is_the_smallest_multiple_not_below():
    for b in (1, 2, 3, 16, 64):
        for a in range(0, 200):
            q = ceil_div(a, b)
            assert q * b >= a > (q - 1) * b or a == q == 0


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ([], [], 0),
        ([1], [], 0),  # the empty list is a prefix of everything
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2, 4], 2),
        ([1, 2], [1, 2, 3, 4], 2),  # one a prefix of the other
        ([5], [6], 0),
        (list(range(1000)), list(range(999)) + [0], 999),
        (list(range(600)), list(range(600)) + [1], 600),
        # around the 256-token slices the fast path compares
        (list(range(256)), list(range(256)), 256),
        (list(range(512)), list(range(512)) + [7], 512),
        (list(range(300)), list(range(255)) + [-1] + list(range(256, 300)), 255),
        (list(range(300)), list(range(256)) + [-1] + list(range(257, 300)), 256),
        (list(range(600)), list(range(511)) + [-1], 511),
        ((1, 2, 3), [1, 2, 9], 2),  # any sequence, not only lists
    ],
)
def test_common_prefix_len(a, b, n):
    assert common_prefix_len(a, b) == n == common_prefix_len(b, a)


def test_common_prefix_len_matches_a_plain_loop():
    rng = random.Random(7)
    for _ in range(200):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 700))]
        b = a[: rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 50))]
        expected = 0
        while expected < min(len(a), len(b)) and a[expected] == b[expected]:
            expected += 1
        assert common_prefix_len(a, b) == expected
