"""What a bench or simulator "policy" name means: how the session hands over its context (mode) and
which scheduling policy the engine core runs it under. ``nonstream`` and ``vllm`` are the published
baselines (the whole prompt after retrieval, stock vLLM streaming sessions), both on vLLM's own
scheduling; every other name streams context through our sessions under that scheduling policy.

``nonstream-ranked`` is the whole prompt after retrieval under stream2llm's ranking: against it,
stream2llm's gain is the gain of streaming alone (against ``nonstream`` it is streaming plus
shortest-first ranking over vLLM's FIFO). The engine core sees a one-shot request as a complete
stream from its first chunk, so the ranking serves the shortest whole prompts first."""

from __future__ import annotations

from dataclasses import dataclass

from stream2llm.core.policies import POLICIES


@dataclass(frozen=True)
class BenchPolicy:
    mode: str  # Session mode: stream, nonstream or vllm
    scheduler: str  # a scheduling policy of core.policies


BENCH_POLICIES: dict[str, BenchPolicy] = {
    "nonstream": BenchPolicy("nonstream", "vllm"),
    "nonstream-ranked": BenchPolicy("nonstream", "stream2llm"),
    "vllm": BenchPolicy("vllm", "vllm"),
    **{name: BenchPolicy("stream", name) for name in POLICIES if name != "vllm"},
}


def bench_policy(name: str) -> BenchPolicy:
    """The mode and scheduler of a policy name; ValueError naming the known ones otherwise."""
    if name not in BENCH_POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(BENCH_POLICIES)}")
    return BENCH_POLICIES[name]


def check_policies(names: list[str]) -> None:
    """Every name is known (checked before an engine starts, so a typo costs nothing)."""
    unknown = [p for p in names if p not in BENCH_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(BENCH_POLICIES)}")
