"""``stream2llm serve --disaggregate``: a real prefill instance (stream2llm) and a real decode
instance (vLLM's own OpenAI server) with KV moving through the connector, against a single
``stream2llm serve`` started beside it (float32: token-exact).

Greedy tokens through the deployment equal the single instance's for append, update and nonstream
sessions and the OpenAI endpoints; the decode instance computes at most one block of each prompt
(vLLM's usage counts: the rest was loaded); a streamed session moves only its final chunk's blocks
after the final chunk; corrupting the stored blocks changes the answer (the KV is really used);
SIGTERM, or the decode instance's death, stops every process.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.clients.otlp_receiver import OtlpReceiver
from tests.conftest import corpus_text
from tests.process.helpers import Command

pytestmark = pytest.mark.engine

READY_S = 300.0  # three cold engine starts on two busy cores
SERVE = ["--model", "tiny", "--port", "0", "--kv-cache-gb", "0.25", "--max-model-len", "2048"]
SAMPLING = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
URL = r"at (http://\S+) \(OpenAI"


def _start(*extra: str) -> Command:
    return Command("serve", *SERVE, *extra)


def _ready(command: Command) -> str:
    return command.wait_for_line(URL, READY_S).group(1)


class ThreadedReceiver:
    """The OTLP/HTTP receiver on a loop of its own (these tests are synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.receiver = asyncio.run_coroutine_threadsafe(OtlpReceiver().start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def pair():
    """The disaggregated deployment (traced: both instances export to a receiver here) and a
    single instance, started together."""
    traces = ThreadedReceiver()
    with pytest.MonkeyPatch.context() as env:  # the commands' environment: both instances export so
        env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
        url = traces.receiver.url
        disagg = _start("--dtype", "float32", "--disaggregate", "--otlp-traces-endpoint", url)
    single = _start("--dtype", "float32")
    try:
        urls = _ready(disagg), _ready(single)
        found = disagg.wait_for_line(r"decode instance: (http://\S+) .*KV store (\S+)", 10)
        decode, store = found.group(1), Path(found.group(2))
        yield SimpleNamespace(
            url=urls[0], single=urls[1], store=store, command=disagg, decode=decode, traces=traces.receiver
        )
    finally:
        traces.close()
        disagg.kill_all()
        single.kill_all()


def session(http: httpx.Client, base: str, question: str, events: list[tuple[str, dict]], **opts) -> dict:
    """Open a session, send its events (pausing between them, as retrieval would), return its result."""
    r = http.post(f"{base}/v1/sessions", json={"question": question, **SAMPLING, **opts})
    assert r.status_code == 201, r.text
    url = f"{base}/v1/sessions/{r.json()['id']}"
    for kind, body in events:
        time.sleep(0.4)  # each chunk is prefilled before the next comes
        r = http.post(f"{url}/{kind}", json=body)
        assert r.status_code == 200, r.text
    with http.stream("GET", f"{url}/stream") as r:
        assert r.status_code == 200
        events_in = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events_in[-1]["type"] == "result", events_in[-1]
    return events_in[-1]


def appends(seed: int, n: int = 3, chars: int = 1100) -> list[tuple[str, dict]]:
    text = corpus_text(n * chars, seed)
    events = [("append", {"text": text[i * chars : (i + 1) * chars]}) for i in range(n)]
    return [*events, ("append", {"text": " In short: rivers.", "final": True})]


def check_decode_computed_one_token(result: dict, replayed: bool = False) -> dict:
    """Every block of the prompt, the partial last one included, came from the prefill instance,
    which sampled the first token: the decode instance computed one token, the first token itself,
    which it got after the prompt (greedy and random sampling), or the prompt's last to replay that
    first token (seeded sampling)."""
    kv = result["kv_transfer"]
    prompt = result["prompt_tokens"]
    assert kv["decode_prompt_tokens"] == (prompt if replayed else prompt + 1), kv
    assert kv["decode_prefilled_tokens"] == 1, kv
    assert kv["decode_cached_tokens"] == kv["decode_prompt_tokens"] - 1, kv
    return kv


def decode_requests(http: httpx.Client, url: str) -> float:
    """Requests the decode instance answered (vLLM's own counter)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(http.get(f"{url}/metrics").text)
    return sum(
        s.value
        for f in families
        if f.name == "vllm:request_success"
        for s in f.samples
        if s.name.endswith("_total")
    )


def test_streamed_appends_equal_a_single_instance_and_move_only_the_final_chunks_blocks(pair):
    with httpx.Client(timeout=120) as http:
        result = session(http, pair.url, "Where do rivers go?", appends(1))
        reference = session(http, pair.single, "Where do rivers go?", appends(1))
    assert result["token_ids"] == reference["token_ids"] and len(result["token_ids"]) == 8
    assert result["prompt_tokens"] == reference["prompt_tokens"] > 3 * 128
    kv = check_decode_computed_one_token(result)
    final_chunk_tokens = result["chunks"][-1]["tokens"]
    assert len(result["chunks"]) >= 4  # the appends went as chunks of their own
    assert kv["blocks_saved_after_final"] <= math.ceil(final_chunk_tokens / kv["block_size"])
    assert kv["blocks_saved"] - kv["blocks_saved_after_final"] >= 3  # moved while retrieval went on


def test_the_decode_instances_part_joins_the_sessions_trace(pair):
    """The session's trace (the caller's trace id) has the decode call's span, and under it the
    span vLLM's own server writes for the request it answered."""
    trace_id, caller = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    headers = {"traceparent": f"00-{trace_id}-{caller}-01"}
    with httpx.Client(timeout=120, headers=headers) as http:
        session(http, pair.url, "What do rivers carry?", appends(11, n=2))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = {s.name: s for s in pair.traces.trace(trace_id)}
        if {"stream2llm.session", "decode (remote)", "llm_request"} <= set(names):
            break
        time.sleep(0.5)
    assert {"stream2llm.session", "decode (remote)", "llm_request"} <= set(names), sorted(names)
    root, call, vllm_span = names["stream2llm.session"], names["decode (remote)"], names["llm_request"]
    assert root.parent_span_id.hex() == caller
    assert call.parent_span_id == root.span_id and vllm_span.parent_span_id == call.span_id


def test_a_first_token_that_ends_the_answer_never_reaches_the_decode_instance(pair):
    with httpx.Client(timeout=120) as http:
        before = decode_requests(http, pair.decode)
        result = session(http, pair.url, "One word?", appends(5, n=2), max_tokens=1)
        reference = session(http, pair.single, "One word?", appends(5, n=2), max_tokens=1)
        after = decode_requests(http, pair.decode)
    assert result["token_ids"] == reference["token_ids"] and len(result["token_ids"]) == 1
    assert after == before and result["finish_reason"] == "length"


def test_seeded_sampling_equals_a_single_instances_one_shot_answer(pair):
    """Temperature 1 with a fixed seed: the prefill instance's first token and the decode
    instance's replayed continuation give what vLLM gives for that prompt and seed in one request
    (the single instance's nonstream session). A streamed session on one instance is no reference:
    its seeded tokens after the first differ from run to run (see the README)."""
    seeded = {"max_tokens": 32, "temperature": 1.0, "seed": 1234}
    with httpx.Client(timeout=120) as http:
        result = session(http, pair.url, "Tell me about rivers.", appends(6), **seeded)
        reference = session(
            http, pair.single, "Tell me about rivers.", appends(6), mode="nonstream", **seeded
        )
    assert len(reference["token_ids"]) == 32
    assert result["token_ids"] == reference["token_ids"]
    check_decode_computed_one_token(result, replayed=True)  # the seeded generator advanced as on one


def test_random_sampling_continues_after_the_prefill_instances_first_token(pair):
    with httpx.Client(timeout=120) as http:
        result = session(http, pair.url, "Tell me about deltas.", appends(8), max_tokens=12, temperature=1.0)
    assert len(result["token_ids"]) == 12
    check_decode_computed_one_token(result)  # the prompt's KV all loaded


def test_updates_equal_a_single_instance(pair):
    docs = [corpus_text(700, s) for s in (11, 12, 13)]
    events = [
        ("update", {"docs": docs[:2]}),
        ("update", {"docs": [docs[1], docs[2]]}),
        ("update", {"docs": [docs[1], docs[2], docs[0]], "final": True}),
    ]
    with httpx.Client(timeout=120) as http:
        result = session(http, pair.url, "Which document survives?", events)
        reference = session(http, pair.single, "Which document survives?", events)
    assert result["token_ids"] == reference["token_ids"] and len(result["token_ids"]) == 8
    assert result["updates"]  # the prefill instance kept KV up to each update's common prefix
    check_decode_computed_one_token(result)


def test_a_nonstream_session_moves_every_block_after_the_final_event(pair):
    with httpx.Client(timeout=120) as http:
        result = session(http, pair.url, "What is a delta?", appends(2), mode="nonstream")
        reference = session(http, pair.single, "What is a delta?", appends(2), mode="nonstream")
    assert result["token_ids"] == reference["token_ids"]
    kv = check_decode_computed_one_token(result)
    assert kv["blocks_saved"] == kv["blocks_saved_after_final"] >= 3


def test_openai_endpoints_equal_a_single_instance(pair):
    prompt = "Rivers run to the sea. " + corpus_text(1500, 4)
    completion = {"model": "tiny", "prompt": prompt, **SAMPLING}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], **SAMPLING}
    with httpx.Client(timeout=120) as http:
        for path, body, pick in (
            ("/v1/completions", completion, lambda j: j["choices"][0]["text"]),
            ("/v1/chat/completions", chat, lambda j: j["choices"][0]["message"]["content"]),
        ):
            answers = []
            for base in (pair.url, pair.single):
                r = http.post(base + path, json=body)
                assert r.status_code == 200, r.text
                answers.append(pick(r.json()))
            assert answers[0] == answers[1] and answers[0]
            r = http.post(pair.url + path, json={**body, "stream": True})
            chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
            streamed = "".join(_piece(c["choices"][0]) for c in chunks if c.get("choices"))
            assert streamed == answers[1]


