"""Stopping the real commands: SIGINT and SIGTERM at start-up, mid-work and during shutdown, and
vLLM's engine core SIGKILLed under them. Each case runs ``python -m stream2llm`` as a process of
its own and asserts its exit status, that it ended within 15 s of the signal, and (through the
process tree watched while it ran) that nothing it started is left.

Statuses: 130 after SIGINT, 143 after SIGTERM (``serve``: 0, a requested shutdown), 1 when the
engine core died, with one line naming it on stderr. A signal that comes before the command
installed its handlers (the first second or two, Python's own imports) ends the process the
default way: killed by SIGTERM (-15 here, 143 in a shell) or KeyboardInterrupt.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.process.helpers import ROOT, Command, command_env

pytestmark = pytest.mark.engine

ENGINE_READY_S = 240.0  # a cold engine start on two busy cores
CORE_DIED = r"stream2llm: the vLLM engine core \(pid (\d+)\) died \(signal SIGKILL\)"


@pytest.fixture
def launch():
    """Start commands; whatever a test leaves running is killed, group and all."""
    started: list[Command] = []

    def start(*args: str) -> Command:
        command = Command(*args)
        started.append(command)
        return command

    yield start
    for command in started:
        command.kill_all()


@pytest.fixture(scope="module")
def trace(tmp_path_factory, tiny_model) -> str:
    """A small crawler workload: eight requests, three policy runs of ~12-15 s each."""
    path = tmp_path_factory.mktemp("trace") / "crawler.jsonl"
    args = ["synth", "--workload", "crawler", "--n", "8", "--seed", "3", "--scale", "0.05"]
    done = subprocess.run(
        [sys.executable, "-m", "stream2llm", *args, "--out", str(path)],
        cwd=ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return str(path)


def bench_args(trace: str, out) -> list[str]:
    return [
        "bench", trace, "--model", "tiny", "--qps", "4", "--policies", "nonstream,stream2llm,fcfs",
        "--delay-multiplier", "1.0", "--kv-budget", "256M", "--max-model-len", "4096", "--out", str(out),
    ]  # fmt: skip


def run_args() -> list[str]:
    # the packaged local site: no network, no index; a long answer keeps it busy for seconds
    return [
        "run", "surface blit", "--retriever", "crawl", "--model", "tiny", "--max-pages", "3",
        "--max-tokens", "3000", "--max-model-len", "8192",
    ]  # fmt: skip


def serve_args() -> list[str]:
    return ["serve", "--model", "tiny", "--port", "0", "--kv-cache-gb", "0.25"]


def finished_runs(out) -> dict | None:
    try:
        return json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None


def wait_for_first_run(bench: Command, out) -> dict:
    return wait_for(lambda: finished_runs(out), bench, ENGINE_READY_S + 60, "a finished run")


def wait_for(predicate, command: Command, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := predicate()) is not None:
            return value
        code = command.proc.poll()
        assert code is None, f"exited ({code}) before {what}:\n{command.output()}"
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s} s:\n{command.output()}")


def assert_core_died_line(command: Command, core_pid: int) -> None:
    lines = [line for line in command.stderr if line.startswith("stream2llm: ")]
    assert len(lines) == 1, command.output()
    assert f"(pid {core_pid}) died (signal SIGKILL)" in lines[0], command.output()
    assert "Traceback" not in "\n".join(command.stderr), command.output()


# -- bench ------------------------------------------------------------------------------------


def test_bench_sigint_while_the_engine_starts(launch, trace, tmp_path):
    bench = launch(*bench_args(trace, tmp_path / "out"))
    bench.engine_core(timeout_s=ENGINE_READY_S)  # vLLM's core process is up, loading the model
    code = bench.wait_stopped(bench.send(signal.SIGINT))
    assert code == 130, bench.output()
    assert "stream2llm: stopped by SIGINT" in bench.stderr
    assert finished_runs(tmp_path / "out") is None  # nothing ran, nothing claimed


def test_bench_sigterm_after_the_first_policy_keeps_the_finished_runs(launch, trace, tmp_path):
    out = tmp_path / "out"
    bench = launch(*bench_args(trace, out))
    first = wait_for_first_run(bench, out)
    assert [run["policy"] for run in first["runs"]] == ["nonstream"] and first["complete"] is False
    code = bench.wait_stopped(bench.send(signal.SIGTERM))
    assert code == 143, bench.output()
    assert "stream2llm: stopped by SIGTERM" in bench.stderr
    kept = finished_runs(out)
    assert kept is not None and kept["complete"] is False
    # a second run may have ended meanwhile
    assert len(kept["runs"]) in (1, 2) and kept["runs"][0] == first["runs"][0]
    assert all(run["requests"] == 8 and run["errors"] == 0 for run in kept["runs"])
    assert not (out / "results.json.part").exists()


def test_bench_stops_with_status_1_when_the_engine_core_is_killed(launch, trace, tmp_path):
    out = tmp_path / "out"
    bench = launch(*bench_args(trace, out))
    wait_for_first_run(bench, out)
    core = bench.engine_core()
    code = bench.wait_stopped(kill(bench, core))
    assert code == 1, bench.output()
    assert_core_died_line(bench, core.pid)
    kept = finished_runs(out)
    assert kept is not None and kept["complete"] is False and kept["runs"][0]["policy"] == "nonstream"


# -- run --------------------------------------------------------------------------------------


def test_run_sigterm_at_start_up(launch):
    # 3 s in, the command is importing vLLM (10-20 s here) to start the engine: that must not
    # hold the signal back. On a slower machine the signal may come before the handlers exist.
    run = launch(*run_args())
    time.sleep(3.0)
    code = run.wait_stopped(run.send(signal.SIGTERM), within_s=5.0, children=False)
    assert code in (143, -signal.SIGTERM), run.output()
    if code == 143:
        assert "stream2llm: stopped by SIGTERM" in run.stderr


def test_run_sigint_mid_answer(launch):
    run = launch(*run_args())
    run.wait_for_line(r"crawl append #1:", ENGINE_READY_S)
    code = run.wait_stopped(run.send(signal.SIGINT))
    assert code == 130, run.output()
    assert "stream2llm: stopped by SIGINT" in run.stderr
    assert not any(line.startswith("│ stream ") for line in run.stdout)  # no timings: it never finished


def test_run_stops_with_status_1_when_the_engine_core_is_killed(launch):
    run = launch(*run_args())
    run.wait_for_line(r"crawl append #1:", ENGINE_READY_S)
    core = run.engine_core()
    code = run.wait_stopped(kill(run, core))
    assert code == 1, run.output()
    assert_core_died_line(run, core.pid)


# -- serve ------------------------------------------------------------------------------------


def test_serve_sigterm_after_ready_exits_0(launch):
    serve = launch(*serve_args())
    url = serve.wait_for_line(r"at (http://\S+) \(OpenAI", ENGINE_READY_S).group(1)
    assert http(url + "/health")[0] == 200
    code = serve.wait_stopped(serve.send(signal.SIGTERM))
    assert code == 0, serve.output()
    assert serve.stdout[-1] == "stopped"
    with pytest.raises(OSError):
        http(url + "/health")


def test_serve_sigint_during_shutdown_exits_at_once(launch):
    serve = launch(*serve_args())
    url = serve.wait_for_line(r"at (http://\S+) \(OpenAI", ENGINE_READY_S).group(1)
    assert http(url + "/health")[0] == 200
    sent = serve.send(signal.SIGTERM)
    time.sleep(0.2)
    serve.send(signal.SIGINT)
    code = serve.wait_stopped(sent)
    # the SIGTERM's shutdown may finish first (0); otherwise the second signal exits at once
    # with the first one's status (143)
    assert code in (0, 130, 143), serve.output()
    assert "Traceback" not in "\n".join(serve.stderr), serve.output()


def test_serve_answers_503_then_exits_1_when_the_engine_core_is_killed(launch):
    serve = launch(*serve_args())
    url = serve.wait_for_line(r"at (http://\S+) \(OpenAI", ENGINE_READY_S).group(1)
    assert http(url + "/health")[0] == 200
    core = serve.engine_core()
    killed = kill(serve, core)
    health = wait_for(lambda: _status_unless(200, url + "/health"), serve, 10, "/health saying 503")
    assert health[0] == 503 and health[1]["status"] == "engine_dead", health
    status, body = http(url + "/v1/sessions", {"question": "still there?"})
    assert status == 503 and body["error"]["code"] == "engine_dead", body
    code = serve.wait_stopped(killed)
    assert code == 1, serve.output()
    assert_core_died_line(serve, core.pid)


# -- helpers ----------------------------------------------------------------------------------


def kill(command: Command, process) -> float:
    process.kill()
    command.note(f"killed {process.pid}")
    return time.monotonic()


def http(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _status_unless(ok: int, url: str) -> tuple[int, dict] | None:
    status, body = http(url)
    return None if status == ok else (status, body)
