from __future__ import annotations

import pytest

from tests.retrievers.helpers import small_index


@pytest.fixture(scope="session")
def ann_index():
    return small_index()
