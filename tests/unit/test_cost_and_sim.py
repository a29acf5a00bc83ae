"""Cost profiles and the discrete-event simulator (pure computation)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stream2llm.core.policies import OFFLOAD, RECOMPUTE, Costs, RequestView, make_policy
from stream2llm.workloads.arrivals import poisson_arrivals
from stream2llm.workloads.simulate.cost_model import (
    CostProfile,
    fit_frontend,
    fit_prefill,
    fit_steps,
    packaged_profiles,
)
from stream2llm.workloads.simulate.simulator import TEMPLATE_TOKENS, Simulator
from stream2llm.workloads.synth import filler_doc, synthesize
from stream2llm.workloads.trace import TraceEvent, TraceRequest


def test_fit_recovers_a_quadratic():
    a, b, c = 0.005, 2e-5, 3e-9
    sizes = [256, 1024, 4096, 8192, 16384]
    got = fit_prefill(sizes, [a + b * n + c * n * n for n in sizes])
    assert got == pytest.approx((a, b, c), rel=1e-3)


def test_fit_with_chunked_prefill_charges_the_step_cost_per_chunk():
    a, b, c = 0.01, 1e-6, 7e-9
    sizes = [256, 512, 1024, 2048, 4096, 8192, 16384]
    chunked = [a * -(-n // 512) + b * n + c * n * n for n in sizes]
    assert fit_prefill(sizes, chunked, step_tokens=512) == pytest.approx((a, b, c), rel=1e-3)
    _, b1, _ = fit_prefill(sizes, chunked)  # a one-step fit folds the step costs into b
    assert b1 > 10 * b


def _logged_steps(
    step_s: float,
    b: float,
    c: float,
    d: float,
    per_chunk: float = 0.0,
    per_held: float = 0.0,
    noise: list[float] | None = None,
) -> list:
    """Steps as ``StepLog`` writes them, timed by a known cost model (times ``noise``, per step).
    Most follow one another at once, the outputs handled in between; two are followed by idling."""
    steps, t = [], 0.0
    mixes = [[(512, 0)], [(512, 4096)], [(100, 9000), (412, 0)], [(64, 200)], [(300, 20000)]] * 2
    for i, chunks in enumerate(mixes):
        decodes, held = i % 3, 3 + (7 * i) % 11
        cycle = step_s + sum(b * n + c * (n * n + 2 * n * ctx) for n, ctx in chunks) + d * decodes
        cycle += per_chunk * len(chunks) + per_held * held
        cycle *= noise[i] if noise else 1.0
        straight_on = i not in (2, len(mixes) - 1)
        end = t + cycle - (0.0005 if straight_on else 0.0)  # then the engine handles outputs
        prefill = [[n, ctx, False, f"r{i}"] for n, ctx in chunks]
        steps.append(
            {"t0": t, "t1": t + 0.001, "t2": end, "prefill": prefill, "decodes": decodes, "held": held}
        )
        t = t + cycle if straight_on else end + 1.0
    steps.append({"t0": t, "t1": t, "t2": t + 0.5, "prefill": [], "decodes": 0})  # an empty step: ignored
    return steps


def _write_step_log(path: Path, steps: list) -> Path:
    """``steps`` as ``StepLog`` writes them, one JSON object per line."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s) + "\n" for s in steps))
    return path


def test_read_step_log_reads_the_log_or_its_gzipped_copy(tmp_path):
    import gzip

    from stream2llm.core.step_log import read_step_log

    steps = _logged_steps(0.004, 2e-6, 4e-9, 0.0)
    log = _write_step_log(tmp_path / "steps.jsonl", steps)
    packed = tmp_path / "steps.jsonl.gz"
    packed.write_bytes(gzip.compress(log.read_bytes()))
    assert read_step_log(log) == read_step_log(packed) == steps


