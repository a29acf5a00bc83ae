"""``stream2llm serve --replicas 2``: two real engines behind the real vllm-router, started once.

Every call of a session reaches one instance (``X-Stream2LLM-Instance``); its greedy tokens equal
those of the same calls sent straight to the other instance (a plain ``stream2llm serve``); a killed
instance fails only its own sessions; SIGTERM leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import httpx
import psutil
import pytest

pytest.importorskip("vllm_router", reason="the replicas extra (vllm-router) is part of the test extra")
pytestmark = pytest.mark.engine

INSTANCE = "X-Stream2LLM-Instance"
SAMPLING = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    log = tmp_path_factory.mktemp("replicas") / "serve.log"
    argv = [sys.executable, "-m", "stream2llm", "serve", "--replicas", "2", "--model", "tiny"]
    argv += ["--port", "0", "--dtype", "float32", "--kv-cache-gb", "0.25", "--max-model-len", "2048"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"COLUMNS": "200"}
        )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        found = re.search(r"replicas at (http://\S+)", log.read_text())
        if found is None:
            time.sleep(1)
            continue
        url = found.group(1)
        try:
            if httpx.get(f"{url}/readiness", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        pytest.fail("the deployment did not get ready:\n" + log.read_text()[-3000:])
    instances = {}
    for child in psutil.Process(proc.pid).children():
        cmd = child.cmdline()
        if "serve" in cmd and "--port" in cmd:
            instances[f"127.0.0.1:{cmd[cmd.index('--port') + 1]}"] = child.pid
    assert len(instances) == 2, instances
    yield SimpleNamespace(url=url, proc=proc, instances=instances, log=log)
    if proc.poll() is None:
        proc.kill()
    for pid in instances.values():
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def call(http: httpx.Client, method: str, url: str, sid: str, body: dict | None = None) -> httpx.Response:
    return http.request(method, url, json=body, headers={"X-Session-ID": sid})


def open_on(http: httpx.Client, base: str, want: str, question: str, prefix: str) -> str:
    """Open sessions through the router until one lands on instance ``want``; the others are deleted."""
    for _ in range(64):
        sid = f"{prefix}-{uuid.uuid4().hex[:12]}"
        r = call(
            http, "POST", f"{base}/v1/sessions", sid, {"question": question, "session_id": sid, **SAMPLING}
        )
        assert r.status_code == 201, r.text
        assert r.headers["X-Session-ID"] == sid and r.json()["id"] == sid
        if r.headers[INSTANCE] == want:
            return sid
        call(http, "DELETE", f"{base}/v1/sessions/{sid}", sid)
    raise AssertionError(f"no session landed on {want}")


def run_events(http: httpx.Client, base: str, sid: str, kind: str, seen: set[str]) -> list[int]:
    """The session's events, finish and stream; its token ids. ``seen`` gets every instance header."""
    url = f"{base}/v1/sessions/{sid}"
    events = (
        [
            {"text": "The first retrieved passage is about rivers. "},
            {"text": "A second one: mountains.", "final": True},
        ]
        if kind == "append"
        else [
            {"docs": ["Doc A on rivers.", "Doc B on lakes."]},
            {"docs": ["Doc B on lakes.", "Doc C on seas."], "final": True},
        ]
    )
    for body in events:
        r = call(http, "POST", f"{url}/{kind}", sid, body)
        assert r.status_code == 200, r.text
        assert r.headers["X-Session-ID"] == sid
        seen.add(r.headers[INSTANCE])
    with http.stream("GET", f"{url}/stream", headers={"X-Session-ID": sid}) as r:
        assert r.status_code == 200
        seen.add(r.headers[INSTANCE])
        events_in = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
    result = events_in[-1]
    assert result["type"] == "result", events_in
    r = call(http, "GET", url, sid)
    seen.add(r.headers[INSTANCE])
    assert r.json()["state"] == "completed"
    return result["token_ids"]


def test_sessions_stay_on_one_instance_and_match_a_single_instance(deployment):
    a, b = sorted(deployment.instances)
    with httpx.Client(timeout=120) as http:
        for kind in ("append", "update"):
            for home, other in ((a, b), (b, a)):
                question = f"What connects {kind} and {home}?"
                sid = open_on(http, deployment.url, home, question, f"t1-{kind}")
                seen: set[str] = set()
                routed = run_events(http, deployment.url, sid, kind, seen)
                assert seen == {home}  # open, events, stream, state: one instance
                # the same calls sent straight to the other instance: a plain `stream2llm serve`
                direct, ref = f"http://{other}", f"ref-{sid}"
                r = call(http, "POST", f"{direct}/v1/sessions", ref, {"question": question, **SAMPLING})
                assert r.status_code == 201 and r.json()["id"] == ref
                seen_direct: set[str] = set()
                assert run_events(http, direct, ref, kind, seen_direct) == routed
                assert seen_direct == {other} and len(routed) == SAMPLING["max_tokens"]


