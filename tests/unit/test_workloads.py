"""Traces, synthetic workloads and metrics: pure logic, no model."""

from __future__ import annotations

import json

import pytest

from stream2llm.workloads import metrics, synth
from stream2llm.workloads.trace import (
    SCHEMA,
    TraceError,
    TraceEvent,
    TraceRequest,
    import_ann_traces,
    import_crawler_csv,
    read_trace,
    with_stable_layout,
    write_trace,
)


def test_round_trip(tmp_path):
    requests = [
        TraceRequest(
            "a",
            "crawler",
            "q?",
            (TraceEvent(0.5, "append", text="page"), TraceEvent(1.0, "append", n_tokens=9)),
        ),
        TraceRequest("b", "anns", "q2", (TraceEvent(0.1, "update", docs=("d1", "d2")),)),
    ]
    path = tmp_path / "t.jsonl"
    assert write_trace(path, requests) == 2
    assert read_trace(path) == requests


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r"t.jsonl:2: not JSON"),
        (json.dumps({"schema": "other"}), r"t.jsonl:2: field 'schema' is 'other'"),
        (
            json.dumps({"schema": SCHEMA, "id": "x", "workload": "w", "query": "q", "events": []}),
            "'events' is empty",
        ),
        (
            json.dumps(
                {
                    "schema": SCHEMA,
                    "id": "x",
                    "workload": "w",
                    "query": "q",
                    "events": [{"t": 1, "op": "insert", "text": "a"}],
                }
            ),
            r"events\[0\]: field 'op' is 'insert'",
        ),
        (
            json.dumps(
                {
                    "schema": SCHEMA,
                    "id": "x",
                    "workload": "w",
                    "query": "q",
                    "events": [{"t": 2, "op": "append", "text": "a"}, {"t": 1, "op": "append", "text": "b"}],
                }
            ),
            r"events\[1\]: field 't' goes back in time",
        ),
        (
            json.dumps(
                {
                    "schema": SCHEMA,
                    "id": "x",
                    "workload": "w",
                    "query": "q",
                    "events": [{"t": 1, "op": "append", "text": "a", "n_tokens": 3}],
                }
            ),
            "exactly one of",
        ),
        (
            json.dumps(
                {
                    "schema": SCHEMA,
                    "id": "x",
                    "workload": "w",
                    "query": 5,
                    "events": [{"t": 1, "op": "append", "text": "a"}],
                }
            ),
            "field 'query' has type int",
        ),
        (
            json.dumps(
                {
                    "schema": SCHEMA,
                    "id": "a",
                    "workload": "w",
                    "query": "q",
                    "events": [{"t": 1, "op": "append", "text": "a"}],
                }
            ),
            "duplicate id 'a'",
        ),
    ],
)
def test_errors_name_line_and_field(tmp_path, line, message):
    good = TraceRequest("a", "w", "q", (TraceEvent(0.0, "append", text="x"),))
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good.to_json()) + "\n" + line + "\n")
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_import_published_crawler_csv(tmp_path):
    csv_path = tmp_path / "query_7.csv"
    csv_path.write_text(
        "type,query,content,startTime,endTime\n"
        "tavily_search,who wrote it,,0.0,0.9\n"
        "page_scrape,,second page,1.0,2.5\n"
        "page_scrape,,first page,1.0,1.7\n"
        "page_scrape,,,1.0,3.0\n"
    )
    request = import_crawler_csv(csv_path)
    assert request.query == "who wrote it" and request.id == "query_7"
    assert [(e.t, e.text) for e in request.events] == [(1.7, "first page"), (2.5, "second page")]


def test_import_published_ann_traces(tmp_path):
    (tmp_path / "corpus.part.0.json").write_text(
        json.dumps({"11": "doc eleven", "12": "doc twelve", "13": "doc 13"})
    )
    (tmp_path / "q0_pipeline_trace.csv").write_text(
        'StartTime_us,EndTime_us,PipelinePool\n0,2000000,"(11,12)"\n2000000,2050000,"(11,13)"\n'
    )
    (tmp_path / "map.json").write_text(
        json.dumps({"0": {"query": "what?", "trace_file": "q0_pipeline_trace.csv"}})
    )
    (request,) = import_ann_traces(tmp_path / "map.json", [tmp_path / "corpus.part.0.json"])
    assert [e.t for e in request.events] == pytest.approx([2.0, 2.05])
    assert request.events[1].docs == ("doc eleven", "doc 13")