def _piece(choice: dict) -> str:
    """A streamed chunk's text: a completion's ``text`` or a chat completion's delta content."""
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or {}).get("content") or ""


def test_the_decode_instance_really_uses_the_transferred_blocks(pair):
    """Blocks corrupted in the store between the prefill and the decode change the answer."""
    question = "What do the corrupted blocks say?"
    with httpx.Client(timeout=120) as http:
        reference = session(http, pair.single, question, appends(7))
        before = set(pair.store.glob("*.safetensors"))
        r = http.post(f"{pair.url}/v1/sessions", json={"question": question, **SAMPLING})
        url = f"{pair.url}/v1/sessions/{r.json()['id']}"
        for kind, body in appends(7)[:-1]:
            assert http.post(f"{url}/{kind}", json=body).status_code == 200
        deadline = time.monotonic() + 30
        while len(set(pair.store.glob("*.safetensors")) - before) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        fresh = set(pair.store.glob("*.safetensors")) - before
        assert len(fresh) >= 6, "the prefill instance saved no blocks while the session streamed"
        for path in fresh:
            block = load_file(path)["kv"]
            save_file({"kv": torch.randn_like(block.float()).to(block.dtype)}, path)
        assert http.post(f"{url}/append", json=appends(7)[-1][1]).status_code == 200
        result = http.get(url).json()
        while result["state"] != "completed":
            time.sleep(0.1)
            result = http.get(url).json()
    assert result["result"]["kv_transfer"]["decode_cached_tokens"] >= 6 * 128
    assert result["result"]["token_ids"] != reference["token_ids"]


