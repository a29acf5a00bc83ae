"""Resource snapshots of a stream2llm server taken from outside: its GET /metrics (Prometheus text:
sessions, scheduler queues, KV usage) and psutil on its process (RSS, children, descriptors,
connections). Nothing of the server's internals is read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp
import psutil

from .common import MIB

# /metrics name -> snapshot key (the names the soak has always recorded)
GAUGES = {
    "stream2llm_open_sessions": "open_sessions",
    "stream2llm_http_open_sessions": "http_running",
    "stream2llm_kv_usage_ratio": "kv_usage",
    "stream2llm_requests_running": "sched_running",
    "stream2llm_requests_waiting": "sched_waiting",
    "stream2llm_requests_parked": "sched_parked",
    "stream2llm_prompt_tokens_prefilled_total": "tokens_prefilled",
    "stream2llm_preemptions_total": "preemptions",
    "stream2llm_sessions_ended_total": "http_sessions_ended",
}
COUNTS = {"open_sessions", "http_running", "sched_running", "sched_waiting", "sched_parked"}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> value per metric name, summed over its labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def server_metrics(text: str) -> dict[str, Any]:
    """The snapshot's keys from a /metrics answer (counts as ints)."""
    raw = parse_metrics(text)
    out: dict[str, Any] = {}
    for metric, key in GAUGES.items():
        value = raw.get(metric)
        out[key] = int(value) if value is not None and (key in COUNTS or metric.endswith("_total")) else value
    return out


def process_state(pid: int, port: int | None = None, client_pid: int | None = None) -> dict[str, Any]:
    """RSS of the process and of each child, its descriptors; with ``port``, the TCP connections
    accepted on it (and how many of them are ``client_pid``'s)."""
    proc = psutil.Process(pid)
    children = []
    for child in proc.children(recursive=True):
        try:
            children.append({"pid": child.pid, "name": child.name(), "rss_mb": child.memory_info().rss / MIB})
        except psutil.Error:
            continue
    state: dict[str, Any] = {
        "rss_mb": proc.memory_info().rss / MIB,
        "children": children,
        "children_rss_mb": sum(c["rss_mb"] for c in children),
        "fds": proc.num_fds(),
    }
    if port is not None:
        conns = [c for c in proc.net_connections("tcp") if c.laddr and c.laddr.port == port and c.raddr]
        mine: set[int] = set()
        if client_pid is not None:
            with contextlib.suppress(psutil.Error):
                mine = {c.laddr.port for c in psutil.Process(client_pid).net_connections("tcp") if c.laddr}
        state["connections"] = len(conns)
        state["client_connections"] = sum(1 for c in conns if c.raddr.port in mine)
    return state


class ServerProbe:
    """Snapshots of the server at ``url`` running as process ``pid`` (this one, when the server is
    embedded). The process is measured before /metrics is asked, and each scrape's connection is
    closed and given a moment to go, so that the probe never counts itself."""

    SETTLE_S = 0.05

    def __init__(self, url: str, pid: int, port: int | None = None, timeout_s: float = 10.0) -> None:
        self.url, self.pid, self.port, self.timeout_s = url, pid, port, timeout_s
        self.client_pid: int | None = None  # a well-behaved client whose connections are told apart
        self._lock = asyncio.Lock()

    async def metrics(self) -> dict[str, Any]:
        """The /metrics keys (each None when the server did not answer in time)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(force_close=True)
        try:
            async with (
                aiohttp.ClientSession(self.url, timeout=timeout, connector=connector) as http,
                http.get("/metrics") as r,
            ):
                text = await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return {key: None for key in GAUGES.values()}
        return server_metrics(text)

    async def snapshot(self, local: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """The process, ``local()`` (what a caller embedding the server measures in its process, at
        the same moment), then the server's /metrics."""
        async with self._lock:
            state = process_state(self.pid, self.port, self.client_pid)
            state.update(local() if local is not None else {})
            state.update(await self.metrics())
            await asyncio.sleep(self.SETTLE_S)
        return state

    async def health(self) -> dict[str, Any]:
        """GET /health's answer (the model's name, the sessions open over HTTP)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(self.url, timeout=timeout) as http, http.get("/health") as r:
            return await r.json()