def test_openai_endpoints_through_the_router_match_each_instance(deployment):
    body = {
        "model": "tiny",
        "prompt": "Rivers run to the",
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
    }
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    with httpx.Client(timeout=120) as http:
        for path, payload, pick in (
            ("/v1/completions", body, lambda j: j["choices"][0]["text"]),
            ("/v1/chat/completions", chat, lambda j: j["choices"][0]["message"]["content"]),
        ):
            routed = http.post(deployment.url + path, json=payload, headers={"X-Session-ID": "openai-1"})
            assert routed.status_code == 200, routed.text
            assert routed.headers[INSTANCE] in deployment.instances
            for instance in deployment.instances:
                direct = http.post(f"http://{instance}{path}", json=payload)
                assert pick(direct.json()) == pick(routed.json())


def test_http_bench_replays_a_trace_through_the_router(deployment):
    from stream2llm.workloads.http_replay import run_http_bench
    from stream2llm.workloads.replay import BenchPlan, EventText, ReplayOptions
    from stream2llm.workloads.trace import TraceEvent, TraceRequest

    events = (
        TraceEvent(0.0, "append", text="Some context. "),
        TraceEvent(0.2, "update", docs=("Doc one.", "Doc two.")),
        TraceEvent(0.4, "append", n_tokens=40),
    )
    requests = [TraceRequest(f"q{i}", "test", f"Question {i}?", events) for i in range(4)]
    options = ReplayOptions(max_tokens=2)
    texts = EventText.for_model("tiny", 2048, options)
    plan = BenchPlan(("stream2llm", "nonstream"), (20.0,))
    doc = asyncio.run(run_http_bench(deployment.url, requests, plan, options, texts))
    assert doc["complete"] and len(doc["runs"]) == 2
    for run in doc["runs"]:
        assert run["errors"] == 0, run["error_examples"]
        assert len(run["samples"]["ttft_final_s"]) == 4
        assert all(t > 0 for t in run["samples"]["ttft_final_s"])
        assert all(n > 40 for n in run["samples"]["prompt_tokens"])
        assert run["second_token_s"]["p50"] > 0 and run["tpot_s"]["p50"] > 0  # two tokens each
        seconds = run["samples"]["second_token_s"]  # request by request, to join two deployments
        assert len(seconds) == 4 and sorted(seconds)[1] <= run["second_token_s"]["p50"] <= sorted(seconds)[2]


def test_a_killed_instance_fails_only_its_sessions(deployment):
    a, b = sorted(deployment.instances)
    with httpx.Client(timeout=120) as http:
        doomed = open_on(http, deployment.url, a, "Doomed?", "t4")
        kept = open_on(http, deployment.url, b, "Kept?", "t4")
        for sid in (doomed, kept):
            r = call(http, "POST", f"{deployment.url}/v1/sessions/{sid}/append", sid, {"text": "Context. "})
            assert r.status_code == 200
        victim = psutil.Process(deployment.instances[a])
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        r = call(
            http,
            "POST",
            f"{deployment.url}/v1/sessions/{doomed}/append",
            doomed,
            {"text": "More.", "final": True},
        )
        assert r.status_code in (404, 502), (
            r.text
        )  # the router's 502, or the survivor's 404 once it dropped a
        assert doomed in r.text or a in r.text
        assert run_events(http, deployment.url, kept, "append", set())  # the other session completes
        time.sleep(2)  # the router's health check (1 s) drops the dead instance
        ready = http.get(f"{deployment.url}/readiness").json()
        assert ready["healthy_workers"] == 1
        r = call(http, "POST", f"{deployment.url}/v1/sessions/{doomed}/finish", doomed)
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    assert deployment.proc.poll() is None  # the deployment keeps serving
    assert "instance 0" in deployment.log.read_text() or "instance 1" in deployment.log.read_text()


def test_sigterm_stops_every_process(deployment):
    tree = psutil.Process(deployment.proc.pid).children(recursive=True)
    assert len(tree) >= 3  # the router, the surviving instance and its engine processes
    deployment.proc.send_signal(signal.SIGTERM)
    assert deployment.proc.wait(60) == 0
    _, alive = psutil.wait_procs(tree, timeout=20)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
