"""`stream2llm synth` then `stream2llm bench`, end to end on the tiny model (small size)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stream2llm.cli import app
from stream2llm.core.step_log import read_step_log
from stream2llm.workloads.trace import read_trace


def test_synth_then_bench_end_to_end(tmp_path, tiny_model):
    runner = CliRunner()
    trace = tmp_path / "crawler.jsonl"
    res = runner.invoke(
        app,
        ["synth", "--workload", "crawler", "--n", "6", "--seed", "3", "--scale", "0.05", "--out", str(trace)],
    )
    assert res.exit_code == 0, res.output
    assert "inter_chunk_gap_ms.median" in res.output and len(read_trace(trace)) == 6

    out = tmp_path / "bench"
    res = runner.invoke(
        app,
        [
            "bench",
            str(trace),
            "--qps",
            "4",
            "--policies",
            "nonstream,vllm,stream2llm",
            "--delay-multiplier",
            "0.2",
            "--kv-budget",
            "256M",
            "--max-model-len",
            "4096",
            "--step-log",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads((out / "results.json").read_text())
    assert result["schema"] == "stream2llm.bench/1"
    runs = {r["policy"]: r for r in result["runs"]}
    assert set(runs) == {"nonstream", "vllm", "stream2llm"}
    for run in runs.values():
        assert run["qps"] == 4.0 and run["requests"] == 6 and run["errors"] == 0
        assert 0 < run["ttft_final_s"]["p50"] <= run["ttft_final_s"]["p99"] <= run["ttft_final_s"]["p999"]
        assert run["ttft_query_s"]["p50"] > run["ttft_final_s"]["p50"]  # the query waited for retrieval
        assert run["completion_s"] > 0 and run["tokens_prefilled"] > 0
        assert len(run["samples"]["ttft_final_s"]) == 6
    # streaming prefills each chunk on arrival: the final chunk is a fraction of the prompt
    assert max(runs["stream2llm"]["samples"]["final_chunk_tokens"]) < max(
        runs["nonstream"]["samples"]["final_chunk_tokens"]
    )
    for png in ("ttft_final_vs_qps.png", "completion.png", "ttft_final_ccdf_qps4.png"):
        assert (out / png).stat().st_size > 5000

    # the step log: every prefilled token of the stock-vLLM runs (nonstream, vllm) is in the steps
    # labelled with their engine policy, each step within the token budget, times in order
    steps = read_step_log(out / "steps.jsonl")
    logged = sum(n for s in steps if s["policy"] == "vllm" for n, *_ in s["prefill"])
    assert logged == runs["nonstream"]["tokens_prefilled"] + runs["vllm"]["tokens_prefilled"]
    assert all(s["t0"] <= s["t1"] <= s["t2"] for s in steps)
    assert max(sum(n for n, *_ in s["prefill"]) for s in steps) <= 2048
    assert any(complete for s in steps for _, _, complete, _ in s["prefill"])
    # every request a step schedules is held by the core; streams also hold parked sessions
    assert all(s["held"] >= len(s["prefill"]) + s["decodes"] for s in steps)
    assert any(s["held"] > len(s["prefill"]) + s["decodes"] for s in steps if s["policy"] == "stream2llm")
    trace_ids = {r.id for r in read_trace(trace)}
    logged_ids = {rid.split("@")[0] for s in steps if s["policy"] == "vllm" for *_, rid in s["prefill"]}
    assert trace_ids <= logged_ids  # each step names the trace request it worked for

    # each request's timeline is on the step log's clock: final event, hand-off, first token in
    # order, and the request's last logged step ends between its hand-off and its first token
    by_id: dict[str, list[dict]] = {}
    for s in steps:
        for *_, rid in s["prefill"]:
            by_id.setdefault(rid.split("#")[0], []).append(s)
    for run in runs.values():
        timelines = run["samples"]["timeline"]
        assert len(timelines) == 6 and len(run["samples"]["prompt_tokens"]) == 6
        for rid, final_at, handed_at, first_at in timelines:
            assert final_at <= handed_at < first_at
            assert handed_at < by_id[rid][-1]["t2"] <= first_at
    res = runner.invoke(
        app,
        [
            "calibrate",
            "--from-steps",
            str(out / "steps.jsonl"),
            "--bench",
            str(out / "results.json"),
            "--max-batched-tokens",
            "2048",
            "--out",
            str(tmp_path / "profile.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert 0 < profile["frontend_in_s"] < 0.5 and 0 < profile["frontend_out_s"] < 0.5


def test_bench_rotates_policies_and_times_ttft_from_the_trace(tmp_path, tiny_model):
    """nonstream-ranked: the whole prompt after retrieval, ranked by our policy in the engine core
    (its steps logged under stream2llm, the request complete from its first chunk). Two repeats
    run the policies in rotated order. ttft_due_s counts from when the trace says each final event
    was due (the run's start + arrival + t x delay multiplier), so it is ttft_final_s plus the
    replay's own lateness, never less."""
    from stream2llm.workloads.arrivals import poisson_arrivals

    runner = CliRunner()
    trace = tmp_path / "crawler.jsonl"
    synth = ["synth", "--workload", "crawler", "--n", "5", "--seed", "4", "--scale", "0.03"]
    assert runner.invoke(app, [*synth, "--out", str(trace)]).exit_code == 0
    out = tmp_path / "bench"
    policies = ["nonstream", "nonstream-ranked", "stream2llm"]
    args = ["bench", str(trace), "--qps", "4", "--policies", ",".join(policies), "--repeat", "2"]
    args += ["--delay-multiplier", "0.2", "--kv-budget", "256M", "--max-model-len", "4096"]
    res = runner.invoke(app, [*args, "--step-log", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "results.json").read_text())
    assert result["complete"] and result["policy_order"] == "rotated"
    order = [(r["repeat"], r["position"], r["policy"]) for r in result["runs"]]
    assert order == [
        (0, 0, "nonstream"),
        (0, 1, "nonstream-ranked"),
        (0, 2, "stream2llm"),
        (1, 0, "nonstream-ranked"),
        (1, 1, "stream2llm"),
        (1, 2, "nonstream"),
    ]
    requests = read_trace(trace)
    for run in result["runs"]:
        assert run["errors"] == 0 and len(run["samples"]["ttft_due_s"]) == 5
        assert 0 < run["ttft_final_s"]["p50"] <= run["ttft_due_s"]["p50"] + 1e-3
        # each request's due time on the engine's clock (first token - ttft_due_s) is the trace's
        # schedule shifted by the run's start, the same for every request of the run
        arrivals = poisson_arrivals(5, 4.0, 42 + run["repeat"])
        starts = []
        for request, arrival, due_ttft, ttft, (_, final_at, handed_at, first_at) in zip(
            requests,
            arrivals,
            run["samples"]["ttft_due_s"],
            run["samples"]["ttft_final_s"],
            run["samples"]["timeline"],
        ):
            due_at = first_at - due_ttft
            assert due_at <= final_at + 1e-4 <= handed_at + 1e-4  # no event goes before it is due
            assert due_ttft >= ttft - 1e-4
            starts.append(due_at - (arrival + request.events[-1].t * 0.2))
        assert max(starts) - min(starts) < 1e-3
    summary = {e["policy"]: e for e in result["summary"]}
    assert summary["nonstream-ranked"]["repeats"] == 2 and "ttft_due_s" in summary["nonstream-ranked"]

    # nonstream-ranked sends the whole prompt once, and the engine core runs it under our ranking
    # as a complete request (nonstream: the same prompts, under vLLM's order)
    steps = read_step_log(out / "steps.jsonl")
    for run in result["runs"]:
        final, prompt = run["samples"]["final_chunk_tokens"], run["samples"]["prompt_tokens"]
        if run["policy"] == "stream2llm":
            assert all(f < p for f, p in zip(final, prompt))
            continue
        assert final == prompt  # one chunk: the whole prompt
        ids = {rid for rid, *_ in run["samples"]["timeline"]}
        mine = [(s["policy"], c) for s in steps for _, _, c, rid in s["prefill"] if rid.split("#")[0] in ids]
        expected = "stream2llm" if run["policy"] == "nonstream-ranked" else "vllm"
        assert mine and all(policy == expected and complete for policy, complete in mine)
    by_policy: dict[str, list[list[int]]] = {}
    for run in result["runs"]:
        by_policy.setdefault(run["policy"], []).append(run["samples"]["prompt_tokens"])
    assert by_policy["nonstream-ranked"] == by_policy["nonstream"]
