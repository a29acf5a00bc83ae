"""``python -m stream2llm``: the same command line as the ``stream2llm`` script."""

from stream2llm.cli import app

if __name__ == "__main__":
    app(prog_name="stream2llm")
