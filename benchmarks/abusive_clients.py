"""Abusive clients against the HTTP server, while a well-behaved client measures what it gets.

The server (tiny-model engine and its HTTP server on 127.0.0.1, embedded through the public API)
runs in this process with a ticker task that measures its event loop's lag. The attackers
(``clients.abuse``) run in a subprocess of this script as raw asyncio sockets:

- slowloris: connections that send a request's headers one byte per second, never ending them;
- trickled bodies: POST /v1/completions with a complete header and a body sent one byte per second;
- SSE readers that never read: streamed completions and session streams on sockets with a small
  receive buffer, never read from (the server's writes back up);
- maximum-size appends: append bodies just under the server's body limit.

Meanwhile the well-behaved client (``clients.wellbehaved``, aiohttp, in a second subprocess) polls
GET /health and runs one streaming session after another, measuring /health latency and TTFT (final
append to first delta). Three phases: quiet (no attackers), attack, settle (attackers gone: do
connections, descriptors, tasks and sessions come back? read with psutil on this process and from
the server's /metrics). Everything observed is recorded, not asserted: ``--check`` asserts only
loop lag p99 < 0.25 s and /health p99 < 0.5 s during the attack.

    .venv/bin/python benchmarks/abusive_clients.py --seconds 180 --out benchmarks/results/abusive-tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.abuse import attacker_main
from clients.common import MIB, summary
from clients.probe import ServerProbe
from clients.wellbehaved import client_main

if TYPE_CHECKING:
    from clients.host import Hosted

TICK_S = 0.02
# what each sample of the server records (psutil on this process, /metrics, the engine's stats)
STATE_KEYS = (
    "connections",
    "client_connections",
    "fds",
    "tasks",
    "rss_mb",
    "open_sessions",
    "http_running",
    "kv_usage",
    "sched_requests",
)


class Observed:
    """The server's side: loop lag, resource samples, and when each phase began (monotonic)."""

    def __init__(self) -> None:
        self.bounds: list[tuple[str, float]] = [("warmup", time.monotonic())]
        self.lag: list[tuple[float, float]] = []
        self.samples: list[dict[str, Any]] = []

    @property
    def phase(self) -> str:
        return self.bounds[-1][0]

    def mark(self, name: str) -> None:
        self.bounds.append((name, time.monotonic()))

    def phase_of(self, t: float) -> str:
        name = self.bounds[0][0]
        for candidate, start in self.bounds:
            if t >= start:
                name = candidate
        return name


async def ticker(obs: Observed) -> None:
    """The server's event-loop lag: how late a TICK_S sleep wakes up."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(TICK_S)
        obs.lag.append((time.monotonic(), loop.time() - t - TICK_S))


async def server_state(probe: ServerProbe, hosted: Hosted) -> dict[str, Any]:
    """Connections on the server's port, descriptors, tasks, RSS (this process: the server's),
    sessions and KV (its /metrics), the scheduler's requests (``engine.stats()``)."""

    def local() -> dict[str, Any]:
        return {"tasks": len(asyncio.all_tasks()), "sched_requests": hosted.engine.stats().requests}

    state = await probe.snapshot(local)
    state["rss_mb"] = round(state["rss_mb"], 1)
    if state["kv_usage"] is not None:
        state["kv_usage"] = round(state["kv_usage"], 4)
    return {k: state[k] for k in STATE_KEYS}


async def sampler(obs: Observed, probe: ServerProbe, hosted: Hosted) -> None:
    t0 = obs.bounds[0][1]
    while True:
        state = {
            "t_s": round(time.monotonic() - t0, 1),
            "phase": obs.phase,
            **await server_state(probe, hosted),
        }
        obs.samples.append(state)
        recent = [lag for t, lag in obs.lag[-200:] if t > time.monotonic() - 1.5]
        print(
            f"[{obs.phase:6} {state['t_s']:6.1f}s] conns={state['connections']} "
            f"(client {state['client_connections']}) fds={state['fds']} "
            f"tasks={state['tasks']} open={state['open_sessions']} kv={state['kv_usage'] or 0:.3f} "
            f"lag_max={max(recent, default=0) * 1000:.0f}ms rss={state['rss_mb']:.0f}MiB",
            flush=True,
        )
        await asyncio.sleep(1.0)


