"""The disaggregated hop request by request, against the decode floor for each prompt's size.

Reads a ``deployments.py`` output folder run with ``--only single,disaggregated`` (the same trace,
so the same requests in the same order) and a ``decode_floor.py`` result. For each request: its
TTFT on both deployments, and the hop, which disaggregation moves to the second token: the time
from the final event to the second token, disaggregated less one instance's. The floor is what
vLLM's own server takes to answer a prompt of that size whose KV it already holds (interpolated
between the measured sizes), so ``hop - floor`` is what the deployment adds beyond it.

    PYTHONPATH=. .venv/bin/python benchmarks/hop_vs_floor.py \\
        benchmarks/results/hop28/deployments28-qps025-generate benchmarks/results/hop28/decode-floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def floor_ms(rows: list[dict[str, Any]], tokens: int, key: str) -> float:
    """The floor at ``tokens``, linear between the measured prompt sizes (flat beyond them)."""
    points = sorted((r["prompt_tokens"], r[key]["median"]) for r in rows)
    if tokens <= points[0][0]:
        return points[0][1]
    for (n0, f0), (n1, f1) in zip(points, points[1:], strict=False):
        if tokens <= n1:
            return f0 + (f1 - f0) * (tokens - n0) / (n1 - n0)
    return points[-1][1]


def samples(out: Path, deployment: str, policy: str) -> dict[str, list]:
    doc = json.loads((out / f"{deployment}-{policy}" / "results.json").read_text())
    (run,) = doc["runs"]
    return run["samples"]


def per_request(out: Path, floor_rows: list[dict[str, Any]], policy: str, key: str) -> list[dict[str, float]]:
    single, disagg = samples(out, "single", policy), samples(out, "disaggregated", policy)
    if single["prompt_tokens"] != disagg["prompt_tokens"]:
        raise SystemExit("the two runs did not answer the same requests (errors?): cannot join them")
    rows = []
    for i, tokens in enumerate(single["prompt_tokens"]):
        second = [s["ttft_final_s"][i] + s["second_token_s"][i] for s in (single, disagg)]
        hop = 1e3 * (second[1] - second[0])
        floor = floor_ms(floor_rows, tokens, key)
        ttft = (1e3 * single["ttft_final_s"][i], 1e3 * disagg["ttft_final_s"][i])
        rows.append({"prompt_tokens": tokens, "ttft_single_ms": ttft[0], "ttft_disagg_ms": ttft[1]})
        rows[-1] |= {"hop_ms": hop, "floor_ms": floor, "over_floor_ms": hop - floor}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("deployments", type=Path, help="deployments.py --out folder")
    parser.add_argument("floor", type=Path, help="decode_floor.py --out file")
    parser.add_argument("--policy", default="stream2llm")
    parser.add_argument(
        "--floor-key", default="cached_ms", help="cached_ms (/v1/completions) or cached_generate_ms"
    )
    args = parser.parse_args()
    floor_rows = json.loads(args.floor.read_text())["rows"]
    rows = per_request(args.deployments, floor_rows, args.policy, args.floor_key)
    p50 = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
    ratio = statistics.median(r["ttft_disagg_ms"] / r["ttft_single_ms"] for r in rows)
    print(json.dumps({"requests": len(rows), "p50": p50, "ttft_ratio_p50_per_request": round(ratio, 3)}))


if __name__ == "__main__":
    main()
