"""Soak benchmark: thousands of mixed sessions, then every resource must be back where it started.

One tiny-model engine, the real HTTP server on 127.0.0.1 embedded in this process through the public
API, driven by real aiohttp clients (``clients.http_load``), and the Python API on the same engine
(``clients.api_load``). The mix: append and update sessions (stream, vllm, nonstream), OpenAI
completions and chat (streamed and not), random aborts (DELETE), clients that hang up mid-SSE, bad
input (invalid JSON, empty appends, out-of-order and duplicate events, oversized bodies, unknown
session ids, events after the final) and sessions left to expire (``session_ttl_s`` is small).
Bounded in time (``--minutes``) and in count (``--max-scenarios``).

Baseline: after a warm-up of the same mix, the clients close and the engine drains; then a snapshot.
End: the same after the load. Compared: RSS of this process and of each engine child (tolerance
``--rss-tolerance-mb``), open sessions, the server's running HTTP sessions, the scheduler's running /
waiting / parked and KV usage (all from the server's /metrics), the scheduler's requests
(``engine.stats()``), asyncio tasks, file descriptors (``--fd-tolerance``). Any scenario that ended
in something other than its expected outcome (a 5xx, a hang, a session still open after its client
left) also fails the run. Exit status 1 on any failure; the JSON (time series every ``--sample-s``,
baseline, end, checks, outcome counts) is written to ``--out``/results.json.

    .venv/bin/python benchmarks/soak.py --minutes 20 --out benchmarks/results/soak-tiny-20m
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from clients.api_load import ApiLoad, engine_still_open
from clients.common import MIB
from clients.host import Hosted, host
from clients.http_load import HttpLoad
from clients.mix import LoadContext

from stream2llm import EngineConfig
from stream2llm.server import ServerSettings
from stream2llm.workloads.bench import machine

MUST_BE_ZERO = (
    "open_sessions",
    "http_running",
    "sched_requests",
    "sched_running",
    "sched_waiting",
    "sched_parked",
)


class Soak:
    """The mixed load on one hosted engine and server, and the resource snapshots."""

    def __init__(self, hosted: Hosted, model: str, args: argparse.Namespace) -> None:
        self.hosted, self.engine, self.model, self.args = hosted, hosted.engine, model, args
        self.ctx = LoadContext(args.seed, functools.partial(engine_still_open, hosted.engine))
        self.probe = hosted.probe()
        self.t0 = time.monotonic()

    async def load(self, seconds: float, max_scenarios: int) -> None:
        """Run the mix with the configured workers until ``seconds`` pass or ``max_scenarios`` start."""
        args = self.args
        http = HttpLoad(self.ctx, self.hosted.url, self.model, self.hosted.max_body, args.ttl)
        api = ApiLoad(self.ctx, self.engine, args.ttl)
        async with http:
            mixes = [(http.mix(), args.http_workers), (api.mix(), args.api_workers)]
            await self.ctx.run(mixes, seconds, max_scenarios)
            await self.ctx.wait_checks(args.ttl * 3 + 30)

    def local(self) -> dict[str, Any]:
        """What only this process sees: its asyncio tasks, and the scheduler's request count
        (``engine.stats()``; /metrics has no gauge for it)."""
        return {"tasks": len(asyncio.all_tasks()), "sched_requests": self.engine.stats().requests}

    async def snapshot(self) -> dict[str, Any]:
        state = await self.probe.snapshot(self.local)
        return {
            "t_s": round(time.monotonic() - self.t0, 2),
            **state,
            "scenarios_started": self.ctx.started,
            "scenarios_failed": sum(self.ctx.tally.failed.values()),
        }

    async def drain(self, timeout_s: float) -> float:
        """Wait until no session is open and the scheduler holds nothing; the seconds it took."""
        t = time.monotonic()
        while time.monotonic() - t < timeout_s:
            metrics = await self.probe.metrics()
            held = [metrics[k] for k in MUST_BE_ZERO if k != "sched_requests"] + [metrics["kv_usage"]]
            if not any(v is None or v for v in [*held, self.engine.stats().requests]):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # server-side connection handlers finish after the clients closed
        gc.collect()
        return time.monotonic() - t


# -- checks and the run ------------------------------------------------------------------------------


def compare(base: dict[str, Any], end: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """End against baseline: what must be back exactly, and what within a documented tolerance (a
    value the server did not report, None, fails its check)."""
    checks: list[dict[str, Any]] = []

    def check(name: str, b: Any, e: Any, slack: float | None, tolerance: str) -> None:
        limit = None if b is None else (0 if slack is None else b + slack)
        ok = e is not None and limit is not None and e <= limit
        checks.append(
            {"name": name, "baseline": b, "end": e, "limit": limit, "tolerance": tolerance, "ok": ok}
        )

    for key in MUST_BE_ZERO:
        check(key, base[key], end[key], None, "exactly 0")
    check("kv_usage", base["kv_usage"], end["kv_usage"], 1e-9, "baseline")
    check("tasks", base["tasks"], end["tasks"], 0, "baseline")
    check("fds", base["fds"], end["fds"], args.fd_tolerance, f"+{args.fd_tolerance}")
    tol = f"+{args.rss_tolerance_mb:g} MiB"
    check("rss_mb", base["rss_mb"], end["rss_mb"], args.rss_tolerance_mb, tol)
    by_pid = {c["pid"]: c for c in end["children"]}
    for child in base["children"]:
        now = by_pid.get(child["pid"])
        if now is None:
            checks.append({"name": f"child {child['pid']} ({child['name']})", "ok": False, "end": "gone"})
            continue
        name = f"rss_mb child {child['pid']} ({child['name']})"
        check(name, child["rss_mb"], now["rss_mb"], args.rss_tolerance_mb, tol)
    check("children", len(base["children"]), len(end["children"]), 0, "baseline")
    return checks


def rss_slope(samples: list[dict[str, Any]]) -> dict[str, float | None]:
    """Least-squares slope of RSS over the load phase (MiB/min): a leak shows as a steady climb."""
    if len(samples) < 3:
        return {"self": None, "children": None}
    ts = [x["t_s"] / 60 for x in samples]
    mean_t = sum(ts) / len(ts)
    var = sum((t - mean_t) ** 2 for t in ts) or 1.0

    def slope(key: str) -> float:
        ys = [x[key] for x in samples]
        mean_y = sum(ys) / len(ys)
        return round(sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys)) / var, 3)

    return {"self": slope("rss_mb"), "children": slope("children_rss_mb")}


def print_sample(s: dict[str, Any], phase: str) -> None:
    print(
        f"[{phase} {s['t_s']:7.1f}s] started={s['scenarios_started']} failed={s['scenarios_failed']} "
        f"open={s['open_sessions']} sched={s['sched_requests']}/{s['sched_running']}/{s['sched_waiting']}"
        f"/{s['sched_parked']} kv={s['kv_usage'] or 0:.3f} tasks={s['tasks']} fds={s['fds']} "
        f"rss={s['rss_mb']:.0f}+{s['children_rss_mb']:.0f} MiB",
        flush=True,
    )


async def sampler(soak: Soak, series: list[dict[str, Any]], every_s: float, phase: list[str]) -> None:
    while True:
        sample = await soak.snapshot()
        sample["phase"] = phase[0]
        series.append(sample)
        print_sample(sample, phase[0])
        await asyncio.sleep(every_s)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    config = EngineConfig(
        model=args.model,
        kv_cache_bytes=args.kv_mb * MIB,
        max_model_len=4096,
        max_num_seqs=64,
        session_ttl_s=args.ttl,
        fast_start=args.fast_start,
    )
    hosted = await host(config, ServerSettings(keep_results=args.keep_results))
    try:
        soak = Soak(hosted, (await hosted.probe().health())["model"], args)
        warmup_s = (
            args.warmup_s if args.warmup_s is not None else min(60.0, max(15.0, 0.15 * args.minutes * 60))
        )
        phases = await run_phases(soak, warmup_s)
    finally:
        await hosted.close()
    return outcome(args, soak, phases, warmup_s, t_start)


async def run_phases(soak: Soak, warmup_s: float) -> dict[str, Any]:
    """Warm-up, drain, baseline, load, drain, end; the samples taken all along."""
    args = soak.args
    series: list[dict[str, Any]] = []
    phase = ["warmup"]
    ticker = asyncio.ensure_future(sampler(soak, series, args.sample_s, phase))
    try:
        await soak.load(warmup_s, args.max_scenarios)
        phase[0] = "drain"
        drain_base = await soak.drain(args.ttl * 3 + 30)
        base = await soak.snapshot()
        phase[0] = "load"
        await soak.load(max(0.0, args.minutes * 60 - warmup_s), max(0, args.max_scenarios - soak.ctx.started))
        phase[0] = "drain"
        drain_end = await soak.drain(args.ttl * 3 + 30)
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        end = await soak.snapshot()
        base["tasks"] -= 1  # the sampler ran when the baseline was taken
    finally:
        ticker.cancel()
    return {"series": series, "base": base, "end": end, "drain": (drain_base, drain_end)}


def outcome(
    args: argparse.Namespace, soak: Soak, phases: dict[str, Any], warmup_s: float, t_start: float
) -> dict[str, Any]:
    """The recorded result: checks, scenario counts, the time series."""
    base, end, series = phases["base"], phases["end"], phases["series"]
    checks = compare(base, end, args)
    tally = soak.ctx.tally.as_dict()
    load = [x for x in series if x["phase"] == "load"]
    return {
        "command": " ".join(sys.argv),
        "rss_slope_mb_per_min": rss_slope(load),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
        "wall_s": round(time.time() - t_start, 1),
        "config": {**vars(args), "warmup_s": warmup_s, "max_body_bytes": soak.hosted.max_body},
        "drain_s": {"baseline": round(phases["drain"][0], 2), "end": round(phases["drain"][1], 2)},
        "baseline": base,
        "end": end,
        "checks": checks,
        "scenarios": tally,
        "ok": all(c["ok"] for c in checks) and not tally["failed"],
        "series": series,
    }


def report(result: dict[str, Any]) -> None:
    print("\nend vs baseline:")
    for c in result["checks"]:
        mark = "ok  " if c["ok"] else "FAIL"
        b, e = c.get("baseline", ""), c.get("end", "")
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
        print(f"  {mark} {c['name']:<40} baseline {fmt(b):>10}  end {fmt(e):>10}  ({c.get('tolerance', '')})")
    tally = result["scenarios"]
    print(
        f"\nscenarios: {tally['total']} ({sum(tally['ok'].values())} as expected, "
        f"{sum(tally['failed'].values())} not)"
    )
    for name in sorted(set(tally["ok"]) | set(tally["failed"])):
        notes = tally["notes"].get(name, {})
        ok, failed = tally["ok"].get(name, 0), tally["failed"].get(name, 0)
        print(f"  {name:<26} ok {ok:>6}  failed {failed:>4}  {notes or ''}")
    for line in tally["failures"][:20]:
        print(f"  failure: {line}")
    print(f"RSS slope over the load (MiB/min): {result['rss_slope_mb_per_min']}")
    print(f"\n{'PASS' if result['ok'] else 'FAIL'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20.0, help="load time, warm-up included")
    p.add_argument("--warmup-s", type=float, default=None, help="default: 15%% of the run, 15-60 s")
    p.add_argument("--max-scenarios", type=int, default=250_000, help="bound on scenarios started")
    p.add_argument("--http-workers", type=int, default=12)
    p.add_argument("--api-workers", type=int, default=4)
    p.add_argument("--ttl", type=float, default=3.0, help="the engine's session_ttl_s")
    p.add_argument("--keep-results", type=int, default=1024, help="the server's ended sessions kept")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--rss-tolerance-mb", type=float, default=100.0, help="per process")
    p.add_argument("--fd-tolerance", type=int, default=4)
    p.add_argument("--model", default="tiny")
    p.add_argument("--kv-mb", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast-start", action="store_true", help="fork the engine (quicker start)")
    p.add_argument(
        "--out", type=Path, default=Path(f"benchmarks/results/soak-{time.strftime('%Y%m%d-%H%M')}")
    )
    args = p.parse_args()
    result = asyncio.run(run(args))
    result["config"]["out"] = str(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    report(result)
    print(f"written: {args.out / 'results.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
