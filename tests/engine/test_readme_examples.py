"""README's Python examples run as pasted: each is a whole script (imports, ``async def main()``,
the ``__main__`` guard vLLM's spawned engine core needs), run in its own process on the tiny model
and the packaged local site, and prints what the test checks."""

from __future__ import annotations

import re

import pytest

from tests.readme_blocks import python_blocks
from tests.scripts import run_script

pytestmark = pytest.mark.engine

# under pytest-timeout's 600 s: an engine start-up (~30 s unloaded), a small index built on first use, a crawl
TIMEOUT_S = 540

# what each example prints, in README order: a new example needs its line here
EXPECTED = [
    r"\d+ tokens, \d+ prompt tokens prefilled",  # Python API
    r"\d+ sources, TTFT [\d.]+ s\n2 answers",  # RAG pipelines and retrievers
    r"served at http://127\.0\.0\.1:\d+",  # HTTP server (OpenAI client)
    r"context from crawl",  # LangChain
]
BLOCKS = python_blocks()


def test_every_python_block_is_checked_and_none_is_marked_not_to_run():
    assert len(BLOCKS) == len(EXPECTED)
    assert {info for info, _ in BLOCKS} == {"python"}
    for _, code in BLOCKS:
        assert 'if __name__ == "__main__":' in code and "asyncio.run(main())" in code


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, tiny_model):
    script = tmp_path / f"readme_example_{index}.py"
    script.write_text(BLOCKS[index][1])
    done = run_script(script, TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.search(EXPECTED[index], done.stdout), done.stdout[-2000:]
