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

from stream2llm.core.policies import POLICIES, PREEMPTIONS


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


def split_run_name(name: str) -> tuple[str, str | None]:
    """A run's name is a policy, or ``policy@preemption`` (how its victims give KV back)."""
    policy, _, preemption = name.partition("@")
    return policy, preemption or None


def bench_policy(name: str) -> BenchPolicy:
    """The mode and scheduler of a policy name (a ``@preemption`` suffix aside); ValueError naming
    the known ones otherwise."""
    policy, _ = split_run_name(name)
    if policy not in BENCH_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(BENCH_POLICIES)}")
    return BENCH_POLICIES[policy]


def check_policies(names: list[str]) -> None:
    """Every name is known (checked before an engine starts, so a typo costs nothing)."""
    unknown = [p for p in names if split_run_name(p)[0] not in BENCH_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(BENCH_POLICIES)}")
    bad = [p for p in names if split_run_name(p)[1] not in (None, *PREEMPTIONS)]
    if bad:
        raise ValueError(f"unknown preemption in {bad}; known: {', '.join(PREEMPTIONS)}")


def with_preemptions(policies: list[str], preemptions: list[str]) -> list[str]:
    """Each policy under each way of giving KV back, named ``policy@preemption``, where there are
    several. Names that carry their own ``@preemption`` are kept, and so are policies on vLLM's
    own scheduling (``nonstream``, ``vllm``): they never evict, so there is nothing to vary."""
    unknown = [p for p in preemptions if p not in PREEMPTIONS]
    if unknown or not preemptions:
        raise ValueError(f"--preemption {','.join(preemptions)!r}: expected some of {', '.join(PREEMPTIONS)}")
    if len(preemptions) == 1:
        return list(policies)
    out: list[str] = []
    for name in policies:
        fixed = "@" in name or bench_policy(name).scheduler == "vllm"
        out += [name] if fixed else [f"{name}@{x}" for x in preemptions]
    return out
