"""How a progressive ANN search changes its top-k from one update to the next (churn): measured on
a capture, fitted as a ``ChurnModel``, and applied by the synthetic generator.

Every measurement is on the context assembler's stable layout (``context/layout.py``: survivors
keep their place, newcomers follow), the order the engine sees. Per update: did the document set
change, how many documents were replaced, the first replaced slot of the previous layout (the KV
kept is the prompt before it) and where in the query the update falls (its phase: update j of n
is at j / n, so the final update is at 1). The packaged fit (``data/ann_churn.json``) names the
capture it came from.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from stream2llm.workloads.trace import TraceRequest, with_stable_layout

PACKAGED_FIT = "data/ann_churn.json"


@dataclass(frozen=True)
class UpdateChurn:
    """What one update did to the previous event's layout."""

    phase: float  # update j of n updates: j / n (the final one is at 1)
    t_rel: float  # its time as a fraction of the query's first-to-last event time
    dropped: tuple[int, ...]  # slots of the previous layout whose documents left the top-k

    @property
    def changed(self) -> bool:
        return bool(self.dropped)


@dataclass(frozen=True)
class ChurnModel:
    """Per update: P(the top-k changes) by phase bin; given a change, the joint distribution of
    the first replaced slot (0-based, of a k-document layout) and the documents replaced, as
    ``(first slot, documents, probability)`` triples (joint: a late first slot leaves few to replace)."""

    k: int
    change_by_phase: tuple[float, ...]
    changes: tuple[tuple[int, int, float], ...]
    updates: int = 0  # updates the fit saw
    source: str = ""  # where the fit came from

    def change_probability(self, j: int, n_updates: int) -> float:
        """P(update ``j`` (1-based) of ``n_updates`` changes the top-k)."""
        return self.change_by_phase[phase_bin(j / n_updates, len(self.change_by_phase))]

    @property
    def first_slot(self) -> tuple[float, ...]:
        """P(first replaced slot = s | change), s = 0..k-1."""
        return _marginal(self.changes, 0, self.k)

    @property
    def changed_docs(self) -> tuple[float, ...]:
        """P(m documents replaced | change), index m - 1."""
        return _marginal(self.changes, 1, self.k, offset=1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> ChurnModel:
        changes = tuple((int(s), int(m), float(p)) for s, m, p in obj["changes"])
        return cls(**{**obj, "change_by_phase": tuple(obj["change_by_phase"]), "changes": changes})


def _marginal(
    changes: Sequence[tuple[int, int, float]], axis: int, size: int, offset: int = 0
) -> tuple[float, ...]:
    out = [0.0] * size
    for cell in changes:
        out[cell[axis] - offset] += cell[2]
    return tuple(round(p, 4) for p in out)


def phase_bin(phase: float, bins: int) -> int:
    """The bin of a phase in (0, 1]: equal bins, the last one closed at 1."""
    return min(bins - 1, max(0, math.ceil(phase * bins) - 1))


def packaged_churn() -> ChurnModel:
    """The churn fitted from our capture of the real progressive retriever (see its ``source``)."""
    text = resources.files("stream2llm.workloads").joinpath(PACKAGED_FIT).read_text()
    return ChurnModel.from_json(json.loads(text)["model"])


def request_churn(request: TraceRequest) -> list[UpdateChurn]:
    """Each update of one request, measured on its stable layout."""
    (laid_out,) = with_stable_layout([request])
    events = [e for e in laid_out.events if e.op == "update" and e.docs is not None]
    if len(events) < 2:
        return []
    t0, span = events[0].t, events[-1].t - events[0].t
    out = []
    for j, (before, after) in enumerate(zip(events, events[1:]), 1):
        kept = set(after.docs or ())
        dropped = tuple(i for i, doc in enumerate(before.docs or ()) if doc not in kept)
        t_rel = (after.t - t0) / span if span > 0 else j / (len(events) - 1)
        out.append(UpdateChurn(j / (len(events) - 1), t_rel, dropped))
    return out


def _joint(cells: Sequence[tuple[int, int]]) -> tuple[tuple[int, int, float], ...]:
    """Observed (first slot, documents) pairs as probabilities, in slot then count order."""
    counts = Counter(cells)
    return tuple((s, m, round(n / len(cells), 4)) for (s, m), n in sorted(counts.items()))


def fit_churn(requests: Sequence[TraceRequest], *, bins: int = 3, source: str = "") -> ChurnModel:
    """The churn of update-mode requests (a capture of a progressive retriever) as a model."""
    sizes = [len(e.docs) for r in requests for e in r.events if e.docs]
    if not sizes:
        raise ValueError("no update events with documents to fit churn on")
    k = statistics.mode(sizes)
    churn = [c for r in requests for c in request_churn(r)]
    if not churn:
        raise ValueError("no request has two updates: nothing to fit churn on")
    by_bin: list[list[bool]] = [[] for _ in range(bins)]
    for c in churn:
        by_bin[phase_bin(c.phase, bins)].append(c.changed)
    changed = [(c.dropped[0], len(c.dropped)) for c in churn if c.changed and c.dropped[-1] < k]
    return ChurnModel(
        k=k,
        change_by_phase=tuple(round(statistics.fmean(b), 4) if b else 0.0 for b in by_bin),
        changes=_joint(changed),
        updates=len(churn),
        source=source,
    )


def churned(
    rng: random.Random,
    model: ChurnModel,
    docs: Sequence[str],
    j: int,
    n_updates: int,
    new_doc: Callable[[str], str],
) -> list[str]:
    """Update ``j`` of ``n_updates`` applied to a layout: unchanged, or a (first slot, documents)
    pair drawn from the model, that slot and others after it dropped (uniformly), survivors kept in
    place and ``new_doc(dropped document)`` for each appended, as the stable layout puts newcomers."""
    if rng.random() >= model.change_probability(j, n_updates):
        return list(docs)
    k = len(docs)
    cells = [cell for cell in model.changes if cell[0] + cell[1] <= k]
    first, m, _ = rng.choices(cells, weights=[cell[2] for cell in cells])[0]
    dropped = sorted({first, *rng.sample(range(first + 1, k), m - 1)})
    survivors = [doc for i, doc in enumerate(docs) if i not in dropped]
    return survivors + [new_doc(docs[slot]) for slot in dropped]


def final_prefix_kept(requests: Iterable[TraceRequest], length: Callable[[str], int]) -> list[float]:
    """Per request: the share of its final context (``length`` tokens per document) kept as an
    exact prefix of the event before (0 for a request of one event)."""
    out = []
    for request in requests:
        docs = [e.docs or () for e in request.events]
        final = sum(map(length, docs[-1]))
        kept = 0
        if len(docs) > 1:
            for before, after in zip(docs[-2], docs[-1]):
                if before != after:
                    break
                kept += length(after)
        out.append(kept / final if final else 0.0)
    return out


def churn_summary(requests: Sequence[TraceRequest], length: Callable[[str], int]) -> dict:
    """What a capture (or a synthetic trace) does per update, for reports."""
    churn = [c for r in requests for c in request_churn(r)]
    changed = [c for c in churn if c.changed]
    kept = final_prefix_kept(requests, length)
    return {
        "requests": len(requests),
        "updates": len(churn),
        "no_change_fraction": 1 - len(changed) / len(churn) if churn else None,
        "final_unchanged_fraction": statistics.fmean(kept_all == 1.0 for kept_all in kept),
        "changed_docs_mean": statistics.fmean(len(c.dropped) for c in changed) if changed else 0.0,
        "first_slot_mean": statistics.fmean(c.dropped[0] for c in changed) if changed else None,
        "changing_update_t_rel_mean": statistics.fmean(c.t_rel for c in changed) if changed else None,
        "final_prefix_kept_p50": statistics.median(kept),
        "final_prefix_kept_mean": statistics.fmean(kept),
    }


def save_fit(model: ChurnModel, summary: dict, path: str | Path) -> None:
    """The fit as the package stores it: the model and what the capture looked like (one
    ``[first slot, documents, p]`` cell a line)."""
    text = json.dumps({"model": model.to_json(), "capture": summary}, indent=1)
    text = re.sub(r"\[\s+(\d+),\s+(\d+),\s+([\d.e-]+)\s+\]", r"[\1, \2, \3]", text)
    Path(path).write_text(text + "\n")
