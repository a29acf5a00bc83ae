"""Weighted scenario mixes run by concurrent workers: every scenario must end with its expected
outcome within ``SCENARIO_TIMEOUT_S``; delayed checks (an expiry) run beside the workers."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from .common import Tally, Unexpected

SCENARIO_TIMEOUT_S = 60.0  # a scenario running longer is a hang: counted as a failure
GONE_TIMEOUT_S = 5.0  # a session whose client left must be gone from the engine by then

Scenario = Callable[[], Awaitable[None]]
Mix = list[tuple[str, int, Scenario]]  # (name, weight, scenario)
Gone = Callable[[str], Awaitable[bool]]  # whether a session (by id) is still held by the engine


class LoadContext:
    """What every scenario of a run shares: one random stream, the tally, the delayed checks, and
    how to tell that a session left the engine (``still_open``; it may be set after construction)."""

    def __init__(self, seed: int, still_open: Gone) -> None:
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.started = 0
        self.checks: set[asyncio.Task] = set()
        self.still_open = still_open

    async def run(self, mixes: list[tuple[Mix, int]], seconds: float, max_scenarios: int) -> None:
        """``(mix, workers)`` pairs until ``seconds`` pass or ``max_scenarios`` more started."""
        deadline = time.monotonic() + seconds
        limit = self.started + max_scenarios
        await asyncio.gather(
            *(self.worker(mix, deadline, limit) for mix, workers in mixes for _ in range(workers))
        )

    async def wait_checks(self, timeout_s: float) -> None:
        if self.checks:
            await asyncio.wait(self.checks, timeout=timeout_s)

    async def worker(self, mix: Mix, deadline: float, limit: int) -> None:
        names = [m[0] for m in mix]
        weights = [m[1] for m in mix]
        fns = {m[0]: m[2] for m in mix}
        while time.monotonic() < deadline and self.started < limit:
            name = self.rng.choices(names, weights)[0]
            self.started += 1
            await self.run_one(name, fns[name])

    async def run_one(self, name: str, fn: Scenario) -> None:
        try:
            await asyncio.wait_for(fn(), SCENARIO_TIMEOUT_S)
            self.tally.ok[name] += 1
        except Unexpected as exc:
            self.tally.fail(name, str(exc))
        except asyncio.TimeoutError:
            self.tally.fail(name, f"no end within {SCENARIO_TIMEOUT_S:g} s")
        except Exception as exc:
            self.tally.fail(name, repr(exc)[:300])

    def later(self, name: str, coro: Awaitable[None]) -> None:
        """A delayed check (an expiry) that must not hold a worker."""
        task = asyncio.ensure_future(self.run_one(name, lambda: coro))
        self.checks.add(task)
        task.add_done_callback(self.checks.discard)

    async def gone(self, request_id: str) -> None:
        """The session must leave the engine (its KV freed) soon after its client left."""
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while await self.still_open(request_id):
            if time.monotonic() > deadline:
                raise Unexpected(f"{request_id} still open {GONE_TIMEOUT_S:g} s after its client left")
            await asyncio.sleep(0.05)