def test_fit_steps_recovers_the_step_cost_under_load():
    truth = (0.004, 2e-6, 4e-9, 5e-4, 6e-4, 3e-5)
    assert fit_steps(_logged_steps(*truth)) == pytest.approx(truth, rel=1e-3)
    with pytest.raises(ValueError, match="too few engine steps"):
        fit_steps(_logged_steps(*truth)[:5])


def test_fit_steps_reads_logs_from_before_the_held_count_as_no_such_cost():
    steps = _logged_steps(0.004, 2e-6, 4e-9, 5e-4)
    for step in steps:
        step.pop("held", None)
    costs = fit_steps(steps)
    assert costs.held_request_s == 0.0 and costs.step_s == pytest.approx(0.004, rel=1e-3)


def test_fit_steps_keeps_the_logged_busy_time_when_steps_are_noisy():
    """Queueing depends on total work: the fitted costs add up to the logged cycles (a fit on
    relative error comes out low when the noise is skewed)."""
    noise = [1.1, 1.3, 1.0, 1.0, 1.2, 0.9, 1.0, 1.5, 1.0, 1.0]
    steps = _logged_steps(0.004, 2e-6, 4e-9, 5e-4, 6e-4, 3e-5, noise=noise)
    costs = fit_steps(steps)
    busy = model = 0.0
    for step, following in zip(steps, steps[1:]):
        if step["prefill"]:
            busy += (following["t0"] if following["t0"] - step["t2"] < 0.002 else step["t2"]) - step["t0"]
            model += costs.step_s + costs.decode_s * step["decodes"]
            model += costs.chunk_request_s * len(step["prefill"]) + costs.held_request_s * step["held"]
            for n, ctx, *_ in step["prefill"]:
                model += costs.token_s * n + costs.attention_s * (n * n + 2 * n * ctx)
    assert model == pytest.approx(busy, rel=1e-9)


def test_calibrate_from_steps_writes_a_profile_with_the_fitted_costs(tmp_path):

    from typer.testing import CliRunner

    from stream2llm.cli import app

    log = _write_step_log(tmp_path / "run" / "steps.jsonl", _logged_steps(0.004, 2e-6, 4e-9, 0.0, 6e-4, 3e-5))
    out = tmp_path / "profile.json"
    cmd = ["calibrate", "--from-steps", str(log), "--max-batched-tokens", "512", "--out", str(out)]
    res = CliRunner().invoke(app, cmd)
    assert res.exit_code == 0, res.output
    profile = CostProfile.load(out)
    assert profile.prefill == pytest.approx((0.004, 2e-6, 4e-9), rel=1e-3)
    assert profile.step_s == pytest.approx(0.004, rel=1e-3) and profile.max_num_batched_tokens == 512
    assert (profile.chunk_request_s, profile.held_request_s) == pytest.approx((6e-4, 3e-5), rel=1e-3)
    assert profile.kv_bytes_per_token == CostProfile.load("cpu-tiny").kv_bytes_per_token
    assert profile.name == "steps-run"


def test_calibrate_with_the_bench_results_fits_the_front_end_and_names_the_bench_machine(tmp_path):
    import json

    from stream2llm.workloads.simulate.calibrate import profile_from_steps

    steps = _logged_steps(0.004, 2e-6, 4e-9, 0.0)
    log = _write_step_log(tmp_path / "run" / "steps.jsonl", steps)
    # r3's final is handed over while the engine idles before its step; r4's right as its step starts
    timeline = [
        ["r3", steps[3]["t0"] - 0.010, steps[3]["t0"] - 0.002, steps[3]["t2"] + 0.001],
        ["r4", steps[4]["t0"] - 0.007, steps[4]["t0"] - 0.0002, steps[4]["t2"] + 0.001],
    ]
    results = {
        "machine": "x86_64 Some CPU, 2 cpus",
        "runs": [{"samples": {"timeline": timeline, "prompt_tokens": [1000, 400]}}],
    }
    bench = tmp_path / "run" / "results.json"
    bench.write_text(json.dumps(results))
    profile = profile_from_steps(log, CostProfile.load("cpu-tiny"), 512, bench)
    assert profile.hardware == "x86_64 Some CPU, 2 cpus (bench run)"
    assert profile.frontend_out_s == pytest.approx(0.001)
    assert profile.tokenize_token_s == pytest.approx((0.008 - 0.0068) / 600)  # 6.8 ms + 2 us a token