async def spawn(mode: str, cfg: dict[str, Any], stdin: bool = False) -> Any:
    """This script as a subprocess in ``mode`` (--attacker or --client)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        mode,
        json.dumps(cfg),
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
    )


async def last_json(proc: Any, timeout_s: float) -> dict[str, Any]:
    """The JSON line a subprocess prints last; kills it if it does not end in time."""
    try:
        out = await asyncio.wait_for(proc.stdout.read(), timeout_s)
        await asyncio.wait_for(proc.wait(), 10)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"error": "did not stop in time; killed"}
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exited {proc.returncode}"}
    return json.loads(lines[-1])


PHASES = ("quiet", "attack", "settle")


def phase_report(obs: Observed, client: dict[str, Any], name: str) -> dict[str, Any]:
    samples = [s for s in obs.samples if s["phase"] == name]
    keys = ("connections", "client_connections", "fds", "tasks", "open_sessions", "rss_mb")
    health = [h for h in client.get("health", []) if obs.phase_of(h[0]) == name]
    outcomes: dict[str, int] = {}
    for h in health:
        outcomes[h[2]] = outcomes.get(h[2], 0) + 1
    errors: dict[str, int] = {}
    for t, label in client.get("session_errors", []):
        if obs.phase_of(t) == name:
            errors[label] = errors.get(label, 0) + 1
    bounds = dict(obs.bounds)
    return {
        "seconds": round(obs.bounds[[b[0] for b in obs.bounds].index(name) + 1][1] - bounds[name], 1),
        "loop_lag_ms": summary([lag for t, lag in obs.lag if obs.phase_of(t) == name], 1000),
        "health_ms": summary([h[1] for h in health if h[1] is not None], 1000),
        "health_outcomes": outcomes,
        "session_ttft_ms": summary([v for t, v in client.get("ttft", []) if obs.phase_of(t) == name], 1000),
        "session_errors": errors,
        "peak": {k: max((s[k] for s in samples if s[k] is not None), default=None) for k in keys},
        "last": samples[-1] if samples else None,
    }


def attack_config(args: argparse.Namespace, hosted: Hosted, model: str) -> dict[str, Any]:
    """What the attacker subprocess is told: where the server is, how many of each attack."""
    return {
        "host": "127.0.0.1",
        "port": hosted.port,
        "seconds": args.seconds,
        "model": model,
        "slowloris": args.slowloris,
        "trickle": args.trickle,
        "stall": args.stall,
        "stall_tokens": args.stall_tokens,
        "appenders": args.appenders,
        "max_appends": args.max_appends,
        "max_body": args.max_body or hosted.max_body,
    }


async def start(args: argparse.Namespace) -> Hosted:
    from clients.host import host

    from stream2llm import EngineConfig
    from stream2llm.server import ServerSettings

    config = EngineConfig(
        model=args.model,
        kv_cache_bytes=512 * MIB,
        max_model_len=4096,
        session_ttl_s=60.0,
        fast_start=args.fast_start,
    )
    return await host(config, ServerSettings())


async def run_phases(
    args: argparse.Namespace, obs: Observed, probe: ServerProbe, hosted: Hosted, cfg: dict[str, Any]
) -> dict[str, Any]:
    """Quiet, attack, settle; then every client gone: what each side saw."""
    client_cfg = {
        "url": hosted.url,
        "health_every_s": args.health_every_s,
        "session_pause_s": args.session_pause_s,
        "max_s": args.quiet_s + args.seconds + args.settle_s + 120,
    }
    good = await spawn("--client", client_cfg, stdin=True)
    probe.client_pid = good.pid
    line = await asyncio.wait_for(good.stdout.readline(), 180)
    if line.strip() != b"ready":
        raise RuntimeError(f"the well-behaved client did not start: {line!r}")
    obs.mark("quiet")
    await asyncio.sleep(args.quiet_s)
    obs.mark("attack")
    attacked = await last_json(await spawn("--attacker", cfg), args.seconds + 90)
    obs.mark("settle")
    await asyncio.sleep(args.settle_s)
    obs.mark("end")
    good.stdin.close()
    measured = await last_json(good, 60)
    await asyncio.sleep(1.0)  # the server closes the client's keep-alive connections
    probe.client_pid = None
    return {"measured": measured, "attacked": attacked, "after": await server_state(probe, hosted)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from stream2llm.workloads.bench import machine

    t_start = time.time()
    hosted = await start(args)
    seen: dict[str, Any] = {"measured": {}, "attacked": {}, "after": {}}
    obs = Observed()
    try:
        probe = hosted.probe(with_port=True)
        cfg = attack_config(args, hosted, (await probe.health())["model"])
        background = [
            asyncio.ensure_future(ticker(obs)),
            asyncio.ensure_future(sampler(obs, probe, hosted)),
        ]
        try:
            seen = await run_phases(args, obs, probe, hosted, cfg)
        finally:
            await stop(background)
    finally:
        await hosted.close()
    return {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
        "wall_s": round(time.time() - t_start, 1),
        "config": {**vars(args), "attackers": cfg},
        **outcome(obs, seen),
    }


async def stop(background: list[asyncio.Future]) -> None:
    for task in background:
        task.cancel()
    for outcome in await asyncio.gather(*background, return_exceptions=True):
        if not isinstance(outcome, asyncio.CancelledError):
            print(f"a background task failed: {outcome!r}", file=sys.stderr)


def outcome(obs: Observed, seen: dict[str, Any]) -> dict[str, Any]:
    """Per phase what both sides saw, the attackers' reports, and the checks."""
    measured = seen["measured"]
    phases = {name: phase_report(obs, measured, name) for name in PHASES}
    attack = phases["attack"]
    checks = {
        "loop_lag_p99_s": {"value": (attack["loop_lag_ms"].get("p99") or 0) / 1000, "limit": 0.25},
        "health_p99_s": {"value": (attack["health_ms"].get("p99") or 0) / 1000, "limit": 0.5},
    }
    for c in checks.values():
        c["ok"] = c["value"] < c["limit"]
    return {
        "phases": phases,
        "after_client_left": seen["after"],
        "attackers": seen["attacked"],
        "client_error": measured.get("error"),
        "checks": checks,
        "samples": obs.samples,
    }


