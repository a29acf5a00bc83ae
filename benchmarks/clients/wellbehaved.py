"""The well-behaved client: GET /health on a fixed schedule and one streaming session after another
(TTFT from the final append to the first delta), measuring what a normal client gets while others
misbehave. ``client_main`` is its command-line form (a JSON config in; ``ready`` once warmed up;
measures until stdin closes; a JSON line out), run in a process of its own so that a blocked server
loop cannot hide its own lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from typing import Any

from .common import QUESTION, TEXT


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