def test_packaged_profiles_load_and_round_trip(tmp_path):
    assert {"cpu-tiny", "h200-llama3.1-8b", "h100-llama3.1-8b"} <= set(packaged_profiles())
    cpu = CostProfile.load("cpu-tiny")
    assert cpu.offload and "host KV tier" in cpu.offload_note
    # on this CPU a block's round trip through the tier is far cheaper than recomputing it
    assert cpu.offload_roundtrip_s(4096) < cpu.prefill_s(4096) / 10
    assert cpu.prefill_s(4096) == pytest.approx(0.15, rel=0.3)  # measured 0.153 s
    h200 = CostProfile.load("h200-llama3.1-8b")
    assert h200.offload_roundtrip_s(1000) > 0
    path = h200.save(tmp_path / "p.json")
    assert CostProfile.load(path) == h200
    with pytest.raises(ValueError, match="no cost profile 'nope'"):
        CostProfile.load("nope")


def toy_profile(**kw) -> CostProfile:
    base = CostProfile(
        "toy",
        "toy",
        "toy",
        (0.0, 1e-3, 0.0),
        step_s=0.01,
        decode_token_s=0.0,
        kv_bytes_per_token=1,
        kv_capacity_tokens=1_000_000,
        max_num_batched_tokens=100_000,
    )
    return dataclasses.replace(base, **kw)


def test_single_request_ttft_is_the_cost_of_what_remains():
    request = TraceRequest(
        "r",
        "crawler",
        "q",
        (TraceEvent(1.0, "append", n_tokens=400), TraceEvent(2.0, "append", n_tokens=100)),
    )
    sim = Simulator(toy_profile())
    nonstream = sim.run([request], "nonstream", qps=1.0)
    stream = sim.run([request], "stream2llm", qps=1.0)
    assert nonstream.ttft_final == [pytest.approx(0.01 + (TEMPLATE_TOKENS + 500) * 1e-3)]
    assert stream.ttft_final == [pytest.approx(0.01 + 100 * 1e-3)]  # only the last chunk is left


def test_a_step_pays_per_chunk_and_per_request_the_engine_holds():
    """A streaming engine holds every open session, a one-shot one only what it was sent: two
    requests whose retrieval overlaps, the second one's final step priced with both held."""
    first = TraceRequest("a", "crawler", "q", (TraceEvent(0.5, "append", n_tokens=400),))
    second = TraceRequest("b", "crawler", "q", (TraceEvent(0.2, "append", n_tokens=100),))
    sim = Simulator(toy_profile(chunk_request_s=0.002, held_request_s=0.005))
    arrivals = poisson_arrivals(2, 10.0, 42)
    assert arrivals[1] + 0.2 < arrivals[0] + 0.5  # b's final comes while a waits for its context
    stream = sim.run([first, second], "fcfs", qps=10.0)
    assert stream.ttft_by_request["b"] == pytest.approx(0.01 + 0.002 + 2 * 0.005 + 100 * 1e-3)
    assert stream.ttft_by_request["a"] == pytest.approx(0.01 + 0.002 + 0.005 + 400 * 1e-3)
    nonstream = sim.run([first, second], "nonstream", qps=10.0)
    one_shot = 0.01 + 0.002 + 0.005 + (TEMPLATE_TOKENS + 100) * 1e-3
    assert nonstream.ttft_by_request["b"] == pytest.approx(one_shot)


