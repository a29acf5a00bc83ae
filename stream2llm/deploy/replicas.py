"""``stream2llm serve --replicas N``: N ``stream2llm serve`` processes (one vLLM engine each) on
loopback ports behind vllm-router, supervised.

The supervisor only starts, watches and stops processes; requests never pass through it. An
instance that dies fails only its own sessions (the router answers 502 and, once its health check
drops the instance, the survivors answer 404 for those ids); the others carry on. The deployment
ends when the router dies, when every instance died, or on a signal: then every process is stopped
(SIGTERM, then SIGKILL), and children also get SIGTERM if this process is killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from stream2llm.deploy.router import ROUTING_POLICIES, check_installed, router_argv

STOP_GRACE_S = 8.0  # SIGTERM, then SIGKILL: within the CLI's own 10 s grace
PR_SET_PDEATHSIG = 1

Notify = Callable[[str], None]


@dataclass(frozen=True)
class ReplicaPlan:
    replicas: int
    host: str = "127.0.0.1"  # where the router listens
    port: int = 8000  # the router's port (0: any free port)
    routing: str = "consistent_hash"
    serve_args: tuple[str, ...] = ()  # passed to every ``stream2llm serve`` (deploy.instance_flags)
    startup_timeout_s: float = 900.0


@dataclass
class Child:
    name: str
    url: str
    process: asyncio.subprocess.Process
    waiter: asyncio.Task = field(init=False)

    def __post_init__(self) -> None:
        self.waiter = asyncio.ensure_future(self.process.wait())


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held together while chosen, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the supervisor dies, even by SIGKILL (no orphans)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def spawn(name: str, url: str, argv: list[str], cpus: str | None = None) -> Child:
    """Start a child in a process group of its own: stopping it stops what it started too, even
    after it died without stopping its own children (vLLM's engine processes, say). ``cpus``: the
    CPU cores its vLLM engine binds its threads to (vLLM's ``VLLM_CPU_OMP_THREADS_BIND``)."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cpus} if cpus else None
    process = await asyncio.create_subprocess_exec(*argv, preexec_fn=preexec, start_new_session=True, env=env)
    return Child(name, url, process)


def cpus_for(variable: str, index: int) -> str | None:
    """CPU engines: the cores of instance ``index`` from ``variable`` ("0-3|4-7": instance 0 on
    cores 0-3, instance 1 on 4-7). Engines that share cores thrash: vLLM's OpenMP threads spin in
    their barriers while another engine's threads hold the core (measured on 2 cores: ~10x slower)."""
    parts = [p for p in os.environ.get(variable, "").split("|") if p]
    return parts[index % len(parts)] if parts else None


def _signal_group(child: Child, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.process.pid, signum)


async def wait_healthy(child: Child, path: str, timeout_s: float) -> None:
    """Poll ``child.url + path`` until 200; RuntimeError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if child.waiter.done():
                status = child.process.returncode
                raise RuntimeError(f"{child.name} exited with status {status} while starting")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(child.url + path) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{child.name} not healthy after {timeout_s:.0f} s")


async def stop_all(children: list[Child], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every child's process group, SIGKILL what is left of it after ``grace_s`` (or at
    once, for a child that already exited: what is left of its group was orphaned)."""
    running = [c for c in children if c.process.returncode is None]
    for child in running:
        _signal_group(child, signal.SIGTERM)
    if running:
        await asyncio.wait([c.waiter for c in running], timeout=grace_s)
    for child in children:
        _signal_group(child, signal.SIGKILL)
    await asyncio.gather(*(c.waiter for c in children), return_exceptions=True)


async def watch(instances: list[Child], router: Child, notify: Notify) -> None:
    """Return never; RuntimeError when the router or the last instance exits. An instance that
    exits is reported and left out (the router's health check drops it)."""
    alive = {c.waiter: c for c in instances}
    while True:
        done, _ = await asyncio.wait([router.waiter, *alive], return_when=asyncio.FIRST_COMPLETED)
        if router.waiter in done:
            raise RuntimeError(f"the router exited with status {router.process.returncode}")
        for waiter in done:
            child = alive.pop(waiter)
            _signal_group(child, signal.SIGKILL)  # its engine processes, orphaned
            notify(
                f"{child.name} ({child.url}, pid {child.process.pid}) exited with status "
                f"{child.process.returncode}: its sessions fail, the others go on"
            )
        if not alive:
            raise RuntimeError("every instance exited")


def instance_argv(plan: ReplicaPlan, port: int) -> list[str]:
    """One instance's command line: ``stream2llm serve`` with the plan's flags, on a loopback port."""
    argv = [sys.executable, "-m", "stream2llm", "serve", *plan.serve_args]
    return argv + ["--host", "127.0.0.1", "--port", str(port)]


async def run_replicas(
    plan: ReplicaPlan, on_ready: Callable[[str, list[Child]], None], notify: Notify
) -> None:
    """Start the instances, then the router once all are healthy; supervise until stopped."""
    check_installed()
    if plan.replicas < 1:
        raise ValueError("--replicas must be at least 1")
    if plan.routing not in ROUTING_POLICIES:
        raise ValueError(f"unknown --routing {plan.routing!r}; known: {', '.join(ROUTING_POLICIES)}")
    ports = free_ports(plan.replicas)
    children: list[Child] = []
    try:
        for i, port in enumerate(ports):
            argv = instance_argv(plan, port)
            cpus = cpus_for("STREAM2LLM_REPLICA_CPUS", i)
            children.append(await spawn(f"instance {i}", f"http://127.0.0.1:{port}", argv, cpus))
        instances = list(children)
        await asyncio.gather(*(wait_healthy(c, "/health", plan.startup_timeout_s) for c in instances))
        # chosen now, not before the instances' minute-long start: their engines take free ports too
        router_port, metrics_port = free_ports(2)
        router_port = plan.port or router_port
        argv = router_argv([c.url for c in instances], plan.host, router_port, plan.routing, metrics_port)
        shown = f"[{plan.host}]" if ":" in plan.host else plan.host
        router = await spawn("router", f"http://{shown}:{router_port}", argv)
        children.append(router)
        await wait_healthy(router, "/readiness", 60.0)
        on_ready(router.url, instances)
        await watch(instances, router, notify)
    finally:
        await asyncio.shield(stop_all(children))
