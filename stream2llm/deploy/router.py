"""vllm-router (PyPI ``vllm-router``, a Rust load balancer) in front of the instances: its command line.

It forwards the OpenAI routes and, through its fallback route, every other path (the session API
included) to the worker its policy picks. ``consistent_hash`` and ``sticky_least_loaded`` both pick
by the ``X-Session-ID`` request header, so every call of one session reaches the instance holding its
KV. On the fallback route it forwards only the path and the body (and Content-Type): no query string,
no ``Authorization``, no ``X-Session-ID``; hence the session API takes the id in the path, or in the
body on open.
"""

from __future__ import annotations

import importlib.util
import sys

ROUTING_POLICIES = ("consistent_hash", "sticky_least_loaded")
HEALTH_INTERVAL_S = 1  # a dead instance leaves the rotation within about a second


def check_installed() -> None:
    """A clear error, before anything starts, when the optional dependency is missing."""
    if importlib.util.find_spec("vllm_router") is None:
        raise RuntimeError("--replicas needs vllm-router: pip install 'stream2llm[replicas]'")


def router_argv(workers: list[str], host: str, port: int, policy: str, metrics_port: int) -> list[str]:
    """The router's command line. Retries are off: an append or update must never reach an
    instance twice (a retry elsewhere would also find no session there)."""
    if policy not in ROUTING_POLICIES:
        raise ValueError(f"unknown routing policy {policy!r}; known: {', '.join(ROUTING_POLICIES)}")
    return [
        sys.executable,
        "-m",
        "vllm_router.launch_router",
        "--worker-urls",
        *workers,
        "--policy",
        policy,
        "--host",
        host,
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
        "--health-check-interval-secs",
        str(HEALTH_INTERVAL_S),
        "--health-failure-threshold",
        "1",
        "--health-check-timeout-secs",
        "2",
        "--request-timeout-secs",
        "3600",  # an SSE stream lasts as long as its session
        "--disable-retries",
    ]
