"""Where each millisecond of the disaggregated hop goes: the first token to the second, per request.

The deployment is started as ``deployments.py`` starts it (``serve --disaggregate``, prefill
instance on core 0, decode instance on core 1), with both instances exporting OpenTelemetry spans
to a receiver in this process. Crawler-like requests (a synthetic trace's appends, their texts as
the bench makes them) are sent one at a time over the session API, the last append final, and the
client notes when the first and the second token arrive. Each session's trace then says where the
hop went:

- ``handover``: the prefill instance's session got its first token -> its decode call started
  (the ``first token`` event of ``stream2llm.session`` to the ``decode (remote)`` span's start);
- ``to_vllm``: the call -> vLLM's decode server took the request in (its ``llm_request`` span
  starts at the request's arrival: HTTP, request parsing, input processing);
- ``queue``, ``prefill``: vLLM's own attributes (``time_in_queue``; scheduled -> its first token
  in the engine core: the connector's load and computing one token);
- ``vllm_io``: the rest of vLLM's time to its first token (its API process to its engine core and
  back, output processing);
- ``back``: vLLM's first token (the answer's second) -> the client has it (SSE to the prefill
  instance, its session, SSE to the client).

``hop`` is the client's second token less its first, ``first_token_to_client`` the session's first
token to the client's. A single instance (core 0) is measured the same way after it, for
reference. ``decode_floor.py`` measures what vLLM's server takes alone for a prompt whose KV it
holds (the hop's floor).

    .venv/bin/stream2llm synth --workload crawler --n 300 --seed 42 --out crawler.jsonl
    PYTHONPATH=. .venv/bin/python benchmarks/hop_breakdown.py crawler.jsonl --n 16 --scale 0.6 \
        --out benchmarks/results/hop28/hop-breakdown.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clients.otlp_receiver import OtlpReceiver
from deployments import start, stop

from stream2llm.workloads.replay import EventText, ReplayOptions
from stream2llm.workloads.trace import read_trace

CPUS = {"VLLM_CPU_OMP_THREADS_BIND": "0", "STREAM2LLM_DECODE_CPUS": "1"}
PAUSE_S = 0.3  # between appends: each is prefilled before the next comes, as retrieval would
PARTS = ("handover", "to_vllm", "queue", "prefill", "vllm_io", "back")


async def one_session(
    http: aiohttp.ClientSession, url: str, texts: list[str], max_tokens: int
) -> dict[str, Any]:
    """Send one request's appends (the last final) under a trace id of our own; when the first
    and the second token reached the client (epoch seconds)."""
    trace_id = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    body = {
        "question": "What do the pages say?",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    async with http.post(f"{url}/v1/sessions", json=body, headers=headers) as r:
        assert r.status == 201, await r.text()
        session = f"{url}/v1/sessions/{(await r.json())['id']}"
    stream = asyncio.create_task(_token_times(http, session))
    for i, text in enumerate(texts):
        await asyncio.sleep(PAUSE_S)
        async with http.post(f"{session}/append", json={"text": text, "final": i == len(texts) - 1}) as r:
            assert r.status == 200, await r.text()
    tokens, result = await stream
    return {
        "trace_id": trace_id,
        "first": tokens[0],
        "second": tokens[1],
        "prompt_tokens": result["prompt_tokens"],
    }


async def _token_times(http: aiohttp.ClientSession, session: str) -> tuple[list[float], dict[str, Any]]:
    times: list[float] = []
    async with http.get(f"{session}/stream") as r:
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[5:])
            if event["type"] == "delta":
                times.append(time.time())
            elif event["type"] == "result":
                return times, event
    raise RuntimeError(f"{session}: the stream ended without a result")


def breakdown(spans: list[Any], sample: dict[str, Any]) -> dict[str, float] | None:
    """The hop's parts (ms) from one session's spans and the client's token times (one instance:
    the first token to the client and the hop only)."""
    by_name = {s.name: s for s in spans}
    root, call, vllm = (by_name.get(n) for n in ("stream2llm.session", "decode (remote)", "llm_request"))
    if root is None:
        return None
    first_token = next(e.time_unix_nano for e in root.events if e.name == "first token") / 1e9
    out = {
        "hop": _ms(sample["second"] - sample["first"]),
        "first_token_to_client": _ms(sample["first"] - first_token),
        "prompt_tokens": sample["prompt_tokens"],
    }
    if call is None or vllm is None:
        return out
    attrs = {a.key: a.value.double_value or a.value.int_value for a in vllm.attributes}
    arrival, called = vllm.start_time_unix_nano / 1e9, call.start_time_unix_nano / 1e9
    ttft = attrs["gen_ai.latency.time_to_first_token"]
    queue, prefill = attrs["gen_ai.latency.time_in_queue"], attrs["gen_ai.latency.time_in_model_prefill"]
    parts = {
        "handover": called - first_token,
        "to_vllm": arrival - called,
        "queue": queue,
        "prefill": prefill,
        "vllm_io": ttft - queue - prefill,
        "back": sample["second"] - (arrival + ttft),
    }
    return {k: _ms(v) for k, v in parts.items()} | out


def _ms(seconds: float) -> float:
    return round(1e3 * seconds, 2)


async def measure(deployment: str, args: argparse.Namespace, receiver: OtlpReceiver) -> list[dict[str, Any]]:
    """One deployment's rows: its requests one at a time, then their spans."""
    extra, env = (
        ["--otlp-traces-endpoint", receiver.url],
        {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
    )
    if deployment == "disaggregated":
        extra, env = ["--disaggregate", *extra], {**env, **CPUS}
    else:
        env = {**env, "VLLM_CPU_OMP_THREADS_BIND": "0"}
    log = args.out.with_name(f"{args.out.stem}-{deployment}.log")
    proc, url, _decode = await asyncio.to_thread(start, extra, log, env)
    try:
        options = ReplayOptions(scale=args.scale, max_tokens=args.max_tokens)
        events = EventText.for_model("tiny", 32768, options)
        requests = [r for r in read_trace(args.trace) if all(e.op == "append" for e in r.events)]
        async with aiohttp.ClientSession() as http:
            await one_session(http, url, events.payloads(requests[0]), args.max_tokens)  # warm-up
            samples = []
            for request in requests[1 : args.n + 1]:
                samples.append(await one_session(http, url, events.payloads(request), args.max_tokens))
        await asyncio.sleep(8)  # the spans' batch exporters flush every 5 s
    finally:
        await asyncio.to_thread(stop, proc)
    return [row for s in samples if (row := breakdown(receiver.trace(s["trace_id"]), s)) is not None]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    receiver = await OtlpReceiver().start()
    try:
        report: dict[str, Any] = {}
        for deployment in args.deployments.split(","):
            rows = await measure(deployment, args, receiver)
            keys = [k for k in (*PARTS, "hop", "first_token_to_client") if rows and k in rows[0]]
            medians = {k: round(statistics.median(r[k] for r in rows), 2) for k in keys}
            report[deployment] = {"median_ms": medians, "rows": rows}
            print(deployment, json.dumps(medians), f"({len(rows)} of {args.n} requests traced)", flush=True)
    finally:
        await receiver.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace", type=Path, help="a crawler-like trace (synth --workload crawler)")
    parser.add_argument("--n", type=int, default=16, help="requests, sent one at a time")
    parser.add_argument("--scale", type=float, default=0.6)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--deployments", default="disaggregated,single", help="of disaggregated, single")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(args))
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
