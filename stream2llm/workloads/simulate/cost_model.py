"""Cost model: how long recomputing n tokens takes, and moving KV bytes out and back.

A profile is JSON: ``prefill`` holds the coefficients of t(n) = a + b*n + c*n^2 (seconds for a
prefill of n tokens on an empty context; the n^2 term is attention), ``step`` the fixed cost of an
engine step, ``offload`` t(bytes) = a + b*bytes for a round trip to host memory (or null where the
engine cannot offload, with ``offload_note`` saying why), and the KV geometry. Profiles are fitted
from measurements (``stream2llm calibrate``) or estimated from published hardware figures.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

PROFILE_SCHEMA = "stream2llm.cost-profile/1"


@dataclass(frozen=True)
class CostProfile:
    name: str
    hardware: str
    model: str
    prefill: tuple[float, float, float]  # a, b, c
    step_s: float  # fixed cost of one engine step (scheduling, launch, sampling)
    decode_token_s: float  # per running request per step
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    max_num_batched_tokens: int
    offload: tuple[float, float] | None = None  # a, b (seconds, seconds per byte), round trip
    offload_note: str = ""
    source: str = ""
    measurements: dict = field(default_factory=dict)
    # the front end (same cores on CPU): an event's fixed trip into the engine, tokenizing (the final
    # event re-tokenizes the whole prompt, so it equals one-shot tokenization), a token's trip out
    frontend_in_s: float = 0.0
    tokenize_token_s: float = 0.0
    frontend_out_s: float = 0.0
    # per-request bookkeeping in every step (the scheduler's and the model runner's loops): for each
    # prefill chunk it schedules, and for each request the engine core holds (running, waiting or
    # parked between chunks); a streaming engine holds every open session, a one-shot one few
    chunk_request_s: float = 0.0
    held_request_s: float = 0.0

    def prefill_s(self, n_tokens: float) -> float:
        a, b, c = self.prefill
        return a + b * n_tokens + c * n_tokens * n_tokens

    def chunk_s(self, n_tokens: float, context: float) -> float:
        """Prefill of n tokens after ``context`` cached ones: the attention term grows with both."""
        _, b, c = self.prefill
        return b * n_tokens + c * (n_tokens * n_tokens + 2 * n_tokens * context)

    def step_overhead_s(self, chunks: int, held: int) -> float:
        """A step's cost besides its chunks' prefill: fixed, per chunk scheduled, per request held."""
        return self.step_s + self.chunk_request_s * chunks + self.held_request_s * held

    def step_costs(self) -> StepCosts:
        """The profile's step cost terms, in the order ``step_cycles`` gives a step's features."""
        _, b, c = self.prefill
        return StepCosts(self.step_s, b, c, self.decode_token_s, self.chunk_request_s, self.held_request_s)

    def handoff_s(self, tokens_tokenized: int) -> float:
        """From an event reaching the front end to its tokens being schedulable in the engine."""
        return self.frontend_in_s + self.tokenize_token_s * tokens_tokenized

    def offload_roundtrip_s(self, n_tokens: int) -> float | None:
        if self.offload is None:
            return None
        a, b = self.offload
        return a + b * n_tokens * self.kv_bytes_per_token

    def to_json(self) -> dict:
        return {"schema": PROFILE_SCHEMA, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, obj: dict) -> CostProfile:
        if obj.get("schema") != PROFILE_SCHEMA:
            raise ValueError(
                f"not a cost profile: schema is {obj.get('schema')!r}, expected {PROFILE_SCHEMA!r}"
            )
        fields = {k: v for k, v in obj.items() if k != "schema"}
        fields["prefill"] = tuple(fields["prefill"])
        if fields.get("offload") is not None:
            fields["offload"] = tuple(fields["offload"])
        return cls(**fields)

    @classmethod
    def load(cls, name_or_path: str | Path) -> CostProfile:
        """A packaged profile by name (``cpu-tiny``, ``h200-llama3.1-8b``...) or a JSON file."""
        path = Path(name_or_path)
        if not path.exists():
            packaged = resources.files(__package__).joinpath(f"profiles/{name_or_path}.json")
            if not packaged.is_file():
                raise ValueError(
                    f"no cost profile {name_or_path!r}; packaged: {', '.join(packaged_profiles())}"
                )
            return cls.from_json(json.loads(packaged.read_text()))
        return cls.from_json(json.loads(path.read_text()))


def packaged_profiles() -> list[str]:
    folder = resources.files(__package__).joinpath("profiles")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def fit_prefill(
    tokens: list[int], seconds: list[float], step_tokens: int | None = None
) -> tuple[float, float, float]:
    """Least-squares fit of a*steps + b*n + c*n^2 (non-negative b and c), weighting relative error.

    ``steps`` is 1, or, when the engine prefilled in chunks of ``step_tokens``, ceil(n / step_tokens):
    each chunk pays the step's fixed cost (``a``), which a one-step fit would fold into ``b``."""
    x = np.asarray(tokens, dtype=float)
    steps = np.ceil(x / step_tokens) if step_tokens else np.ones_like(x)
    a, b, c = _fit_relative(np.stack([steps, x, x * x], axis=1), seconds)
    return a, b, c


