"""What every bench needs besides the replay: the trace's requests in the chosen layout, and the
machine the bench ran on (for its results). The ``bench`` command itself is ``cli.bench_runner``."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from stream2llm.context.layout import layout_named
from stream2llm.workloads.trace import TraceRequest, read_trace, with_stable_layout


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next(
        (line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor()
    )
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cpus"


def load_requests(traces: Path, limit: int | None, layout: str) -> list[TraceRequest]:
    """The trace's first ``limit`` requests, their update documents in the named layout."""
    layout_named(layout)  # validates
    requests = read_trace(traces)[:limit]
    if layout == "stable":  # every policy, nonstream included, gets the same laid-out documents
        requests = with_stable_layout(requests)
    return requests
