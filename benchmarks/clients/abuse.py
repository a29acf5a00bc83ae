"""Abusive clients, as raw asyncio sockets against a server at host:port:

- slowloris: connections that send a request's headers one byte per second, never ending them;
- trickled bodies: POST /v1/completions with a complete header and a body sent one byte per second;
- SSE readers that never read: streamed completions and session streams on sockets with a small
  receive buffer, never read from (the server's writes back up);
- maximum-size appends: append bodies just under the server's body limit.

``attackers(cfg)`` runs them all at once and reports what each saw (how many opened, how and when
the server ended them); ``attacker_main`` is its command-line form (a JSON config in, a JSON line
out), run in a process of its own so that the attackers never share the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

from .common import MIB, QUESTION, filler, summary


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
