"""Deployments under the crawler load, over HTTP (`stream2llm bench --endpoint`, the client path):
one instance, prefill/decode disaggregated (streamed and nonstream), and replicas behind vllm-router.

    .venv/bin/stream2llm synth --workload crawler --n 300 --seed 42 --out crawler.jsonl
    .venv/bin/python benchmarks/deployments.py crawler.jsonl --out benchmarks/results/deployments-tiny

Each deployment is started with `python -m stream2llm serve ...` (the same engine sizes as the
in-process bench: KV 2 GiB, 32k context, 512-token steps, 256 slots), the trace is replayed with
`python -m stream2llm bench --endpoint` (one policy per invocation, so that the decode instance's
/metrics can be read around each), then the deployment gets SIGTERM. summary.json holds TTFT after
the final event, the KV the connector moved (after the final event and in all, against the whole
prompts' KV), what the decode instance computed itself, its tokens/s, and the replicas' throughput.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ENGINE = ["--model", "tiny", "--kv-cache-gb", "2", "--max-model-len", "32768", "--max-batched-tokens", "512"]
ENGINE += ["--max-num-seqs", "256", "--max-sessions", "512"]
READY = {"single": r"at (http://\S+) \(OpenAI", "replicas": r"replicas at (http://\S+)"}


# --pin: every engine on cores of its own (engines sharing cores thrash in their OpenMP barriers):
# one instance on core 0, or on both (the mixed-load comparison: the cores disaggregation splits);
# the prefill instance on core 0 and the decode instance on core 1; replicas on core 0 and core 1
PLANS: dict[str, tuple[list[str], dict[str, str]]] = {
    "single": ([], {"VLLM_CPU_OMP_THREADS_BIND": "0"}),
    "single-both-cores": ([], {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}),
    "disaggregated": (["--disaggregate"], {"VLLM_CPU_OMP_THREADS_BIND": "0", "STREAM2LLM_DECODE_CPUS": "1"}),
    "replicas": (["--replicas", "2"], {"STREAM2LLM_REPLICA_CPUS": "0|1"}),
}


def start(extra: list[str], log: Path, cpus: dict[str, str]) -> tuple[subprocess.Popen, str, str | None]:
    """A deployment; its URL and (disaggregated) its decode instance's URL, read from its output."""
    out = open(log, "w")  # noqa: SIM115 - the process writes to it until it is stopped
    argv = [sys.executable, "-m", "stream2llm", "serve", *ENGINE, "--port", "0", *extra]
    env = {**_env(), "COLUMNS": "300", **cpus}
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    pattern = READY["replicas" if "--replicas" in extra else "single"]
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        text = log.read_text()
        if (found := re.search(pattern, text)) is not None:
            decode = re.search(r"decode instance: (http://\S+)", text)
            return proc, found.group(1), decode.group(1) if decode else None
        if proc.poll() is not None:
            raise RuntimeError(f"the deployment exited:\n{text[-3000:]}")
        time.sleep(1)
    raise RuntimeError("the deployment did not come up")


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def decode_metrics(url: str | None) -> dict[str, float]:
    """The decode instance's generation counters (vLLM's Prometheus metrics)."""
    if url is None:
        return {}
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    wanted = {
        "generation_tokens": r"^vllm:generation_tokens_total\{[^}]*\} (\S+)",
        "decode_time_s": r"^vllm:request_decode_time_seconds_sum\{[^}]*\} (\S+)",
        "prompt_tokens": r"^vllm:prompt_tokens_total\{[^}]*\} (\S+)",
        "computed_prompt_tokens": r'^vllm:prompt_tokens_by_source_total\{[^}]*"local_compute"[^}]*\} (\S+)',
    }
    return {k: sum(float(v) for v in re.findall(p, text, re.M)) for k, p in wanted.items()}


def bench(url: str, trace: str, policy: str, qps: float, args: argparse.Namespace, out: Path) -> dict:
    argv = [sys.executable, "-m", "stream2llm", "bench", trace, "--endpoint", url, "--policies", policy]
    argv += ["--qps", str(qps), "--limit", str(args.limit), "--scale", str(args.scale), "--model", "tiny"]
    argv += ["--max-tokens", str(args.max_tokens), "--max-model-len", "32768", "--out", str(out)]
    subprocess.run(argv, check=True, env={"COLUMNS": "200", **_env()})
    return json.loads((out / "results.json").read_text())


