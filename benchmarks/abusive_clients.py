"""Abusive clients against the HTTP server, while a well-behaved client measures what it gets.

The server (tiny-model engine, ``create_app`` + ``start_site`` on 127.0.0.1) runs in this process
with a ticker task that measures its event loop's lag. The attackers run in a subprocess of this
script as raw asyncio sockets:

- slowloris: connections that send a request's headers one byte per second, never ending them;
- trickled bodies: POST /v1/completions with a complete header and a body sent one byte per second;
- SSE readers that never read: streamed completions and session streams on sockets with a small
  receive buffer, never read from (the server's writes back up);
- maximum-size appends: append bodies just under the server's body limit.

Meanwhile the well-behaved client (aiohttp, in this process) polls GET /health and runs one
streaming session after another, measuring /health latency and TTFT (final append to first delta).
Three phases: quiet (no attackers), attack, settle (attackers gone: do connections, descriptors,
tasks and sessions come back?). Everything observed is recorded, not asserted: ``--check`` asserts
only loop lag p99 < 0.25 s and /health p99 < 0.5 s during the attack.

    .venv/bin/python benchmarks/abusive_clients.py --seconds 180 --out benchmarks/results/abusive-tiny
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

TEXT = "\n\n".join(topics[k] for k in sorted(topics))
QUESTION = "What does the documentation say about this?"
TICK_S = 0.02
MIB = 1 << 20


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summary(values: list[float], scale: float = 1.0) -> dict[str, Any]:
    """n, p50, p99, max (times ``scale``: 1000 for milliseconds)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(pct(values, 50) * scale, 3),
        "p99": round(pct(values, 99) * scale, 3),
        "max": round(max(values) * scale, 3),
        "mean": round(statistics.fmean(values) * scale, 3),
    }


def filler(n_bytes: int) -> str:
    """English text of about ``n_bytes`` (Python's help topics, repeated)."""
    reps = n_bytes // len(TEXT) + 1
    return (TEXT * reps)[:n_bytes]


# == the attackers (a subprocess) =====================================================================


class Attack:
    """One kind of abusive connection: how many opened, how the server ended them, what it said."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.opened = 0
        self.closed_by_server: list[float] = []  # seconds each lived before the server closed it
        self.statuses: dict[str, int] = {}
        self.survived = 0  # still open when the attack ended: the server never closed them
        self.errors: dict[str, int] = {}
        self.latencies: list[float] = []
        self.received: list[float] = []  # bytes a never-reading client had been sent by the end

    def status(self, label: str) -> None:
        self.statuses[label] = self.statuses.get(label, 0) + 1

    def error(self, exc: BaseException) -> None:
        key = type(exc).__name__
        self.errors[key] = self.errors.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "opened": self.opened,
            "closed_by_server": len(self.closed_by_server),
            "lived_before_close_s": summary(self.closed_by_server),
            "open_at_deadline": self.survived,
            "statuses": self.statuses,
            "errors": self.errors,
            "latency_s": summary(self.latencies),
            "bytes_received_at_end": summary(self.received),
        }


def status_of(data: bytes) -> str:
    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = line.split(" ")
    return parts[1] if len(parts) > 1 and line.startswith("HTTP/") else "no-status"


def head(method: str, path: str, host: str, length: int | None = None, extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


async def request(addr: tuple[str, int], method: str, path: str, body: bytes = b"") -> tuple[str, bytes]:
    """One request on its own connection (Connection: close): (status, response body)."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        host = f"{addr[0]}:{addr[1]}"
        writer.write(head(method, path, host, len(body), "Connection: close\r\n") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), 120)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return status_of(data), data.partition(b"\r\n\r\n")[2]


