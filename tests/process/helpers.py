"""A real ``python -m stream2llm`` process under test: its output read as it comes, its process
tree watched while it runs, and everything it started killed when the test ends.

The watcher snapshots the tree (children, recursively, plus anything in its process group, which
catches a grandchild reparented after its parent died) every few tens of milliseconds, so a test
can assert that every process the command ever had is gone after it exits. A zombie counts as
gone: a child that outlives its parent is reparented to pid 1, which may not reap it here.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 15.0  # every case: exited, and nothing of it left, this long after the signal
SNAPSHOT_S = 0.2  # two cores: the watcher must not slow the command down


def command_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_LOGGING_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",  # lines reach the test as they are printed
        COLUMNS="400",  # rich does not wrap the lines the test parses
        TQDM_DISABLE="1",
    )
    return env


class Command:
    """``python -m stream2llm *args`` in the repository root (this checkout's code), in its own
    session so that the test can kill the whole group whatever happens."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream2llm", *args],
            cwd=ROOT,
            env=command_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.started = time.monotonic()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.seen: dict[int, tuple[float, str]] = {}  # pid -> (create time, name), children ever seen
        self._timed: list[str] = []
        self._events: list[str] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- output -------------------------------------------------------------------------------
    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            with self._lock:
                lines.append(line.rstrip("\n"))
                self._timed.append(f"{time.monotonic() - self.started:7.2f}s {line.rstrip()}"[:300])

    def output(self) -> str:
        """Both streams as they came, each line with its time since launch (for failures)."""
        with self._lock:
            return "\n".join([*self._timed, *self._events])

    def note(self, event: str) -> None:
        with self._lock:
            self._events.append(f"{time.monotonic() - self.started:7.2f}s [test] {event}")

    def wait_for_line(self, pattern: str, timeout_s: float, stream: str = "stdout") -> re.Match:
        """The first line of ``stream`` matching ``pattern``; fails if the command exits first."""
        regex = re.compile(pattern)
        lines = self.stdout if stream == "stdout" else self.stderr
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                found = next((m for m in map(regex.search, lines) if m), None)
            if found:
                return found
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the readers may not have seen the last lines yet
                with self._lock:
                    found = next((m for m in map(regex.search, lines) if m), None)
                if found:
                    return found
                raise AssertionError(f"exited ({self.proc.returncode}) before /{pattern}/:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no line /{pattern}/ within {timeout_s} s:\n{self.output()}")

    # -- the process tree ---------------------------------------------------------------------
    def _snapshot(self) -> None:
        """One pass over /proc: the command's descendants, and its process group's members."""
        parent: dict[int, int] = {}
        procs: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["ppid"]):
            parent[p.pid], procs[p.pid] = p.info["ppid"], p
        root = self.proc.pid
        for pid, p in procs.items():
            if pid == root:
                continue
            mine = _descends(pid, root, parent)
            if not mine:
                with contextlib.suppress(OSError):
                    mine = os.getpgid(pid) == root
            if mine and pid not in self.seen:
                with contextlib.suppress(psutil.Error):
                    self.seen[pid] = (p.create_time(), p.name())

    def _watch(self) -> None:
        while not self._done.is_set() and self.proc.poll() is None:
            self._snapshot()
            time.sleep(SNAPSHOT_S)

    def children(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []

    def engine_core(self, timeout_s: float = 60.0) -> psutil.Process:
        """vLLM's engine-core process (its process title or command line says EngineCore)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in self.children():
                with contextlib.suppress(psutil.Error):
                    if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                        return p
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no EngineCore process below the command:\n{self.output()}")

    def alive(self) -> list[str]:
        """Processes the command ever had that still run (zombies and reused pids excluded)."""
        left = []
        for pid, (created, name) in list(self.seen.items()):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {name} {' '.join(p.cmdline())[:120]}")
        return left

    # -- stopping -----------------------------------------------------------------------------
    def send(self, signum: int) -> float:
        """Signal the command's own process (not its group: as a supervisor or kill(1) would)."""
        self._snapshot()
        self.proc.send_signal(signum)
        self.note(f"sent {signal.Signals(signum).name}")
        return time.monotonic()

    def wait_stopped(self, since: float, within_s: float = STOP_WITHIN_S, children: bool = True) -> int:
        """The exit status; asserts that the command exited and every process it had is gone
        within ``within_s`` of ``since`` (and, with ``children``, that it had some)."""
        deadline = since + within_s
        try:
            code = self.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {within_s} s after the signal:\n{self.output()}") from None
        took = time.monotonic() - since
        self.note(f"exited ({code}) {took:.1f} s after the signal")
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=5)
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"left behind after exit ({code}): {left}\n{self.output()}"
        assert self.seen or not children, "the watcher saw no child process: is the tree watched?"
        print(f"{self.args[0]}: exit {code} {took:.1f} s after the signal; {len(self.seen)} children")
        return code

    def kill_all(self) -> None:
        """The finalizer: nothing this command started survives the test, pass or fail."""
        self._done.set()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid, (created, _) in list(self.seen.items()):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()


def _descends(pid: int, root: int, parent: dict[int, int]) -> bool:
    seen = set()
    while pid in parent and pid not in seen:
        seen.add(pid)
        pid = parent[pid]
        if pid == root:
            return True
    return False