def metric_families(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """``vllm:`` families of a scrape: name -> (type, label names), bucket and quantile labels aside."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        family.name: (
            family.type,
            frozenset(k for s in family.samples for k in s.labels if k not in ("le", "quantile")),
        )
        for family in text_string_to_metric_families(text)
        if family.name.startswith("vllm:")
    }


def not_applicable() -> set[str]:
    """The ``vllm:`` families the README lists as not applying to stream2llm, with the reason."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("<!-- vllm-metrics-not-exported -->")[1].split("<!-- end -->")[0]
    return {line.split("`")[1] for line in section.splitlines() if line.startswith("| `vllm:")}


def test_every_vllm_metric_family_of_vllms_own_server_is_exported_with_its_type_and_labels(pair):
    """The same traffic to vLLM's own OpenAI server (the decode instance) and to stream2llm serve:
    every ``vllm:`` family vLLM exports, stream2llm exports with the same type and label names."""
    body = {"prompt": "Hello there, how are you?", "max_tokens": 5, "temperature": 0}
    with httpx.Client(timeout=120) as http:
        assert http.post(f"{pair.decode}/v1/completions", json={"model": "decode", **body}).status_code == 200
        assert http.post(f"{pair.single}/v1/completions", json={"model": "tiny", **body}).status_code == 200
        theirs = metric_families(http.get(f"{pair.decode}/metrics").text)
        ours = metric_families(http.get(f"{pair.single}/metrics").text)
    skipped = not_applicable()
    assert len(theirs) > 20 and skipped <= set(theirs)  # the README lists only families vLLM has
    missing = sorted(set(theirs) - set(ours) - skipped)
    assert not missing, f"vLLM's server exports these, stream2llm serve does not: {missing}"
    differ = {
        name: (theirs[name], ours[name]) for name in set(theirs) & set(ours) if theirs[name] != ours[name]
    }
    assert not differ, f"type or labels differ (vLLM's, ours): {differ}"


def test_sigterm_stops_both_instances_and_removes_the_store(pair):
    tree = pair.command.children()
    decode = [p for p in tree if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())]
    assert len(decode) == 1 and len(tree) >= 4  # the decode server and both instances' engine processes
    assert pair.command.wait_stopped(pair.command.send(signal.SIGTERM), within_s=30) == 0
    assert not pair.store.exists()


def test_the_decode_instances_death_ends_the_deployment(tmp_path):
    command = _start("--disaggregate")
    try:
        url = _ready(command)
        (decode,) = [
            p for p in command.children() if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())
        ]
        with httpx.Client(timeout=30) as http:
            r = http.post(f"{url}/v1/sessions", json={"question": "Still there?", **SAMPLING})
            assert r.status_code == 201
        decode.send_signal(signal.SIGKILL)
        since = time.monotonic()
        assert command.wait_stopped(since, within_s=30) == 1
        assert "the decode instance exited" in command.output()
    finally:
        command.kill_all()
    assert (
        psutil.pid_exists(decode.pid) is False or psutil.Process(decode.pid).status() == psutil.STATUS_ZOMBIE
    )
