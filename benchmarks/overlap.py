"""Overlap benchmark: is each chunk prefilled before the next arrives, and how much TTFT is saved?

A ~3,000-token prompt arrives in pieces ``--gap`` seconds apart. ``stream`` prefills each piece on
arrival; ``nonstream`` sends the whole prompt after the last piece, on the same engine. Each run
uses its own cache salt so neither reuses the other's KV. Reports medians over ``--repeat`` runs,
for two hand-offs of the end of the stream:

- ``separate``: the end of retrieval is its own event, ``--gap`` after the last piece (the final
  chunk carries the held-back tail and the answer cue);
- ``with-last``: the last piece and the end of retrieval arrive together (the final chunk carries
  the whole last piece, as in the published crawler traces).

    .venv/bin/python benchmarks/overlap.py --model tiny --repeat 7 --out benchmarks/results/overlap-tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from pydoc_data.topics import topics

from stream2llm.context.prompt import PromptTemplate
from stream2llm.engine.engine import EngineConfig, StreamingEngine
from stream2llm.workloads.bench import machine

QUESTION = "What does this documentation describe?"


def context_of(engine: StreamingEngine, n_tokens: int, seed: int) -> str:
    text = "\n\n".join(topics[k] for k in sorted(topics))
    start = (seed * 7919) % (len(text) // 2)
    t = PromptTemplate()
    lo, hi = 100, 40000
    while lo < hi:  # the longest slice whose prompt fits n_tokens
        mid = (lo + hi + 1) // 2
        n = len(
            engine.tokenizer.encode(
                t.render_prefix(QUESTION) + text[start : start + mid] + t.render_suffix(QUESTION)
            )
        )
        lo, hi = (mid, hi) if n <= n_tokens else (lo, mid - 1)
    return text[start : start + lo]


async def one_run(engine, mode: str, context: str, pieces: int, gap_s: float, sampling, final: str) -> dict:
    size = -(-len(context) // pieces)
    parts = [context[i : i + size] for i in range(0, len(context), size)]
    session = await engine.open(QUESTION, sampling, mode=mode, cache_salt=uuid.uuid4().hex)
    for i, part in enumerate(parts):
        await asyncio.sleep(gap_s)
        if final == "with-last" and i == len(parts) - 1:
            await session.append(part, final=True)  # the last page ends the context: one chunk
        else:
            await session.append(part)
    if final == "separate":
        await asyncio.sleep(gap_s)
        await session.finish()
    r = await session.result()
    chunks = r.chunks
    overlapped = all(c.done is not None and c.done < n.sent for c, n in zip(chunks, chunks[1:]))
    return {
        "mode": mode,
        "ttft_final_s": r.ttft_final_s,
        "prompt_tokens": len(r.prompt_token_ids),
        "final_chunk_tokens": chunks[-1].tokens,
        "each_chunk_done_before_next": overlapped if mode == "stream" else None,
        "max_chunk_prefill_s": max((c.done - c.sent) for c in chunks[:-1]) if mode == "stream" else None,
        "token_ids": r.token_ids,
    }


async def main(args) -> dict:
    from vllm import SamplingParams

    engine = await StreamingEngine.start(EngineConfig(model=args.model, max_model_len=8192))
    sampling = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = []
    try:
        for i in range(args.repeat):
            context = context_of(engine, args.tokens, seed=i)
            for final in ("separate", "with-last"):
                for mode in ("stream", "nonstream"):
                    run = await one_run(engine, mode, context, args.pieces, args.gap, sampling, final)
                    runs.append({"repeat": i, "final": final, **run})
    finally:
        await engine.shutdown()
    return {
        "benchmark": "overlap",
        "command": "benchmarks/overlap.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model,
        "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in runs),
        "gap_s": args.gap,
        "pieces": args.pieces,
        **{final: summarize([r for r in runs if r["final"] == final]) for final in ("separate", "with-last")},
        "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs],
    }


def summarize(runs: list[dict]) -> dict:
    stream = [r for r in runs if r["mode"] == "stream"]
    nonstream = [r for r in runs if r["mode"] == "nonstream"]
    p50_s = statistics.median(r["ttft_final_s"] for r in stream)
    p50_n = statistics.median(r["ttft_final_s"] for r in nonstream)
    ratios = [n["ttft_final_s"] / s["ttft_final_s"] for s, n in zip(stream, nonstream)]
    return {
        "ttft_final_p50_stream_s": round(p50_s, 4),
        "ttft_final_p50_nonstream_s": round(p50_n, 4),
        "ratio_of_medians": round(p50_n / p50_s, 2),
        "ratio_per_repeat_min": round(min(ratios), 2),
        "final_chunk_tokens_median": statistics.median(r["final_chunk_tokens"] for r in stream),
        "every_piece_done_before_next": all(
            r["each_chunk_done_before_next"] for r in stream if r["final"] == "separate"
        )
        if stream[0]["final"] == "separate"
        else None,
        "identical_outputs": all(s["token_ids"] == n["token_ids"] for s, n in zip(stream, nonstream)),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--pieces", type=int, default=6)
    parser.add_argument("--gap", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = asyncio.run(main(args))
    summary = {k: v for k, v in report.items() if k != "runs"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
