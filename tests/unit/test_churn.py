"""ANN churn: measured on a capture, fitted, and drawn by the synthetic generator."""

from __future__ import annotations

import gzip
import hashlib
import statistics

import pytest
from typer.testing import CliRunner

from stream2llm.cli import app
from stream2llm.workloads import synth
from stream2llm.workloads.churn import (
    ChurnModel,
    final_prefix_kept,
    fit_churn,
    packaged_churn,
    phase_bin,
    request_churn,
)
from stream2llm.workloads.trace import TraceEvent, TraceRequest, read_trace, write_trace

# sha256 of `synthesize("anns", 40, seed=7)` written by write_trace at 4d83091 (before churn models)
HEAD_ANNS_SEED7_N40 = "59d72fe89c539ed6d27a0009ac75ed654f6963dcd71857c80f16864a4d3c0eb1"

KNOWN = ChurnModel(
    k=10,
    change_by_phase=(0.7, 0.35, 0.1),
    changes=((2, 4, 0.1), (3, 2, 0.2), (5, 1, 0.3), (7, 3, 0.15), (9, 1, 0.25)),  # (first slot, docs, p)
)


def _request(*rankings: str) -> TraceRequest:
    events = tuple(TraceEvent(0.1 * i, "update", docs=tuple(r)) for i, r in enumerate(rankings))
    return TraceRequest("r", "anns", "q", events)


def test_churn_is_measured_on_the_stable_layout():
    # score order; stable: [a b c d] -> [a b c e] (d dropped at slot 3) -> [a c f g] (b, e dropped)
    churn = request_churn(_request("abcd", "bdca", "beac", "afgc"))
    assert [c.dropped for c in churn] == [(), (3,), (1, 3)]
    assert [c.phase for c in churn] == pytest.approx([1 / 3, 2 / 3, 1])
    assert [phase_bin(c.phase, 3) for c in churn] == [0, 1, 2]


def test_fit_recovers_known_parameters():
    fitted = fit_churn(synth.synthesize("anns", 3000, seed=3, churn=KNOWN))
    assert fitted.k == 10
    assert fitted.change_by_phase == pytest.approx(KNOWN.change_by_phase, abs=0.03)
    assert [cell[:2] for cell in fitted.changes] == [cell[:2] for cell in KNOWN.changes]
    assert [cell[2] for cell in fitted.changes] == pytest.approx([c[2] for c in KNOWN.changes], abs=0.03)
    assert fitted.changed_docs == pytest.approx((0.55, 0.2, 0.15, 0.1, 0, 0, 0, 0, 0, 0), abs=0.03)


def test_uniform_churn_reproduces_the_generator_before_churn_models(tmp_path):
    path = tmp_path / "anns.jsonl"
    write_trace(path, synth.synthesize("anns", 40, seed=7, churn="uniform"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == HEAD_ANNS_SEED7_N40


def test_fitted_traces_keep_the_fitted_no_change_fraction():
    model = packaged_churn()
    requests = synth.synthesize("anns", 1500, seed=11)
    churn = [c for r in requests for c in request_churn(r)]
    expected = statistics.fmean(1 - model.change_by_phase[phase_bin(c.phase, 3)] for c in churn)
    observed = statistics.fmean(not c.changed for c in churn)
    assert observed == pytest.approx(expected, abs=0.03)
    assert fit_churn(requests).change_by_phase == pytest.approx(model.change_by_phase, abs=0.05)


def test_packaged_fit_names_the_capture_it_came_from():
    model = packaged_churn()
    assert "ann-capture-200" in model.source and model.updates >= 600
    assert sum(cell[2] for cell in model.changes) == pytest.approx(1, abs=1e-3)
    assert all(first >= 0 and first + docs <= model.k for first, docs, _ in model.changes)


def test_final_prefix_kept_counts_the_documents_before_the_first_change():
    size = {"a": 10, "b": 20, "c": 30, "d": 40}.__getitem__
    one = TraceRequest("s", "anns", "q", (TraceEvent(0.0, "update", docs=("a",)),))
    kept = final_prefix_kept([_request("abc", "abd"), _request("abc", "abc"), one], size)
    assert kept == pytest.approx([30 / 70, 1.0, 0.0])


def test_gzip_traces_read_back(tmp_path):
    requests = synth.synthesize("anns", 3, seed=1, churn=KNOWN)
    write_trace(tmp_path / "t.jsonl", requests)

    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress((tmp_path / "t.jsonl").read_bytes()))
    assert read_trace(tmp_path / "t.jsonl.gz") == read_trace(tmp_path / "t.jsonl")
    assert [r.id for r in read_trace(tmp_path / "t.jsonl.gz")] == [r.id for r in requests]


def test_synth_command_takes_the_churn(tmp_path):
    for churn in ("uniform", "fitted"):
        out = tmp_path / f"{churn}.jsonl"
        args = [
            "synth",
            "--workload",
            "anns",
            "--n",
            "40",
            "--seed",
            "7",
            "--churn",
            churn,
            "--out",
            str(out),
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    digest = hashlib.sha256((tmp_path / "uniform.jsonl").read_bytes()).hexdigest()
    assert digest == HEAD_ANNS_SEED7_N40
    expected = tmp_path / "expected.jsonl"
    write_trace(expected, synth.synthesize("anns", 40, seed=7, churn=packaged_churn()))
    assert (tmp_path / "fitted.jsonl").read_bytes() == expected.read_bytes()