def test_synthetic_traces_match_published_statistics():
    stats = synth.published_stats()["workloads"]
    for workload in ("crawler", "anns"):
        achieved = synth.achieved_stats(synth.synthesize(workload, 800, seed=1))
        target = stats[workload]
        assert achieved["tokens_per_query"]["p50"] == pytest.approx(
            target["tokens_per_query"]["p50"], rel=0.15
        )
        assert achieved["tokens_per_query"]["mean"] == pytest.approx(
            target["tokens_per_query"]["mean"], rel=0.15
        )
        assert achieved["chunks_per_query"]["mean"] == pytest.approx(
            target["chunks_per_query"]["mean"], rel=0.1
        )
        gap = target["inter_chunk_gap_ms"]
        assert achieved["inter_chunk_gap_ms"]["median"] == pytest.approx(gap["median"], rel=0.15)
        assert achieved["collection_s"]["p50"] == pytest.approx(target["collection_s"]["p50"], rel=0.2)


def test_synthesis_is_seeded_and_scaled():
    a = synth.synthesize("crawler", 20, seed=3)
    assert a == synth.synthesize("crawler", 20, seed=3) != synth.synthesize("crawler", 20, seed=4)
    half = synth.synthesize("crawler", 20, seed=3, scale=0.5)
    ratio = sum(map(synth.request_tokens, half)) / sum(map(synth.request_tokens, a))
    assert ratio == pytest.approx(0.5, rel=0.05)


def test_percentiles_and_summary():
    values = list(range(1, 101))
    assert metrics.percentile(values, 0.5) == pytest.approx(50.5)
    assert metrics.percentile(values, 0.99) == pytest.approx(99.01)
    s = metrics.summary([1.0, 2.0, 3.0])
    assert (s["p50"], s["mean"]) == (2.0, 2.0)
    mean, half = metrics.ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.30 * 1.0 / 3**0.5, rel=1e-3)


def test_repeats_are_summarized_with_confidence_intervals():
    from stream2llm.workloads.metrics import summarize_repeats

    def run(policy, p50, completion):
        pcts = {"p50": p50, "p95": 2 * p50, "p99": 3 * p50, "p999": 4 * p50, "mean": p50}
        return {
            "policy": policy,
            "qps": 4.0,
            "ttft_final_s": pcts,
            "ttft_query_s": pcts,
            "completion_s": completion,
        }

    runs = [
        run("fcfs", 1.0, 10.0),
        run("fcfs", 2.0, 12.0),
        run("fcfs", 3.0, 14.0),
        run("stream2llm", 0.5, 10.0),
    ]
    by_policy = {e["policy"]: e for e in summarize_repeats(runs)}
    fcfs = by_policy["fcfs"]
    assert fcfs["repeats"] == 3
    assert fcfs["ttft_final_s"]["p50"]["mean"] == pytest.approx(2.0)
    # t(0.975, 2 dof) = 4.30, stdev 1, n 3
    assert fcfs["ttft_final_s"]["p50"]["ci95"] == pytest.approx(4.30 / 3**0.5, rel=1e-3)
    assert fcfs["ttft_final_s"]["p99"]["mean"] == pytest.approx(6.0)
    assert fcfs["completion_s"]["mean"] == pytest.approx(12.0)
    single = by_policy["stream2llm"]["ttft_final_s"]["p50"]
    assert single["mean"] == 0.5 and single["ci95"] != single["ci95"]  # NaN: one repeat, no interval


def test_stable_layout_keeps_surviving_documents_in_place_for_every_update():
    request = TraceRequest(
        "r",
        "anns",
        "q",
        (
            TraceEvent(0.1, "update", docs=("a", "b", "c")),
            TraceEvent(0.2, "update", docs=("d", "a", "b")),  # d outranks the survivors
            TraceEvent(0.3, "append", text="tail"),
            TraceEvent(0.4, "update", docs=("b", "e", "d")),
        ),
    )
    (laid_out,) = with_stable_layout([request])
    assert [e.docs for e in laid_out.events] == [("a", "b", "c"), ("a", "b", "d"), None, ("b", "d", "e")]
    assert [e.t for e in laid_out.events] == [0.1, 0.2, 0.3, 0.4] and laid_out.id == "r"
    assert request.events[1].docs == ("d", "a", "b")  # the input is not changed


def test_each_repeat_rotates_the_policy_order():
    from stream2llm.workloads.replay import rotated

    policies = ("nonstream", "nonstream-ranked", "vllm", "stream2llm")
    orders = [rotated(policies, r) for r in range(5)]
    assert orders[0] == list(policies)
    assert orders[1] == ["nonstream-ranked", "vllm", "stream2llm", "nonstream"]
    assert orders[3] == ["stream2llm", "nonstream", "nonstream-ranked", "vllm"]
    assert orders[4] == orders[0]  # n repeats: each policy once in every position
    assert {tuple(sorted(o)) for o in orders} == {tuple(sorted(policies))}
    assert [o.index("stream2llm") for o in orders[:4]] == [3, 2, 1, 0]
    assert rotated([], 3) == [] and rotated(["vllm"], 7) == ["vllm"]


