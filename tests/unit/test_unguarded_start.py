"""The unguarded-main check, without vLLM: a spawned child re-importing the script refuses and
leaves word for its parent, whose failed start then names the fix."""

from __future__ import annotations

import multiprocessing.process
import os

import pytest

from stream2llm.engine import health
from stream2llm.errors import StreamError


def test_nothing_happens_outside_a_spawned_childs_bootstrap():
    health.refuse_unguarded_start()


def test_a_bootstrapping_child_refuses_and_tells_its_parent(monkeypatch, tmp_path):
    monkeypatch.setattr(health.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(multiprocessing.process.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(StreamError, match=r'under `if __name__ == "__main__":`'):
        health.refuse_unguarded_start()
    assert (tmp_path / f"stream2llm-unguarded-main-{os.getppid()}").exists()


def test_the_parents_failed_start_names_the_fix_only_when_told(monkeypatch, tmp_path):
    monkeypatch.setattr(health.tempfile, "gettempdir", lambda: str(tmp_path))
    marker = tmp_path / f"stream2llm-unguarded-main-{os.getpid()}"

    def failing_start() -> None:
        marker.touch()  # what the spawned child does before it exits
        raise RuntimeError("Engine core initialization failed")

    with pytest.raises(StreamError, match="main module was being imported") as caught:
        health.explain_unguarded_main(failing_start)()
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert not marker.exists()

    def other_failure() -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        health.explain_unguarded_main(other_failure)()
    assert health.explain_unguarded_main(lambda: 7)() == 7
