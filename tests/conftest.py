"""Shared fixtures. Engine tests share one real vLLM engine (tiny local model) per test run."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pytest_collection_modifyitems(config, items):
    # Engine tests start the shared engine once; keep them together after the fast unit tests.
    items.sort(key=lambda item: "tests/engine" in str(item.path))


@pytest.fixture(scope="session")
def tiny_model():
    from stream2llm.engine import models

    return models.prepare("tiny")


# Token-for-token equality of streamed and one-shot prefill needs kernels whose result for a token
# does not depend on how its prompt was cut into chunks. bf16 on a CPU with AMX is not such a
# kernel (on an Intel Xeon, an update cut after 39 tokens, then 2,048-token steps, gives a greedy
# answer that leaves the one-shot's at token 12 of 24); float32 is. Engines whose answers tests
# compare token for token use it.
EXACT_DTYPE = "float32"


@pytest.fixture(scope="session")
async def engine(tiny_model):
    from stream2llm.engine.engine import EngineConfig, StreamingEngine

    eng = await StreamingEngine.start(
        EngineConfig(
            model="tiny",
            fast_start=False,  # spawn: forking after the unit tests ran torch in this process can hang
            kv_cache_bytes=256 << 20,
            max_model_len=4096,
            max_num_batched_tokens=2048,
            dtype=EXACT_DTYPE,
        )
    )
    yield eng
    await eng.shutdown()


def corpus_text(n_chars: int, seed: int = 0) -> str:
    """Real English-ish text (Python's help topics), a different slice per seed."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    start = random.Random(seed).randrange(0, len(text) - n_chars)
    return text[start : start + n_chars]
