"""A script that starts the engine without ``if __name__ == "__main__":`` gets one clear error.

vLLM spawns its engine core, which re-imports the script and would start the engine again there;
multiprocessing then raised a RuntimeError deep in vLLM's start-up and the caller saw only "Engine
core initialization failed". The script must fail with StreamError naming the fix, and not hang."""

from __future__ import annotations

import textwrap

import pytest

from tests.scripts import run_script

pytestmark = pytest.mark.engine

TIMEOUT_S = 300  # the parent's engine start-up fails once its engine core has died

UNGUARDED = textwrap.dedent(
    """
    import asyncio

    from stream2llm import EngineConfig, StreamingEngine


    async def main():
        engine = await StreamingEngine.start(EngineConfig(model="tiny", kv_cache_bytes=64 << 20))
        await engine.shutdown()


    asyncio.run(main())  # no __main__ guard: the spawned engine core runs this again
    """
)


def test_unguarded_script_fails_with_a_clear_error(tmp_path, tiny_model):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    done = run_script(script, TIMEOUT_S, {"TMPDIR": str(tmp_path)})  # where the child leaves word
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("stream2llm.errors.StreamError: StreamingEngine.start() ran while the main module")
    assert 'put the call under `if __name__ == "__main__":`' in last
    assert not list(tmp_path.glob("stream2llm-unguarded-main-*")), "the parent removes the child's word"