def report(result: dict[str, Any]) -> None:
    print(
        "\nphase    loop lag ms p50/p99/max       /health ms p50/p99/max     TTFT ms p50/p99 (n)   "
        "peak conns(client)/fds/tasks/open/rss"
    )
    for name, p in result["phases"].items():
        lag, h, tt, pk = p["loop_lag_ms"], p["health_ms"], p["session_ttft_ms"], p["peak"]
        print(
            f"{name:8} {lag.get('p50')}/{lag.get('p99')}/{lag.get('max')}".ljust(40)
            + f"{h.get('p50')}/{h.get('p99')}/{h.get('max')} ".ljust(27)
            + f"{tt.get('p50')}/{tt.get('p99')} ({tt.get('n')}) ".ljust(22)
            + f"{pk['connections']}({pk['client_connections']})/"
            + "/".join(str(pk[k]) for k in ("fds", "tasks", "open_sessions", "rss_mb"))
        )
        odd = {k: v for k, v in p["health_outcomes"].items() if k != "ok"}
        if odd or p["session_errors"]:
            print(f"         not ok: health {odd} sessions {p['session_errors']}")
    quiet, settle = result["phases"]["quiet"]["last"], result["phases"]["settle"]["last"]
    if quiet and settle:
        print("end of quiet -> end of settle (connections exclude the well-behaved client's):")
        for key in ("connections", "fds", "tasks", "open_sessions", "http_running", "kv_usage", "rss_mb"):
            before, after = quiet[key], settle[key]
            if key == "connections":
                before, after = before - quiet["client_connections"], after - settle["client_connections"]
            print(f"  {key:14} {before} -> {after}")
    if quiet and result["after_client_left"]:
        after = result["after_client_left"]
        print("end of quiet -> every client gone:")
        for key in ("connections", "fds", "tasks", "open_sessions", "kv_usage", "rss_mb"):
            print(f"  {key:14} {quiet[key]} -> {after[key]}")
    print("\nattackers:")
    for name, a in result["attackers"].get("attacks", {}).items():
        print(f"  {name:15} {json.dumps(a)}")
    trouble = result["attackers"].get("error") or result["attackers"].get("crashed") or result["client_error"]
    if trouble:
        print(f"  trouble: {trouble}")
    for name, c in result["checks"].items():
        print(f"check {name}: {c['value']:.3f} (limit {c['limit']}) {'ok' if c['ok'] else 'OVER'}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("--attacker", "--client"):
        return (attacker_main if sys.argv[1] == "--attacker" else client_main)(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=150.0, help="the attack phase")
    p.add_argument("--quiet-s", type=float, default=20.0, help="before the attack: the reference")
    p.add_argument("--settle-s", type=float, default=20.0, help="after the attack")
    p.add_argument("--slowloris", type=int, default=200, help="connections")
    p.add_argument("--trickle", type=int, default=32, help="connections")
    p.add_argument("--stall", type=int, default=8, help="SSE readers that never read")
    p.add_argument("--stall-tokens", type=int, default=2000, help="max_tokens of each stalled stream")
    p.add_argument("--appenders", type=int, default=2, help="loops of maximum-size appends")
    p.add_argument("--max-appends", type=int, default=500, help="bound per appender loop")
    p.add_argument("--max-body", type=int, default=None, help="default: the server's max_body_bytes")
    p.add_argument("--health-every-s", type=float, default=0.1)
    p.add_argument("--session-pause-s", type=float, default=0.3)
    p.add_argument("--model", default="tiny")
    p.add_argument("--fast-start", action="store_true")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if attack-phase loop lag p99 >= 0.25 s or /health p99 >= 0.5 s",
    )
    default_out = Path(f"benchmarks/results/abusive-{time.strftime('%Y%m%d-%H%M')}")
    p.add_argument("--out", type=Path, default=default_out)
    args = p.parse_args()
    result = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    report(result)
    print(f"written: {args.out / 'results.json'}")
    if args.check and not all(c["ok"] for c in result["checks"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
