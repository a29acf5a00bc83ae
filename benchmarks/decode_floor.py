"""The decode instance's fixed cost: what vLLM's own OpenAI server takes to answer a prompt whose KV
it already holds, against one it must compute, on the core the disaggregated deployment gives it.

A disaggregated TTFT is the prefill instance's last chunk plus this hop; on a CPU core the hop's
floor is as large as the chunk it follows. The deployment is started as ``deployments.py`` starts
it (``serve --disaggregate``, prefill instance on core 0, decode instance on core 1); each prompt of
random token ids is sent twice to the decode instance's ``/v1/completions`` (one output token,
streamed): cold (every token computed) and then cached (every token from its prefix cache, as
from a transferred KV), time to the first streamed token.

    .venv/bin/python benchmarks/decode_floor.py --out benchmarks/results/decode-floor-tiny.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import urllib.request
from pathlib import Path

from deployments import start, stop

CPUS = {"VLLM_CPU_OMP_THREADS_BIND": "0", "STREAM2LLM_DECODE_CPUS": "1"}


def first_token_s(url: str, ids: list[int], endpoint: str = "completions") -> float:
    """Time to the first streamed token: vLLM's OpenAI ``/v1/completions`` or its token-in,
    token-out ``/inference/v1/generate``."""
    if endpoint == "completions":
        body = {"model": "decode", "prompt": ids, "max_tokens": 1, "stream": True, "temperature": 0}
        path = "/v1/completions"
    else:
        sampling = {"max_tokens": 1, "temperature": 0, "detokenize": False}
        body = {"model": "decode", "token_ids": ids, "sampling_params": sampling, "stream": True}
        path = "/inference/v1/generate"
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response:
            if line.startswith(b"data:") and b'"choices"' in line:
                return time.perf_counter() - t0
    raise RuntimeError(f"no token from {url}")


def measure(url: str, lengths: list[int], repeat: int, vocab: int) -> list[dict]:
    rng = random.Random(1)
    rows = []
    for n in lengths:
        cold, cached, generate = [], [], []
        for _ in range(repeat):
            ids = [rng.randrange(10, vocab) for _ in range(n)]
            cold.append(first_token_s(url, ids))
            cached.append(first_token_s(url, ids))
            generate.append(first_token_s(url, ids, "generate"))
        row = {"prompt_tokens": n, "cold_ms": _ms(cold), "cached_ms": _ms(cached)}
        rows.append(row | {"cached_generate_ms": _ms(generate)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _ms(samples: list[float]) -> dict[str, float]:
    return {"median": 1e3 * statistics.median(samples), "min": 1e3 * min(samples), "n": len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="16,1000,4000,8000")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=500, help="token ids drawn below this")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    proc, _, decode = start(["--disaggregate"], args.out.with_suffix(".log"), CPUS)
    try:
        assert decode is not None, "the deployment named no decode instance"
        rows = measure(decode, [int(n) for n in args.lengths.split(",")], args.repeat, args.vocab)
    finally:
        stop(proc)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