async def drip(
    attack: Attack, addr: tuple[str, int], first: bytes, drip_bytes: bytes, deadline: float
) -> None:
    """Connections that send ``first`` at once and then ``drip_bytes`` one byte per second; reopened
    when the server closes them, until ``deadline``."""
    while time.monotonic() < deadline:
        t_open = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(*addr)
        except OSError as exc:
            attack.error(exc)
            await asyncio.sleep(1.0)
            continue
        attack.opened += 1
        answer = asyncio.ensure_future(reader.read(4096))
        try:
            writer.write(first)
            for i in range(len(drip_bytes)):
                if answer.done() or time.monotonic() >= deadline:
                    break
                writer.write(drip_bytes[i : i + 1])
                await writer.drain()
                await asyncio.wait({answer}, timeout=1.0)
        except OSError as exc:
            attack.error(exc)
        if not answer.done() and time.monotonic() >= deadline:
            attack.survived += 1
        if answer.done() and not answer.cancelled() and answer.exception() is None:
            attack.closed_by_server.append(time.monotonic() - t_open)
            attack.status(status_of(answer.result()) if answer.result() else "closed")
        elif answer.done() and answer.exception() is not None:
            attack.closed_by_server.append(time.monotonic() - t_open)
            attack.error(answer.exception())
        answer.cancel()
        writer.close()
        await asyncio.sleep(0.1)


def slowloris(attack: Attack, addr: tuple[str, int], deadline: float) -> Any:
    host = f"{addr[0]}:{addr[1]}"
    pad = "".join(f"X-Pad-{i}: {'a' * 40}\r\n" for i in range(200))
    return drip(attack, addr, b"GET /health HTTP/1.1\r\n", f"Host: {host}\r\n{pad}\r\n".encode(), deadline)


def trickle(attack: Attack, addr: tuple[str, int], deadline: float, model: str) -> Any:
    body = json.dumps({"model": model, "prompt": filler(4000), "max_tokens": 4}).encode()
    return drip(
        attack, addr, head("POST", "/v1/completions", f"{addr[0]}:{addr[1]}", len(body)), body, deadline
    )


async def stalled_reader(
    attack: Attack, addr: tuple[str, int], deadline: float, cfg: dict[str, Any], session: bool
) -> None:
    """A streamed answer requested on a socket with a small receive buffer, never read until the end:
    a session stream or a streamed completion."""
    loop = asyncio.get_running_loop()
    if session:
        opened = {"question": QUESTION, "max_tokens": cfg["stall_tokens"], "ignore_eos": True}
        status, body = await request(addr, "POST", "/v1/sessions", json.dumps(opened).encode())
        if status != "201":
            attack.status(f"open:{status}")
            return
        session_id = json.loads(body)["id"]
        final = json.dumps({"text": filler(400), "final": True}).encode()
        status, _ = await request(addr, "POST", f"/v1/sessions/{session_id}/append", final)
        attack.status(f"append:{status}")
        raw = head("GET", f"/v1/sessions/{session_id}/stream", f"{addr[0]}:{addr[1]}")
    else:
        body = json.dumps(
            {
                "model": cfg["model"],
                "prompt": filler(400),
                "max_tokens": cfg["stall_tokens"],
                "ignore_eos": True,
                "stream": True,
            }
        ).encode()
        raw = head("POST", "/v1/completions", f"{addr[0]}:{addr[1]}", len(body)) + body
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    attack.opened += 1
    try:
        await loop.sock_connect(sock, addr)
        await loop.sock_sendall(sock, raw)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))  # never read
        got, closed = await read_rest(loop, sock)
        attack.survived += not closed
        attack.status(f"{'closed' if closed else 'open'}-at-end:{status_of(got)}")
        attack.received.append(len(got))
    except OSError as exc:
        attack.error(exc)
    finally:
        sock.close()


async def read_rest(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, bool]:
    """What the server wrote (up to 8 MiB, for 1 s), and whether it had closed the connection."""
    got = bytearray()
    end = time.monotonic() + 1.0
    while time.monotonic() < end and len(got) < 8 * MIB:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), max(0.01, end - time.monotonic()))
        except asyncio.TimeoutError:
            return bytes(got), False
        except OSError:
            return bytes(got), True
        if not chunk:
            return bytes(got), True
        got += chunk
    return bytes(got), False