def test_a_slower_machine_stretches_every_step_and_not_the_front_end():
    request = TraceRequest("r", "crawler", "q", (TraceEvent(1.0, "append", n_tokens=400),))
    profile = toy_profile(chunk_request_s=0.002, held_request_s=0.005, frontend_out_s=0.003)
    engine_s = 0.01 + 0.002 + 0.005 + (TEMPLATE_TOKENS + 400) * 1e-3
    steady = Simulator(profile).run([request], "nonstream", qps=1.0)
    assert steady.ttft_final == [pytest.approx(engine_s + 0.003)]
    drifting = Simulator(profile, speed=lambda t: 1.5 if t >= 1.0 else 1.0)
    assert drifting.run([request], "nonstream", qps=1.0).ttft_final == [pytest.approx(1.5 * engine_s + 0.003)]


def test_the_front_end_delays_each_chunk_and_the_final_re_tokenizes_the_whole_prompt():
    """A chunk reaches the engine after its tokens are tokenized (the final one: the whole prompt,
    so that it equals one-shot tokenization) plus a fixed trip in; the token takes a trip out."""
    request = TraceRequest(
        "r",
        "crawler",
        "q",
        (TraceEvent(1.0, "append", n_tokens=400), TraceEvent(2.0, "append", n_tokens=100)),
    )
    profile = toy_profile(frontend_in_s=0.002, tokenize_token_s=1e-5, frontend_out_s=0.001)
    sim = Simulator(profile)
    prompt = TEMPLATE_TOKENS + 500
    front = 0.002 + prompt * 1e-5 + 0.001
    nonstream = sim.run([request], "nonstream", qps=1.0).ttft_final
    assert nonstream == [pytest.approx(front + 0.01 + prompt * 1e-3)]
    assert sim.run([request], "stream2llm", qps=1.0).ttft_final == [pytest.approx(front + 0.01 + 100 * 1e-3)]
    # a final event right after a long chunk: its tokenizing overlaps that chunk's prefill, and it
    # waits in the engine core behind that chunk
    request = TraceRequest(
        "r",
        "crawler",
        "q",
        (TraceEvent(1.0, "append", n_tokens=400), TraceEvent(1.01, "append", n_tokens=100)),
    )
    first_done = 1.0 + 0.002 + 400 * 1e-5 + 0.01 + 400 * 1e-3  # the template went at open
    expected = first_done + 0.01 + 100 * 1e-3 + 0.001 - 1.01
    assert sim.run([request], "stream2llm", qps=1e6).ttft_final == [pytest.approx(expected)]
    # an append that comes while a chunk is in work extends it at the next step; the final, which
    # comes during that step, the step after
    events = (
        TraceEvent(1.0, "append", n_tokens=400),
        TraceEvent(1.01, "append", n_tokens=50),
        TraceEvent(1.43, "append", n_tokens=100),
    )
    request = TraceRequest("r", "crawler", "q", events)
    expected = first_done + (0.01 + 50 * 1e-3) + (0.01 + 100 * 1e-3) + 0.001 - 1.43
    assert sim.run([request], "stream2llm", qps=1e6).ttft_final == [pytest.approx(expected)]
    # the engine before chunks took over in place held it in the front end until the front end
    # had seen the chunk in work finish (the token's trip out, then the trip in)
    held_done = first_done + 0.001 + 0.002 + 0.01 + 50 * 1e-3
    expected = held_done + 0.01 + 100 * 1e-3 + 0.001 - 1.43
    held = Simulator(profile, hold_in_flight=True)
    assert held.run([request], "stream2llm", qps=1e6).ttft_final == [pytest.approx(expected)]


