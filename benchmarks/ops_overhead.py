"""What operating it costs serving: the crawler-like bench (stream2llm policy) on two engines side by
side, runs alternated: ``off`` (no tracing, no KV events: the engine as it ran before) and ``on``
(OpenTelemetry traces to a real OTLP/HTTP receiver, KV cache events on ZMQ). In each ``on`` run the
receiver stops answering halfway (503 after a 2 s wait, a collector in trouble) and a KV-event
subscriber is connected that never reads: the sessions must complete with TTFT unchanged within
noise, the lost spans counted.

    PYTHONPATH=. .venv/bin/python benchmarks/ops_overhead.py crawler-2027.jsonl --qps 4 --limit 120 \\
        --scale 0.7 --repeat 3 --out benchmarks/results/ops-overhead
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq
from clients.otlp_receiver import OtlpReceiver

from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.workloads.bench import load_requests, machine
from stream2llm.workloads.engine_replay import run_once
from stream2llm.workloads.metrics import percentile
from stream2llm.workloads.replay import ReplayOptions

BENCH_ENGINE = EngineConfig(  # what `stream2llm bench` starts (its defaults, --max-batched-tokens 512)
    model="tiny", kv_cache_bytes=2 << 30, max_model_len=32768, max_num_batched_tokens=512, max_num_seqs=256
)


def never_reading_subscriber(endpoint: str) -> zmq.Socket:
    """A KV-event subscriber that connects and then never reads (small buffers: it fills at once)."""
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, 10)
    socket.setsockopt(zmq.RCVBUF, 4096)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(endpoint)
    return socket


async def one_run(engine: StreamingEngine, requests: list, args: argparse.Namespace, repeat: int) -> dict:
    options = ReplayOptions(scale=args.scale)
    result = await run_once(engine, requests, "stream2llm", args.qps, options, repeat)
    ttfts = [r.ttft_final_s for r in result.records if r.error is None and r.ttft_final_s is not None]
    return {
        "requests": len(result.records),
        "errors": sum(r.error is not None for r in result.records),
        **{f"p{q}": round(percentile(ttfts, q / 100), 4) for q in (50, 95, 99)},
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    requests = load_requests(args.trace, args.limit, "stable")
    receiver = await OtlpReceiver().start()
    os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    folder = tempfile.mkdtemp(prefix="stream2llm-ops-")
    endpoint = f"ipc://{folder}/kv.sock"
    subscriber = never_reading_subscriber(endpoint)
    off = await StreamingEngine.start(BENCH_ENGINE)
    on = await StreamingEngine.start(
        replace(BENCH_ENGINE, otlp_traces_endpoint=receiver.url, kv_events={"endpoint": endpoint})
    )
    runs: list[dict] = []
    try:
        for repeat in range(args.repeat):
            order = [("off", off), ("on", on)] if repeat % 2 == 0 else [("on", on), ("off", off)]
            for name, engine in order:
                runs.append(
                    {
                        "config": name,
                        "repeat": repeat,
                        **await run_with_trouble(engine, name, receiver, requests, args, repeat),
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
        return {
            "runs": runs,
            "spans": on.tracing.counts() if on.tracing else {},
            "received": len(receiver.spans),
        }
    finally:
        await off.shutdown()
        await on.shutdown()
        subscriber.close(linger=0)
        await receiver.stop()


async def run_with_trouble(
    engine, name: str, receiver: OtlpReceiver, requests: list, args, repeat: int
) -> dict:
    """One run; with tracing on, the receiver goes down halfway through the arrivals."""
    if name == "off":
        return await one_run(engine, requests, args, repeat)
    receiver.up = True
    before = dict(engine.tracing.counts())

    async def trouble() -> None:
        await asyncio.sleep(len(requests) / args.qps / 2)
        receiver.up = False

    stopper = asyncio.create_task(trouble())
    try:
        summary = await one_run(engine, requests, args, repeat)
    finally:
        stopper.cancel()
        receiver.up = True
    after = engine.tracing.counts()
    return {**summary, "spans": {k: after[k] - before[k] for k in after}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--qps", type=float, default=4.0)
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--scale", type=float, default=0.7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    document = {"machine": machine(), "options": {k: str(v) for k, v in vars(args).items()}}
    document.update(asyncio.run(measure(args)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
