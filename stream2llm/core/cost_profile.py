"""The hardware cost model the engine's resource decisions follow, and the simulator replays.

A profile is JSON: ``prefill`` holds the coefficients of t(n) = a + b*n + c*n^2 (seconds for a
prefill of n tokens on an empty context; the n^2 term is attention), ``step`` the fixed cost of an
engine step, ``kv_save`` and ``kv_load`` t(bytes) = a + b*bytes for moving KV out to the host tier
and back (null where the engine has no tier, with ``offload_note`` saying why), and the KV
geometry. Profiles are fitted from measurements (``stream2llm calibrate``) or estimated from
published hardware figures; the packaged ones live beside this module (``profiles/``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

PROFILE_SCHEMA = "stream2llm.cost-profile/1"
DEFAULT_PROFILE = "cpu-tiny"

Linear = tuple[float, float]  # a + b*x


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
    kv_save: Linear | None = None  # seconds = a + b*bytes, engine KV to the host tier
    kv_load: Linear | None = None  # seconds = a + b*bytes, host tier back into engine KV
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

    def handoff_s(self, tokens_tokenized: int) -> float:
        """From an event reaching the front end to its tokens being schedulable in the engine."""
        return self.frontend_in_s + self.tokenize_token_s * tokens_tokenized

    def step_costs(self) -> StepCosts:
        """The profile's step cost terms, in the order a logged step's features come in."""
        _, b, c = self.prefill
        return StepCosts(self.step_s, b, c, self.decode_token_s, self.chunk_request_s, self.held_request_s)

    @property
    def offload(self) -> bool:
        """Whether the profile knows a tier to offload KV to (both directions measured)."""
        return self.kv_save is not None and self.kv_load is not None

    def save_s(self, n_tokens: int, kv_bytes_per_token: int | None = None) -> float:
        """Seconds to save n tokens' KV to the tier (at the given KV geometry, else the profile's)."""
        return _linear(self.kv_save, n_tokens * (kv_bytes_per_token or self.kv_bytes_per_token))

    def load_s(self, n_tokens: int, kv_bytes_per_token: int | None = None) -> float:
        """Seconds to load n tokens' KV back from the tier."""
        return _linear(self.kv_load, n_tokens * (kv_bytes_per_token or self.kv_bytes_per_token))

    def offload_roundtrip_s(self, n_tokens: int) -> float | None:
        return self.save_s(n_tokens) + self.load_s(n_tokens) if self.offload else None

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
        legacy = fields.pop("offload", None)  # earlier profiles: one round trip, split evenly
        if legacy is not None and "kv_save" not in fields:
            fields["kv_save"] = fields["kv_load"] = (legacy[0] / 2, legacy[1] / 2)
        for key in ("kv_save", "kv_load"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        return cls(**fields)

    @classmethod
    def load(cls, name_or_path: str | Path) -> CostProfile:
        """A packaged profile by name (``cpu-tiny``, ``h200-llama3.1-8b``...) or a JSON file."""
        return cls.from_json(profile_json(name_or_path))


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


def profile_json(name_or_path: str | Path) -> dict[str, Any]:
    """The JSON of a packaged profile by name, or of a profile file."""
    path = Path(name_or_path)
    if path.exists():
        return json.loads(path.read_text())
    packaged = resources.files(__package__).joinpath(f"profiles/{name_or_path}.json")
    if not packaged.is_file():
        raise ValueError(f"no cost profile {name_or_path!r}; packaged: {', '.join(packaged_profiles())}")
    return json.loads(packaged.read_text())


def packaged_profiles() -> list[str]:
    folder = resources.files(__package__).joinpath("profiles")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def _linear(coefficients: Linear | None, x: float) -> float:
    if coefficients is None:
        raise ValueError("this cost profile has no KV tier (kv_save/kv_load are null)")
    a, b = coefficients
    return a + b * x