async def max_appends(attack: Attack, addr: tuple[str, int], deadline: float, cfg: dict[str, Any]) -> None:
    """Open a session, append a body just under the server's limit, delete it; repeat."""
    text = filler(cfg["max_body"] - 64)
    body = json.dumps({"text": text})
    body = body[: cfg["max_body"] - 16 - 2] + '"}' if len(body) > cfg["max_body"] - 16 else body
    payload = body.encode()
    for _ in range(cfg["max_appends"]):
        if time.monotonic() >= deadline:
            return
        try:
            opened = json.dumps({"question": QUESTION, "max_tokens": 2}).encode()
            status, data = await request(addr, "POST", "/v1/sessions", opened)
            if status != "201":
                attack.status(f"open:{status}")
                await asyncio.sleep(0.5)
                continue
            sid = json.loads(data)["id"]
            attack.opened += 1
            t = time.monotonic()
            status, _ = await request(addr, "POST", f"/v1/sessions/{sid}/append", payload)
            attack.latencies.append(time.monotonic() - t)
            attack.status(f"append:{status}")
            await request(addr, "DELETE", f"/v1/sessions/{sid}")
        except (OSError, asyncio.TimeoutError) as exc:
            attack.error(exc)
            await asyncio.sleep(0.5)


async def attackers(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every attack at once until ``seconds`` pass; what each saw."""
    addr = (cfg["host"], cfg["port"])
    deadline = time.monotonic() + cfg["seconds"]
    attacks = {k: Attack(k) for k in ("slowloris", "trickle", "sse_never_read", "max_appends")}
    tasks = []

    async def ramp(i: int, n: int, coro_fn: Any) -> None:
        await asyncio.sleep(min(5.0, cfg["seconds"] / 4) * i / max(1, n))  # spread the opening
        await coro_fn()

    for i in range(cfg["slowloris"]):
        tasks.append(ramp(i, cfg["slowloris"], lambda: slowloris(attacks["slowloris"], addr, deadline)))
    for i in range(cfg["trickle"]):
        tasks.append(
            ramp(i, cfg["trickle"], lambda: trickle(attacks["trickle"], addr, deadline, cfg["model"]))
        )
    for i in range(cfg["stall"]):
        fn = lambda s=i % 2 == 1: stalled_reader(attacks["sse_never_read"], addr, deadline, cfg, s)  # noqa: E731
        tasks.append(ramp(i, cfg["stall"], fn))
    for i in range(cfg["appenders"]):
        tasks.append(
            ramp(i, cfg["appenders"], lambda: max_appends(attacks["max_appends"], addr, deadline, cfg))
        )
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), cfg["seconds"] + 60)
    crashed = [repr(r) for r in results if isinstance(r, BaseException)]
    return {"attacks": {k: a.as_dict() for k, a in attacks.items()}, "crashed": crashed[:10]}


def attacker_main(cfg_json: str) -> int:
    cfg = json.loads(cfg_json)
    result = asyncio.run(attackers(cfg))
    print(json.dumps(result), flush=True)
    return 0


# == the well-behaved client (a subprocess, so that a blocked server loop cannot hide its own lag) ==


async def probe(http: Any, records: list[list[Any]]) -> None:
    """One GET /health: [sent at (monotonic, shared by every process), seconds, outcome]."""
    t = time.monotonic()
    try:
        async with http.get("/health") as r:
            await r.read()
            label = "ok" if r.status == 200 else f"HTTP {r.status}"
    except Exception as exc:
        label = type(exc).__name__
    records.append([t, time.monotonic() - t, label])


async def health_probes(http: Any, every_s: float, stop: asyncio.Event, records: list[list[Any]]) -> None:
    """Probes on a fixed schedule, not one after another: a stalled server shows as many slow probes
    rather than as one (no coordinated omission)."""
    in_flight: set[asyncio.Task] = set()
    while not stop.is_set():
        if len(in_flight) < 200:
            task = asyncio.ensure_future(probe(http, records))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        else:
            records.append([time.monotonic(), None, "skipped: 200 in flight"])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    if in_flight:
        await asyncio.wait(in_flight, timeout=40)


async def one_session(http: Any, rng: random.Random) -> tuple[float, float]:
    """Open a streaming session, append two pieces, read its stream: (final sent at, TTFT)."""
    opened = {"question": QUESTION, "max_tokens": 8, "ignore_eos": True}
    async with http.post("/v1/sessions", json=opened) as r:
        body = await r.json()
        if r.status != 201:
            raise RuntimeError(f"open: HTTP {r.status}")
    sid = body["id"]
    start = rng.randrange(0, len(TEXT) - 2000)
    for k in range(2):
        async with http.post(f"/v1/sessions/{sid}/append", json={"text": TEXT[start + k * 600 :][:600]}) as r:
            if r.status != 200:
                raise RuntimeError(f"append: HTTP {r.status}")
        await asyncio.sleep(0.05)
    first: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def read() -> None:
        async with http.get(f"/v1/sessions/{sid}/stream") as r:
            async for line in r.content:
                if line.startswith(b"data: ") and not first.done():
                    first.set_result(time.monotonic())

    reader = asyncio.ensure_future(read())
    await asyncio.sleep(0.05)
    t_final = time.monotonic()
    async with http.post(f"/v1/sessions/{sid}/finish") as r:
        if r.status != 200:
            raise RuntimeError(f"finish: HTTP {r.status}")
    await reader
    if not first.done():
        raise RuntimeError("the stream ended without a delta")
    return t_final, first.result() - t_final


async def session_loop(http: Any, pause_s: float, stop: asyncio.Event, out: dict[str, list]) -> None:
    rng = random.Random(0)
    while not stop.is_set():
        t = time.monotonic()
        try:
            out["ttft"].append(list(await asyncio.wait_for(one_session(http, rng), 30)))
        except Exception as exc:
            out["session_errors"].append([t, f"{type(exc).__name__}: {exc}"[:80]])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), pause_s)


async def client(cfg: dict[str, Any]) -> dict[str, Any]:
    """Warm up, say ``ready``, then measure until stdin closes (or ``max_s`` passes)."""
    import aiohttp

    out: dict[str, list] = {"health": [], "ttft": [], "session_errors": []}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=300)
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        cfg["url"], headers=headers, timeout=timeout, connector=connector
    ) as http:
        rng = random.Random(1)
        for _ in range(3):
            with contextlib.suppress(Exception):
                await one_session(http, rng)
        print("ready", flush=True)
        stdin_closed = loop.run_in_executor(None, sys.stdin.buffer.read)
        stdin_closed.add_done_callback(lambda _: stop.set())
        loop.call_later(cfg["max_s"], stop.set)
        await asyncio.gather(
            health_probes(http, cfg["health_every_s"], stop, out["health"]),
            session_loop(http, cfg["session_pause_s"], stop, out),
        )
    return out


def client_main(cfg_json: str) -> int:
    result = asyncio.run(client(json.loads(cfg_json)))
    print(json.dumps(result), flush=True)
    return 0


# == the server and its ticker (this process) ========================================================


class Observed:
    """The server's side: loop lag, resource samples, and when each phase began (monotonic)."""

    def __init__(self) -> None:
        self.bounds: list[tuple[str, float]] = [("warmup", time.monotonic())]
        self.lag: list[tuple[float, float]] = []
        self.samples: list[dict[str, Any]] = []
        self.client_pid: int | None = None

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


def server_state(engine: Any, server: Any, port: int, client_pid: int | None) -> dict[str, Any]:
    import psutil

    proc = psutil.Process()
    conns = [c for c in proc.net_connections("tcp") if c.laddr and c.laddr.port == port and c.raddr]
    mine: set[int] = set()
    if client_pid is not None:
        with contextlib.suppress(psutil.Error):
            mine = {c.laddr.port for c in psutil.Process(client_pid).net_connections("tcp") if c.laddr}
    stats = engine.stats()
    return {
        "connections": len(conns),
        "client_connections": sum(1 for c in conns if c.raddr.port in mine),  # the well-behaved client's
        "fds": proc.num_fds(),
        "tasks": len(asyncio.all_tasks()),
        "rss_mb": round(proc.memory_info().rss / MIB, 1),
        "open_sessions": len(engine.open_sessions()),
        "http_running": server.running(),
        "kv_usage": round(stats.kv_usage, 4),
        "sched_requests": stats.requests,
    }


async def sampler(obs: Observed, engine: Any, server: Any, port: int) -> None:
    t0 = obs.bounds[0][1]
    while True:
        state = {
            "t_s": round(time.monotonic() - t0, 1),
            "phase": obs.phase,
            **server_state(engine, server, port, obs.client_pid),
        }
        obs.samples.append(state)
        recent = [lag for t, lag in obs.lag[-200:] if t > time.monotonic() - 1.5]
        print(
            f"[{obs.phase:6} {state['t_s']:6.1f}s] conns={state['connections']} "
            f"(client {state['client_connections']}) fds={state['fds']} "
            f"tasks={state['tasks']} open={state['open_sessions']} kv={state['kv_usage']:.3f} "
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
        "peak": {k: max((s[k] for s in samples), default=None) for k in keys},
        "last": samples[-1] if samples else None,
    }


async def start_engine(args: argparse.Namespace) -> Any:
    from stream2llm.engine.engine import EngineConfig, StreamingEngine

    config = EngineConfig(
        model=args.model,
        kv_cache_bytes=512 * MIB,
        max_model_len=4096,
        session_ttl_s=60.0,
        fast_start=args.fast_start,
    )
    return await StreamingEngine.start(config)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from stream2llm.server.app import ServerSettings, create_app, start_site
    from stream2llm.server.registry import SERVER
    from stream2llm.workloads.bench import machine

    t_start = time.time()
    engine = await start_engine(args)
    app = create_app(engine, ServerSettings())
    server = app[SERVER]
    runner, url = await start_site(app, "127.0.0.1", 0)
    port = int(url.rsplit(":", 1)[1])
    max_body = args.max_body or int(getattr(server.settings, "max_body_bytes", 4 * MIB))
    cfg = {
        "host": "127.0.0.1",
        "port": port,
        "seconds": args.seconds,
        "model": server.model_name,
        "slowloris": args.slowloris,
        "trickle": args.trickle,
        "stall": args.stall,
        "stall_tokens": args.stall_tokens,
        "appenders": args.appenders,
        "max_appends": args.max_appends,
        "max_body": max_body,
    }
    total_s = args.quiet_s + args.seconds + args.settle_s
    client_cfg = {
        "url": url,
        "health_every_s": args.health_every_s,
        "session_pause_s": args.session_pause_s,
        "max_s": total_s + 120,
    }
    obs = Observed()
    background = [
        asyncio.ensure_future(ticker(obs)),
        asyncio.ensure_future(sampler(obs, engine, server, port)),
    ]
    measured: dict[str, Any] = {}
    after: dict[str, Any] = {}
    attacked: dict[str, Any] = {}
    try:
        good = await spawn("--client", client_cfg, stdin=True)
        obs.client_pid = good.pid
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
        after = server_state(engine, server, port, None)
    finally:
        for task in background:
            task.cancel()
        for outcome in await asyncio.gather(*background, return_exceptions=True):
            if not isinstance(outcome, asyncio.CancelledError):
                print(f"a background task failed: {outcome!r}", file=sys.stderr)
        await runner.cleanup()
        await engine.shutdown()
    phases = {name: phase_report(obs, measured, name) for name in PHASES}
    attack = phases["attack"]
    checks = {
        "loop_lag_p99_s": {"value": (attack["loop_lag_ms"].get("p99") or 0) / 1000, "limit": 0.25},
        "health_p99_s": {"value": (attack["health_ms"].get("p99") or 0) / 1000, "limit": 0.5},
    }
    for c in checks.values():
        c["ok"] = c["value"] < c["limit"]
    return {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
        "wall_s": round(time.time() - t_start, 1),
        "config": {**vars(args), "attackers": cfg},
        "phases": phases,
        "after_client_left": after,
        "attackers": attacked,
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
