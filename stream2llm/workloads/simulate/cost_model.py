"""Fitting cost profiles (``core.cost_profile``) to measurements: idle prefill curves, logged
engine steps under load, the front end's hand-off and trip out."""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from stream2llm.core.cost_profile import PROFILE_SCHEMA, CostProfile, StepCosts, packaged_profiles

__all__ = [
    "PROFILE_SCHEMA",
    "CostProfile",
    "StepCosts",
    "fit_frontend",
    "fit_prefill",
    "fit_steps",
    "packaged_profiles",
]


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
    return fit_absolute(np.asarray(design, dtype=float) / y[:, None], np.ones_like(y))


def fit_absolute(design: np.ndarray, seconds: Any) -> tuple[float, ...]:
    """Plain least squares, coefficients clamped at 0."""
    x, y = np.asarray(design, dtype=float), np.asarray(seconds, dtype=float)
    coeffs, *_ = np.linalg.lstsq(x, y, rcond=None)
    return tuple(max(float(v), 0.0) for v in coeffs)


BACK_TO_BACK_S = 0.002  # a gap this short between steps is the engine handling outputs, not idling


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
    return StepCosts(*fit_absolute(np.asarray(rows), seconds))


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
    fixed, per_token = fit_absolute(np.asarray([(1.0, n) for n, _ in handoff]), [s for _, s in handoff])
    return fixed + float(np.median(trip_in)), per_token, float(np.median(trip_out))