def test_fit_frontend_separates_tokenizing_from_the_trips_in_and_out():
    """Timelines on the step log's clock: the hand-off comes 1 ms + 2 us a token after the final
    event; where the engine idles, the request's step starts 1.5 ms after its hand-off; its token
    is seen 0.8 ms after its last step. A request that queued behind a running step is not a trip."""
    steps, timelines, tokens = [], [], []
    for i, n in enumerate([1000, 3000, 6000, 12000]):
        final_at = 10.0 * i
        handed = final_at + 0.001 + 2e-6 * n
        start = handed + 0.0015
        steps.append({"t0": start, "t1": start, "t2": start + 0.05, "prefill": [[512, 0, True, f"r{i}"]]})
        timelines.append((f"r{i}", final_at, handed, start + 0.05 + 0.0008))
        tokens.append(n)
    # r4 is handed over while r3's step runs: it waits for it
    steps.append({"t0": 30.08, "t1": 30.08, "t2": 30.12, "prefill": [[512, 0, True, "r4"]]})
    timelines.append(("r4", 30.027, 30.03, 30.1208))
    tokens.append(1000)
    steps.sort(key=lambda s: s["t0"])
    trip_in, per_token, trip_out = fit_frontend(timelines, tokens, steps)
    assert per_token == pytest.approx(2e-6, rel=0.05)
    assert trip_in == pytest.approx(0.001 + 0.0015, rel=0.05)
    assert trip_out == pytest.approx(0.0008, rel=1e-6)


def test_a_final_held_behind_the_chunk_in_work_counts_in_the_ranking():
    """The engine before chunks took over in place kept one chunk in it per session. Each session
    opens with its 40-token template; C's final goes first (complete); B's 2,000-token final then
    queues behind what is left of B's first chunk (380 tokens), and the broker ranks B by both, so
    A (600 tokens) goes first, as it would if B's chunks were applied at once. Ranked by the chunk
    in work alone, B (380) would go first and A's TTFT would be 1.14 s."""
    events = (TraceEvent(0.0, "append", n_tokens=400), TraceEvent(0.15, "append", n_tokens=2000))
    b = TraceRequest("b", "crawler", "q", events)
    c = TraceRequest("c", "crawler", "q", (TraceEvent(0.05, "append", n_tokens=200),))
    a = TraceRequest("a", "crawler", "q", (TraceEvent(0.2, "append", n_tokens=600),))
    profile = toy_profile(max_num_batched_tokens=100, step_s=0.0)  # 0.1 s a step
    ttft = Simulator(profile, hold_in_flight=True).run([b, c, a], "stream2llm", qps=1e6).ttft_by_request
    # B's template 0-0.04; the three sessions' first tokens 0.04-0.14; C 0.14-0.34; A 0.34-0.94
    assert ttft["c"] == pytest.approx(0.29, abs=1e-3)
    assert ttft["a"] == pytest.approx(0.74, abs=1e-3)
    assert ttft["b"] > 2.0


def test_stock_vllm_a_parked_session_keeps_its_place_in_the_waiting_queue():
    """In vLLM a session parked for its next chunk stays in the waiting queue where it was parked
    (the chunk updates it in place): a, parked at 0.14, goes before b, parked at 0.24, although
    b's final chunk came first."""

    def session(name: str, first: float, final: float) -> TraceRequest:
        events = (TraceEvent(first, "append", n_tokens=60), TraceEvent(final, "append", n_tokens=60))
        return TraceRequest(name, "crawler", "q", events)

    hog = TraceRequest("hog", "crawler", "q", (TraceEvent(0.2, "append", n_tokens=500),))
    profile = toy_profile(max_num_batched_tokens=100, step_s=0.0)  # 0.1 s a full step
    ttft = Simulator(profile).run([session("a", 0.0, 0.5), session("b", 0.05, 0.3), hog], "vllm", qps=1e6)
    # the hog's 500 tokens run 0.24-0.74; then a's final (60) and 40 of b's: 0.74-0.84, b's rest
    # to 0.86 (in b's place first: b 0.54, a 0.36)
    assert ttft.ttft_by_request["a"] == pytest.approx(0.34, abs=1e-3)
    assert ttft.ttft_by_request["b"] == pytest.approx(0.56, abs=1e-3)