def kv_moved(run: dict) -> dict[str, float]:
    """What the connector moved for the run's requests, against their whole prompts' KV."""
    kvs = [k for k in run["samples"].get("kv_transfer") or [] if k]
    if not kvs:
        return {}
    per_token = kvs[0]["block_bytes"] / kvs[0]["block_size"]
    prompts = sum(run["samples"]["prompt_tokens"])
    return {
        "requests": len(kvs),
        "prompt_kv_bytes": prompts * per_token,
        "saved_bytes": sum(k["blocks_saved"] for k in kvs) * kvs[0]["block_bytes"],
        "saved_after_final_bytes": sum(k["blocks_saved_after_final"] for k in kvs) * kvs[0]["block_bytes"],
        "decode_prefilled_tokens_max": max(k["decode_prefilled_tokens"] for k in kvs),
        "decode_prefilled_tokens_mean": sum(k["decode_prefilled_tokens"] for k in kvs) / len(kvs),
        "block_size": kvs[0]["block_size"],
    }


def run_deployment(name: str, plan: tuple, args: argparse.Namespace, root: Path) -> list[dict]:
    extra, policies, qps, cpus = plan
    proc, url, decode = start(extra, root / f"{name}.log", cpus if args.pin else {})
    rows = []
    try:
        for policy in policies:
            before, t0 = decode_metrics(decode), time.monotonic()
            doc = bench(url, args.trace, policy, qps, args, root / f"{name}-{policy}")
            after, wall = decode_metrics(decode), time.monotonic() - t0
            (run,) = doc["runs"]
            delta = {k: after[k] - before.get(k, 0.0) for k in after}
            row = {"deployment": name, "policy": policy, "qps": qps, "completion_s": run["completion_s"]}
            row |= {"ttft_final_s": run["ttft_final_s"], "errors": run["errors"], "requests": run["requests"]}
            row |= {k: run[k] for k in ("second_token_s", "tpot_s") if k in run}  # where the hop went
            row |= {"throughput_rps": run["requests"] / run["completion_s"], "kv": kv_moved(run)}
            if delta:
                row["decode"] = delta | {
                    "tokens_per_s_per_request": delta["generation_tokens"]
                    / max(delta["decode_time_s"], 1e-9),
                    "tokens_per_s": delta["generation_tokens"] / wall,
                }
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
    finally:
        stop(proc)
    return rows


def table(rows: list[dict]) -> str:
    """TTFT, second token and time per output token per run, as the README's tables show them."""
    lines = ["| deployment | policy | TTFT p50 / p99 (s) | second token p50 / p99 (s) | TPOT p50 / p99 (s) |"]
    lines.append("|---|---|---|---|---|")
    for row in rows:
        cells = [
            " / ".join(f"{row[m][p]:.3f}" for p in ("p50", "p99")) if m in row else "-"
            for m in ("ttft_final_s", "second_token_s", "tpot_s")
        ]
        lines.append(f"| {row['deployment']} | {row['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace")
    parser.add_argument("--qps", type=float, default=4.0)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--scale", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--only", default="single,disaggregated,replicas", help=f"of {','.join(PLANS)}")
    parser.add_argument("--policies", default="stream2llm,nonstream", help="the streamed and nonstream runs")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="let the engines share every core")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    policies = args.policies.split(",")
    plan = {name: (extra, policies, args.qps, cpus) for name, (extra, cpus) in PLANS.items()}
    extra, cpus = PLANS["replicas"]
    plan["replicas"] = (extra, ["stream2llm"], 2 * args.qps, cpus)  # twice the load, streamed only
    rows = []
    for name in args.only.split(","):
        rows += run_deployment(name, plan[name], args, args.out)
        (args.out / "summary.json").write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1)
        )
    print(table(rows))


if __name__ == "__main__":
    main()