def test_nonstream_ranked_is_the_whole_prompt_under_our_ranking():
    from stream2llm.workloads.bench_policies import BENCH_POLICIES, BenchPolicy, bench_policy

    assert bench_policy("nonstream-ranked") == BenchPolicy("nonstream", "stream2llm")
    assert bench_policy("nonstream").scheduler == "vllm"
    assert {"nonstream", "nonstream-ranked", "vllm", "fcfs", "lcas", "mcps", "stream2llm"} == set(
        BENCH_POLICIES
    )


def test_a_run_reports_ttft_on_three_clocks_and_its_place_in_the_repeat():
    records = [
        metrics.RequestRecord("a", 0.0, ttft_final_s=0.1, ttft_due_s=0.12, ttft_query_s=1.0),
        metrics.RequestRecord("b", 0.5, ttft_final_s=0.3, ttft_due_s=0.31, ttft_query_s=2.0),
        metrics.RequestRecord("c", 0.7, error="stalled"),
    ]
    run = metrics.RunResult("nonstream-ranked", 4.0, 1, records, position=2).to_json()
    assert (run["policy"], run["repeat"], run["position"], run["errors"]) == ("nonstream-ranked", 1, 2, 1)
    assert run["ttft_final_s"]["p50"] == pytest.approx(0.2)
    assert run["ttft_due_s"]["p50"] == pytest.approx(0.215) and run["ttft_due_s"]["mean"] == pytest.approx(
        0.215
    )
    assert run["ttft_query_s"]["p99"] == pytest.approx(1.99)
    assert run["samples"]["ttft_due_s"] == [0.12, 0.31]


def _bench_run(policy: str, p50: float, repeat: int = 0, due: bool = True) -> dict:
    pcts = {"p50": p50, "p95": 2 * p50, "p99": 3 * p50, "p999": 4 * p50, "mean": p50}
    run = {"policy": policy, "qps": 4.0, "repeat": repeat, "completion_s": 10.0, "errors": 0}
    run |= {"ttft_final_s": pcts, "ttft_query_s": pcts}
    if due:
        run["ttft_due_s"] = {k: v + 0.01 for k, v in pcts.items()}
    return run


def _column(table, header: str) -> list[str]:
    (column,) = [c for c in table.columns if c.header == header]
    return list(column.cells)


def test_summaries_carry_ttft_from_the_due_time_where_every_repeat_has_it():
    from stream2llm.workloads.metrics import summarize_repeats

    runs = [_bench_run("fcfs", 1.0), _bench_run("fcfs", 3.0, 1), _bench_run("vllm", 1.0, due=False)]
    by_policy = {e["policy"]: e for e in summarize_repeats(runs)}
    assert by_policy["fcfs"]["ttft_due_s"]["p50"]["mean"] == pytest.approx(2.01)
    assert "ttft_due_s" not in by_policy["vllm"]  # a result from before the due clock
    assert by_policy["vllm"]["ttft_final_s"]["p50"]["mean"] == 1.0


def test_tables_show_the_gain_over_both_one_shot_baselines():
    from stream2llm.cli.bench_tables import ratio_table, repeats_table
    from stream2llm.workloads.metrics import summarize_repeats

    runs = [_bench_run("nonstream", 1.0), _bench_run("nonstream-ranked", 0.5), _bench_run("stream2llm", 0.1)]
    runs += [_bench_run("vllm", 0.25), _bench_run("nonstream", 3.0, 1), _bench_run("stream2llm", 0.3, 1)]
    table = ratio_table({"runs": runs})  # repeat 0
    assert _column(table, "policy") == ["nonstream", "nonstream-ranked", "stream2llm", "vllm"]
    assert _column(table, "p50 vs nonstream") == ["1.00x", "2.00x", "10.00x", "4.00x"]
    assert _column(table, "p50 vs nonstream-ranked") == ["0.50x", "1.00x", "5.00x", "2.00x"]
    assert _column(table, "p99 vs nonstream-ranked")[2] == "5.00x"
    assert _column(table, "due p50") == ["1.010", "0.510", "0.110", "0.260"]
    summary = summarize_repeats(runs)
    means = repeats_table(summary)  # nonstream 2.0, stream2llm 0.2, nonstream-ranked 0.5 (one repeat)
    assert _column(means, "p50 vs nonstream") == ["1.00x", "4.00x", "10.00x", "8.00x"]
    assert _column(means, "p50 vs nonstream-ranked") == ["0.25x", "1.00x", "2.50x", "2.00x"]
    assert _column(repeats_table(summary, "ttft_due_s"), "p50 vs nonstream")[2] == f"{2.01 / 0.21:.2f}x"
    # without nonstream-ranked only the published baseline's columns
    plain = ratio_table({"runs": [r for r in runs if r["policy"] != "nonstream-ranked"]})
    assert not any("ranked" in str(c.header) for c in plain.columns)
    assert "due p50" not in [
        c.header for c in ratio_table({"runs": [_bench_run("vllm", 1, due=False)]}).columns
    ]