def test_running_complete_streams_are_not_preempted_for_a_shorter_one():
    """As in the engine: a complete stream mid-prefill keeps the step (the broker does not
    preempt complete streams for one another), so a shorter final arriving later waits for it."""
    long = TraceRequest("long", "crawler", "q", (TraceEvent(0.0, "append", n_tokens=960),))
    short = TraceRequest("short", "crawler", "q", (TraceEvent(0.15, "append", n_tokens=60),))
    profile = toy_profile(max_num_batched_tokens=100, step_s=0.0)
    ttft = Simulator(profile).run([long, short], "stream2llm", qps=1e6).ttft_final
    # long: its template and 960 tokens (taken in at once) to 1.0; short (its template, then 60)
    # runs 1.0-1.1
    assert ttft == pytest.approx([1.0, 0.95], abs=1e-3)


def test_update_recomputes_only_past_the_changed_document():
    docs1 = (filler_doc("a", 100), filler_doc("b", 100), filler_doc("c", 100))
    docs2 = (filler_doc("a", 100), filler_doc("x", 100), filler_doc("c", 100))
    request = TraceRequest(
        "r", "anns", "q", (TraceEvent(1.0, "update", docs=docs1), TraceEvent(2.0, "update", docs=docs2))
    )
    result = Simulator(toy_profile()).run([request], "stream2llm", qps=1.0)
    # docs b->x and c are recomputed, and the answer cue after them
    assert result.ttft_final == [pytest.approx(0.01 + (200 + TEMPLATE_TOKENS // 2) * 1e-3)]


def test_an_update_ends_the_update_in_work():
    """An update reaches the engine core at once and ends the chunk in work after the tokens
    already scheduled (and the one token it samples): the superseded update is not prefilled to its
    end (that would take until ~1.8 s). Stock vLLM aborts the request and resubmits the whole
    prompt, which stops it too."""
    docs1 = tuple(filler_doc(f"a{i}", 200) for i in range(5))
    docs2 = (filler_doc("b0", 200), *docs1[1:])  # the first document changed: ~nothing is kept
    request = TraceRequest(
        "r", "anns", "q", (TraceEvent(0.0, "update", docs=docs1), TraceEvent(0.5, "update", docs=docs2))
    )
    profile = toy_profile(max_num_batched_tokens=100)  # 0.11 s a full step
    ours = Simulator(profile).run([request], "stream2llm", qps=1e6).ttft_final[0]
    stock = Simulator(profile).run([request], "vllm", qps=1e6).ttft_final[0]
    # ours: the second update's 1,020 tokens past the kept 20 take 11 steps (0.11 s each, the
    # last 0.03 s) from the end of the step running at 0.5 and the one-token step after it
    assert 1.1 < ours < 1.3
    assert stock == pytest.approx(ours, abs=0.02)


def test_a_superseded_chunk_ends_at_once_and_the_held_engine_paid_a_step_for_each():
    """A final queued behind a queued update costs nothing more than one alone: each takes over
    the chunk in work at the next step. The engine before that ended a superseded chunk after the
    one token it had to sample, a step of its own. Stock vLLM aborts and resubmits, whatever was
    queued."""
    docs0 = tuple(filler_doc(f"a{i}", 200) for i in range(5))
    docs1 = (filler_doc("b0", 200), *docs0[1:])
    docs2 = (filler_doc("c0", 200), *docs0[1:])
    first, final = TraceEvent(0.0, "update", docs=docs0), TraceEvent(0.3, "update", docs=docs2)
    queued = TraceRequest("r", "anns", "q", (first, TraceEvent(0.3, "update", docs=docs1), final))
    alone = TraceRequest("r", "anns", "q", (first, final))
    profile = toy_profile(max_num_batched_tokens=100)
    ours = [Simulator(profile).run([r], "stream2llm", qps=1e6).ttft_final[0] for r in (queued, alone)]
    assert ours[0] == pytest.approx(ours[1])
    held = Simulator(profile, hold_in_flight=True)
    before = [held.run([r], "stream2llm", qps=1e6).ttft_final[0] for r in (queued, alone)]
    one_token_step = 0.01 + 1e-3
    assert before[0] - before[1] == pytest.approx(one_token_step)
    assert before[1] > ours[1]  # the one-token step behind the chunk in work alone, too
    stock = [Simulator(profile).run([r], "vllm", qps=1e6).ttft_final[0] for r in (queued, alone)]
    assert stock[0] == pytest.approx(stock[1])


def test_memory_pressure_stock_stalls_where_eviction_does_not():
    requests = synthesize("crawler", 60, seed=5, scale=0.2)
    small = toy_profile(kv_capacity_tokens=20_000, prefill=(0.0, 2e-5, 0.0))
    sim = Simulator(small)
    stock = sim.run(requests, "vllm", qps=4.0, delay_multiplier=10)
    ours = sim.run(requests, "stream2llm", qps=4.0, delay_multiplier=10)
    assert ours.evictions > 0 and stock.evictions == 0
    assert len(ours.ttft_final) == 60
    p99 = lambda xs: sorted(xs)[int(0.99 * (len(xs) - 1))]  # noqa: E731
    assert len(stock.ttft_final) < 60 or p99(stock.ttft_final) > 3 * p99(ours.ttft_final)


def _pressure_run(profile: CostProfile, preemption: str):
    requests = synthesize("crawler", 60, seed=5, scale=0.2)
    return Simulator(profile, preemption=preemption).run(requests, "stream2llm", qps=4.0, delay_multiplier=10)


def test_a_cheap_tier_loads_back_what_recompute_would_compute_again():
    tier = toy_profile(
        kv_capacity_tokens=20_000, prefill=(0.0, 2e-5, 1e-9), kv_save=(0.0, 1e-7), kv_load=(0.0, 1e-7)
    )
    recompute, cost = _pressure_run(tier, "recompute"), _pressure_run(tier, "cost")
    assert recompute.tokens_recomputed > 0 and recompute.offloads == 0 and recompute.tokens_loaded == 0
    assert cost.offloads == cost.evictions > 0 and cost.tokens_loaded > 0
    assert cost.tokens_recomputed < recompute.tokens_recomputed / 2
    p99 = lambda xs: sorted(xs)[int(0.99 * (len(xs) - 1))]  # noqa: E731
    assert p99(cost.ttft_final) <= p99(recompute.ttft_final)


def test_a_slow_tier_makes_the_decision_recompute_short_contexts_and_offload_long_ones():
    """A tier with a large fixed cost per transfer (a slow link): recomputing a short context is
    cheaper than a round trip, a long one (attention grows with it) is not."""
    slow = toy_profile(
        kv_capacity_tokens=20_000, prefill=(0.0, 2e-5, 1e-9), kv_save=(0.02, 1e-7), kv_load=(0.02, 1e-7)
    )
    policy = make_policy("stream2llm", Costs.from_profile(slow))
    short, long = (
        RequestView("x", 0, 0, False, True, tokens, 0, tokens // 16, 1.0) for tokens in (500, 5_000)
    )
    assert (policy.mode(short), policy.mode(long)) == (RECOMPUTE, OFFLOAD)
    run = _pressure_run(slow, "cost")
    assert 0 < run.offloads < run.evictions  # the simulator takes the same decision per victim


def test_our_ranking_takes_one_shot_prompts_as_complete_streams_shortest_first():
    """A one-shot request is complete from its first chunk: it ranks with the finals, by what it
    has left to prefill (the whole prompt), ties by its hand-off; never behind a partial stream."""
    from stream2llm.core.policies import RequestView, make_policy

    def one_shot(rid: str, handed: float, tokens: int) -> RequestView:
        return RequestView(rid, handed, handed, True, False, 0, tokens, 0)

    partial = RequestView("partial", 0.0, 0.0, False, False, 0, 10, 0)
    views = [one_shot("long", 1.0, 9000), partial, one_shot("short", 2.0, 300), one_shot("tie", 1.5, 300)]
    ranked = [v.request_id for v in make_policy("stream2llm").rank(views)]
    assert ranked == ["tie", "short", "long", "partial"]


def test_nonstream_ranked_serves_the_shortest_waiting_prompt_first():
    """Three one-shot prompts: while A's runs, B (long) and then C (short) come. vLLM's FIFO serves
    B next; our ranking serves C next (A, running, keeps the step: complete requests are not
    preempted for one another). Both prefill the same tokens, so the last answer comes at once."""
    a = TraceRequest("a", "crawler", "q", (TraceEvent(0.0, "append", n_tokens=1000),))
    b = TraceRequest("b", "crawler", "q", (TraceEvent(0.1, "append", n_tokens=1000),))
    c = TraceRequest("c", "crawler", "q", (TraceEvent(0.2, "append", n_tokens=100),))
    profile = toy_profile(max_num_batched_tokens=200, step_s=0.0)  # 0.2 s a full step
    sim = Simulator(profile)
    fifo = sim.run([a, b, c], "nonstream", qps=1e6)
    ranked = sim.run([a, b, c], "nonstream-ranked", qps=1e6)
    # A's 1,040 tokens take five full steps and 40 of the sixth (1.0-1.2), whose other 160 go to
    # B (FIFO: C waits for B's last 80, 2.0-2.2, and its own last 20) or to C's 140 and 20 of B
    assert fifo.ttft_by_request["a"] == ranked.ttft_by_request["a"] == pytest.approx(1.2, abs=1e-3)
    assert fifo.ttft_by_request["c"] == pytest.approx(2.22 - 0.2, abs=1e-3)
    assert ranked.ttft_by_request["c"] == pytest.approx(1.2 - 0.2, abs=1e-3)
    assert fifo.ttft_by_request["b"] == pytest.approx(2.2 - 0.1, abs=1e-3)
    assert ranked.ttft_by_request["b"] == pytest.approx(2.22 - 0.1, abs=1e-3)
    assert ranked.completion_s == pytest.approx(fifo.completion_s)
    # the model has no late replay: TTFT from the final event and from its due time agree
    report = ranked.to_json()
    assert report["ttft_due_s"] == report["ttft_final_s"] and report["policy"] == "nonstream-ranked"


def test_the_speculation_gate_holds_a_wasteful_sessions_partial_chunks_until_its_final(monkeypatch):
    """Each refinement replaces the first document, so each throws away what was prefilled: once
    one has (the second: the first replaced only the opening template), stream2llm holds the
    session's partial chunks (the third and fourth) and prefills the final's tokens once; without
    the gate it prefills every refinement. The final's wait is the same."""
    from stream2llm.core import policies

    tail = tuple(filler_doc(f"t{i}", 200) for i in range(4))
    events = tuple(TraceEvent(1.5 * i, "update", docs=(filler_doc(f"head{i}", 200), *tail)) for i in range(6))
    request = TraceRequest("r", "anns", "q", events)
    profile = toy_profile(max_num_batched_tokens=200)

    def run(gate):
        monkeypatch.setattr(policies.Stream2llmPolicy, "speculation_gate", gate)
        return Simulator(profile).run([request], "stream2llm", qps=1e6)

    gated, ungated = run(0.5), run(None)
    refinement = (ungated.tokens_prefilled - TEMPLATE_TOKENS) / 6
    assert gated.tokens_prefilled == pytest.approx(ungated.tokens_prefilled - 2 * refinement, rel=0.01)
    assert gated.ttft_final == pytest.approx(ungated.ttft_final)