def _fit_relative(design: np.ndarray, seconds: list[float]) -> tuple[float, ...]:
    """Least squares on relative error (each row divided by its time), coefficients clamped at 0."""
    y = np.asarray(seconds, dtype=float)
    return _fit_absolute(np.asarray(design, dtype=float) / y[:, None], np.ones_like(y))


def _fit_absolute(design: np.ndarray, seconds: Any) -> tuple[float, ...]:
    """Plain least squares, coefficients clamped at 0."""
    x, y = np.asarray(design, dtype=float), np.asarray(seconds, dtype=float)
    coeffs, *_ = np.linalg.lstsq(x, y, rcond=None)
    return tuple(max(float(v), 0.0) for v in coeffs)


BACK_TO_BACK_S = 0.002  # a gap this short between steps is the engine handling outputs, not idling


class StepCosts(NamedTuple):
    """A step's cost terms as ``fit_steps`` finds them in a step log."""

    step_s: float
    token_s: float
    attention_s: float  # times sum(n^2 + 2*n*context) over the step's chunks
    decode_s: float  # per request that only decodes
    chunk_request_s: float  # per prefill chunk
    held_request_s: float  # per request the engine core holds

    def predict(self, features: tuple[float, ...]) -> float:
        return sum(coef * x for coef, x in zip(self, features))


def step_cycles(steps: list[dict]) -> list[tuple[dict, tuple[float, ...], float]]:
    """(step, its cost features as ``StepCosts`` orders them, seconds) for each logged step that did
    work. A step's time runs from its scheduling to the next step's when the engine went straight
    on (output handling is part of its cost), else to its output."""
    out = []
    for step, following in zip(steps, [*steps[1:], None]):
        prefill = step["prefill"]
        if not prefill and not step["decodes"]:
            continue
        tokens = sum(n for n, *_ in prefill)
        attention = sum(n * n + 2 * n * ctx for n, ctx, *_ in prefill)
        features = (1.0, tokens, attention, step["decodes"], len(prefill), step.get("held", 0))
        straight_on = following is not None and 0 <= following["t0"] - step["t2"] < BACK_TO_BACK_S
        out.append((step, features, (following["t0"] if straight_on else step["t2"]) - step["t0"]))
    return out


def fit_steps(steps: list[dict]) -> StepCosts:
    """Fit step cost = step_s + b*tokens + c*sum(n^2 + 2*n*context) + d*decodes + e*chunks + f*held
    to logged engine steps (``EngineConfig.step_log``).

    Unlike an idle calibration this sees the machine as a benchmark loads it: prefill chunks deep
    in long contexts, decodes, the engine's per-request bookkeeping (a streaming engine holds every
    open session) and the front end competing for the same cores, each step timed as
    ``step_cycles`` says. Plain least squares, so the fitted costs add up to the logged busy time:
    queueing depends on the total work, which a relative-error fit underestimates. Logs without
    ``held`` fit 0 there."""
    cycles = step_cycles(steps)
    if len(cycles) < 6:
        raise ValueError(f"too few engine steps to fit a step cost ({len(cycles)}; need at least 6)")
    rows, seconds = [features for _, features, _ in cycles], [s for *_, s in cycles]
    return StepCosts(*_fit_absolute(np.asarray(rows), seconds))


def fit_frontend(
    timelines: list[tuple[str, float, float, float]], prompt_tokens: list[int], steps: list[dict]
) -> tuple[float, float, float]:
    """(frontend_in_s, tokenize_token_s, frontend_out_s) from a bench's request timelines (engine
    id, final event, its hand-off, first token; the step log's monotonic clock) and its step log.

    Tokenizing: hand-off minus final event against the prompt's length. The trip in: from the
    hand-off to the first step holding the request, counted only where no step was running then
    (else it is queueing). The trip out: from the last step holding the request to the first token.
    """
    by_id: dict[str, list[dict]] = {}
    for step in steps:
        for *_, request_id in step["prefill"]:
            by_id.setdefault(request_id.split("#")[0], []).append(step)
    starts = [s["t0"] for s in steps]
    handoff, trip_in, trip_out = [], [], []
    for (request_id, final_at, handed_at, first_at), tokens in zip(timelines, prompt_tokens):
        handoff.append((tokens, handed_at - final_at))
        mine = by_id.get(request_id)
        if not mine:
            continue
        trip_out.append(first_at - mine[-1]["t2"])
        later = [s for s in mine if s["t0"] >= handed_at]
        before = bisect.bisect_right(starts, handed_at) - 1
        idle = before < 0 or steps[before]["t2"] <= handed_at
        if later and idle:
            trip_in.append(later[0]["t0"] - handed_at)
    if len(handoff) < 2 or not trip_in or not trip_out:
        raise ValueError("too few requests joined to the step log to fit the front end")
    fixed, per_token = _fit_absolute(np.asarray([(1.0, n) for n, _ in handoff]), [s for _, s in handoff])
    return fixed + float(np.median(trip_in)), per_token, float(np.median(trip_out))
