"""``stream2llm serve --replicas N``: the command's side of the replicated deployment (printing,
how it ends); the processes are ``deploy.replicas``'s."""

from __future__ import annotations

import signal
import sys

from stream2llm.cli.common import console, fail, run_async
from stream2llm.cli.lifecycle import Stopped


def serve_replicas(
    replicas: int, routing: str, host: str, port: int, token: str | None, debug: bool, **instance: object
) -> None:
    """Run N instances behind vllm-router until a signal (status 0 on SIGTERM, as ``serve``)."""
    from stream2llm.deploy.instance_flags import instance_flags
    from stream2llm.deploy.replicas import ReplicaPlan, run_replicas

    if token:
        fail(
            ValueError(
                "--token with --replicas: vllm-router does not forward Authorization on the session "
                "API, so the instances cannot check it; put an authenticating proxy in front instead"
            ),
            debug,
        )
    plan = ReplicaPlan(replicas, host, port, routing, instance_flags(instance))

    def ready(url: str, instances: list) -> None:
        for child in instances:
            console.print(f"{child.name}: {child.url} (pid {child.process.pid})")
        console.print(f"serving {replicas} replicas at [green]{url}[/green] (routing: {routing})")

    def notify(message: str) -> None:
        print(f"stream2llm: {message}", file=sys.stderr, flush=True)

    try:
        console.print(f"starting {replicas} instances ...")
        run_async(run_replicas(plan, ready, notify))
    except Stopped as stop:
        if stop.signal != signal.SIGTERM:
            fail(stop, debug)
        console.print("stopped")
    except Exception as exc:
        fail(exc, debug)
